"""Builders shared by the tests and the benchmarks: patch stores, image batches, training configs,
IDX image sets, phantom cohorts, DICOM instances and series.

Each builder writes what medvae reads in its on-disk format, from the contracts in
docs/architecture.md, not through the code a test checks (the IDX writer follows LeCun's
description, a DICOM image is built element by element with pydicom). A test module imports its
builders from here only, never from another test module or a conftest. Benchmarks import this
module too (they put the repository root on ``sys.path``), so it imports nothing from pytest.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from medvae.config import TrainStageConfig
from medvae.data.store import PatchStore, write_store
from medvae.models import VAEGAN
from medvae.training.adversarial import generator_adversarial_loss
from medvae.training.losses import vae_loss

# ----------------------------------------------------------------------------------------- patch stores


def store_index(n: int, *, patient_id="P0", modality="ct", split="train", slice_index=None, y=0, x=0,
                foreground_fraction=1.0, source="test", **extra) -> dict[str, list]:
    """The index.csv columns of ``n`` patches: a scalar is repeated n times, a sequence kept as it is.

    ``slice_index`` defaults to the row number; ``extra`` columns (``has_label``, ``class``) follow
    the store's own columns.
    """
    columns = {"patient_id": patient_id, "modality": modality, "split": split,
               "slice_index": range(n) if slice_index is None else slice_index, "y": y, "x": x,
               "foreground_fraction": foreground_fraction, "source": source, **extra}
    index = {}
    for name, value in columns.items():
        if isinstance(value, (str, bytes, int, float, np.integer, np.floating)):
            index[name] = [value] * n
        else:
            index[name] = list(value)
            if len(index[name]) != n:
                raise ValueError(f"store_index: column {name} has {len(index[name])} values for {n} patches")
    return index


def patch_store(path: str | os.PathLike, patches: np.ndarray, *, labels: np.ndarray | None = None,
                classes: Sequence[str] | None = None, class_names: Sequence[str] | None = None,
                content_hash: str | None = None, normalization: dict | None = None, spacing: dict | None = None,
                dtype: str | None = None, **columns) -> PatchStore:
    """A patch store of ``patches`` with its index built by :func:`store_index` from ``columns``.

    Args:
        patches: ``(N, C, H, W)`` float in [0, 1].
        labels: ``(N, 1, H, W)`` uint8 label maps (``labels.npy``), or None.
        classes: each patch's class name (index column ``class``), or None for a store without classes.
        class_names: store.json ``classes`` in label order; default: the sorted names in ``classes``.
        content_hash, normalization, spacing, dtype: store.json entries (per modality for the two
            dicts; write_store's defaults when None: the hash of the stored patches, identity, 1.0, float16).
        columns: index columns for :func:`store_index` (``patient_id``, ``modality``, ``split``, ...).
    """
    n = len(patches)
    if classes is not None:
        columns["class"] = list(classes)
    meta: dict = {}
    if classes is not None or class_names is not None:
        meta["classes"] = list(class_names if class_names is not None else sorted(set(classes)))
    for key, value in (("content_hash", content_hash), ("normalization", normalization), ("spacing", spacing),
                       ("dtype", dtype)):
        if value is not None:
            meta[key] = value
    return write_store(path, np.asarray(patches, dtype=np.float32), store_index(n, **columns), meta, labels=labels)


def disc_images(n: int, size: int = 64, *, seed: int = 0, radius=(0.1, 0.3), level: float = 0.8,
                background: float = 0.1) -> np.ndarray:
    """``(n, 1, size, size)`` float32: one disc per image (centre uniform in [0.3, 0.7]², radius
    uniform in ``radius``, fractions of the side) of ``background + level`` on ``background``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    cy, cx = rng.uniform(0.3, 0.7, (2, n, 1, 1))
    r = rng.uniform(*radius, (n, 1, 1))
    return (((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) * level + background)[:, None].astype(np.float32)


def disc_store(path: str | os.PathLike, splits: dict[str, int], *, size: int = 64, seed: int = 0,
               radius=(0.1, 0.3), level: float = 0.8, background: float = 0.1, nan_rows: Sequence[int] = (),
               **columns) -> PatchStore:
    """A store of :func:`disc_images`, ``splits`` patches per split in that order (e.g. train then val).

    Args:
        size, seed, radius, level, background: :func:`disc_images`'.
        nan_rows: rows whose pixels are all NaN (a store the NaN guard must refuse).
        columns: :func:`patch_store`'s (``patient_id``, ``content_hash``, ...); ``source`` defaults to phantom.
    """
    x = disc_images(sum(splits.values()), size, seed=seed, radius=radius, level=level, background=background)
    x[list(nan_rows)] = np.nan
    return patch_store(path, x, split=[name for name, n in splits.items() for _ in range(n)],
                       **{"source": "phantom", **columns})


TINY_TRAIN, TINY_VAL = 64, 16  # the tiny training store's splits


def tiny_disc_store(path: str | os.PathLike, content_hash: str = "tiny-store-v1",
                    nan_rows: Sequence[int] = ()) -> PatchStore:
    """The training-engine tests' store: 64² discs, TINY_TRAIN train then TINY_VAL val patches, 8 per patient."""
    return disc_store(path, {"train": TINY_TRAIN, "val": TINY_VAL}, nan_rows=nan_rows, content_hash=content_hash,
                      patient_id=[f"P{i // 8:03d}" for i in range(TINY_TRAIN + TINY_VAL)])


def row_store(path: str | os.PathLike, n: int = 50, c: int = 1, size: int = 8, dtype: str = "float16",
              labels: bool = False, seed: int = 0) -> tuple[PatchStore, np.ndarray]:
    """Random patches whose pixel (0, 0) is ``row / 1000`` (a batch tells which rows it holds), five
    patients, both modalities and the three splits in turn. Returns (store, the float32 patches)."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, c, size, size)).astype(np.float32)
    x[:, 0, 0, 0] = np.arange(n) / 1000.0  # identifies the row
    lab = (x[:, :1] > 0.5).astype(np.uint8) if labels else None
    store = patch_store(path, x, labels=lab, dtype=dtype, patient_id=[f"P{i % 5}" for i in range(n)],
                        modality=["ct" if i % 2 == 0 else "microscopy" for i in range(n)],
                        split=np.array(["train", "val", "test"])[np.arange(n) % 3], source="mem")
    return store, x


def relabelled_store(store: PatchStore, path: str | os.PathLike, keep_rows) -> PatchStore:
    """``store`` with every train row outside ``keep_rows`` given the next class (cyclically): what a study
    must not see, since those labels are outside its budget."""
    classes = np.asarray(store.index["class"], dtype=object).copy()
    names = store.classes
    for r in np.setdiff1d(store.select("train"), keep_rows):
        classes[r] = names[(names.index(classes[r]) + 1) % len(names)]
    index = {k: np.asarray(v) for k, v in store.index.items()}
    index["class"] = classes
    return write_store(path, store.get(slice(None)), index, {"classes": names, "content_hash": "relabelled"})


# ----------------------------------------------------------------------------------------- models and training


def blobs(n: int = 16, size: int = 64, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """Structured images in [0, 1]: a few Gaussian-smoothed random blobs per image."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = torch.zeros(n, channels, size, size)
    for _ in range(3):
        cy = torch.rand(n, channels, 1, 1, generator=g) * size
        cx = torch.rand(n, channels, 1, 1, generator=g) * size
        r = 4 + torch.rand(n, channels, 1, 1, generator=g) * size / 6
        amp = 0.3 + 0.7 * torch.rand(n, channels, 1, 1, generator=g)
        out = out + amp * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
    return out.clamp(0, 1)


def model_loss(m, x: torch.Tensor, *, beta: float = 1.0, critic: bool = False, **kw):
    """The trainer's generator loss of model ``m`` on ``x``: forward, then the VAE loss on its output and, for
    a VAE–GAN, the adversarial terms (zeros unless ``critic``). Returns (loss, detached terms, output)."""
    out = m(x, n_prior=x.shape[0] if critic else 0)
    loss, terms = vae_loss(x, out, m.likelihood, beta=beta)
    if isinstance(m, VAEGAN):
        zero = torch.zeros(())
        adv = {"adv": zero, "fm": zero, "adv_weight": zero}
        if critic:
            loss, adv = generator_adversarial_loss(loss, terms["nll"], x, out, m.discriminator,
                                                   last_layer=m.last_decoder_weight, **kw)
        terms = {**terms, **adv}
    return loss, {k: v.detach() for k, v in terms.items()}, out


def tiny_config(name="vae", **train) -> TrainStageConfig:
    """channels (8, 16, 32), latent 16, 64² (the image size comes from the store)."""
    base = {"batch_size": 8, "max_steps": 12, "lr": 2e-3, "warmup_steps": 2, "beta_warmup_steps": 4,
            "checkpoint_every": 4, "log_every": 1, "val_batches": 1, "disc_start": 2}
    return TrainStageConfig.model_validate({
        "model": {"name": name, "channels": [8, 16, 32], "latent_dim": 16,
                  **({"disc_channels": 8, "disc_layers": 2} if name == "vaegan" else {})},
        "train": {**base, **train},
    })


# ----------------------------------------------------------------------------------------- 2D image sets


def write_idx(path: str | os.PathLike, arr: np.ndarray, gz: bool | None = None, count: int | None = None) -> None:
    """One IDX file as LeCun describes it: magic ``0 0 0x08 ndim``, big-endian uint32 sizes, uint8 values.

    Args:
        gz: gzip the file; default: when ``path`` ends in ``.gz``.
        count: the item count the header claims, when it should differ from ``len(arr)`` (a corrupt file).
    """
    arr = np.asarray(arr)
    shape = list(arr.shape)
    if count is not None:
        shape[0] = count
    raw = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *shape) + \
        arr.astype(np.uint8).tobytes()
    gz = str(path).endswith(".gz") if gz is None else gz
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(raw)


def write_idx_set(root: str | os.PathLike, prefix: str, images: np.ndarray, labels: np.ndarray,
                  gz: bool = True) -> tuple[Path, Path]:
    """``root/<prefix>-images-idx3-ubyte[.gz]`` and ``-labels-idx1-ubyte[.gz]`` (MNIST names: prefix
    ``train`` or ``t10k``). Returns the two paths."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    paths = root / f"{prefix}-images-idx3-ubyte{ext}", root / f"{prefix}-labels-idx1-ubyte{ext}"
    write_idx(paths[0], images, gz)
    write_idx(paths[1], labels, gz)
    return paths


def random_idx_set(root: str | os.PathLike, counts: dict[str, int], size: int = 28, n_classes: int = 10,
                   seed: int = 0) -> None:
    """A Fashion-MNIST-like folder of random uint8 images and labels, ``counts`` per prefix."""
    rng = np.random.default_rng(seed)
    for prefix, n in counts.items():
        write_idx_set(root, prefix, rng.integers(0, 256, (n, size, size), dtype=np.uint8),
                      rng.integers(0, n_classes, n, dtype=np.uint8))


# ----------------------------------------------------------------------------------------- phantom cohort


def phantom_cohort(root: str | os.PathLike, *, ct_patients: int = 3, microscopy_stacks: int = 1, seed: int = 0,
                   ct_size: int = 64, ct_slices: int | None = 6) -> dict:
    """The phantom cohort (TCIA-layout DICOM + NIfTI labels, TIFF stacks) in ``root``, small by default.

    Written once per set of arguments: a later call with the same ones returns the recorded summary
    (benchmarks cache their cohorts this way); other arguments rewrite ``root``.

    Returns:
        :func:`medvae.io.phantoms.write_phantom_cohort`'s summary.
    """
    from medvae.io.phantoms import write_phantom_cohort

    root = Path(root)
    args = {"ct_patients": ct_patients, "microscopy_stacks": microscopy_stacks, "seed": seed, "ct_size": ct_size}
    if ct_slices is not None:
        args["ct_slices"] = ct_slices
    marker = root / ".phantom-cohort.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done["args"] == args:
            return done["summary"]
    shutil.rmtree(root, ignore_errors=True)
    summary = write_phantom_cohort(root, **args)
    marker.write_text(json.dumps({"args": args, "summary": summary}))  # last: an interrupted write starts over
    return summary


# ----------------------------------------------------------------------------------------- DICOM


def new_instance(sop_class: str, modality: str, series_uid: str, instance_number: int | None = None) -> Dataset:
    """An Explicit VR Little Endian dataset of ``sop_class`` with a fresh SOP instance UID in ``series_uid``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID = modality, series_uid
    if instance_number is not None:
        ds.InstanceNumber = instance_number
    return ds


def dicom_image(pixels: np.ndarray, *, modality: str, series_uid: str, row_dir, col_dir, position,
                pixel_spacing, instance_number: int | None = None, sop_class: str | None = None,
                thickness: float | None = None, rescale: tuple[float, float] | None = None) -> Dataset:
    """A single-frame grayscale image with its geometry (16-bit, MONOCHROME2).

    Args:
        pixels: ``(rows, cols)`` int16 (signed pixel representation) or uint16 stored values.
        row_dir, col_dir: the ImageOrientationPatient direction cosines (LPS) of a row and a column.
        position: ImagePositionPatient (LPS, mm) of the first pixel.
        pixel_spacing: PixelSpacing ``(row spacing, column spacing)`` mm.
        sop_class: default CT Image Storage for ``modality`` CT, MR Image Storage otherwise.
        thickness, rescale: SliceThickness and (RescaleSlope, RescaleIntercept), left out when None.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype not in (np.int16, np.uint16):
        raise ValueError(f"dicom_image: 16-bit pixels expected, got {pixels.dtype}")
    sop_class = sop_class or (CTImageStorage if modality == "CT" else MRImageStorage)
    ds = new_instance(sop_class, modality, series_uid, instance_number)
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 15, int(pixels.dtype == np.int16), 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    if thickness is not None:
        ds.SliceThickness = thickness
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = pixels.tobytes()
    return ds


def dicom_series(folder: str | os.PathLike, pixels: np.ndarray, *, modality: str, row_dir, col_dir, origin, dz: float,
                 pixel_spacing, names: Sequence[str] | None = None, numbers: Sequence[int] | None = None,
                 skip: Sequence[int] = (), uid: str | None = None, sop_class: str | None = None,
                 thickness: float | None = None, rescale: tuple[float, float] | None = None,
                 **elements) -> np.ndarray:
    """A single-frame series, one :func:`dicom_image` file per slice; slice ``k`` lies at
    ``origin + k * dz * (row_dir x col_dir)``.

    Args:
        pixels: ``(n, rows, cols)`` 16-bit stored values, slice by slice.
        names, numbers: each slice's file name and InstanceNumber (a shuffled order tests the reader's
            sorting); default ``k.dcm`` and no InstanceNumber.
        skip: slices left out (a gap).
        uid: the SeriesInstanceUID; default a fresh one.
        sop_class, thickness, rescale: :func:`dicom_image`'s.
        elements: data elements set on every file (``PatientName="..."``).

    Returns:
        ``(n, 3)`` the ImagePositionPatient of each slice (LPS, mm), skipped ones included.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    normal = np.cross(np.asarray(row_dir, float), np.asarray(col_dir, float))
    positions = np.asarray(origin, float) + np.arange(len(pixels))[:, None] * dz * normal
    uid = uid or generate_uid()
    for k in range(len(pixels)):
        if k in skip:
            continue
        ds = dicom_image(pixels[k], modality=modality, series_uid=uid, row_dir=row_dir, col_dir=col_dir,
                         position=positions[k], pixel_spacing=pixel_spacing, sop_class=sop_class,
                         instance_number=None if numbers is None else int(numbers[k]), thickness=thickness,
                         rescale=rescale)
        for keyword, value in elements.items():
            setattr(ds, keyword, value)
        ds.save_as(folder / (f"{k}.dcm" if names is None else names[k]), enforce_file_format=True)
    return positions


# A utility study small enough for a test: a generator of a few steps and a few downstream steps
TINY_GENERATOR = {"model": {"channels": [8, 16], "latent_dim": 8},
                  "train": {"batch_size": 8, "lr": 2e-3, "warmup_steps": 1, "beta_warmup_steps": 2,
                            "checkpoint_every": 2, "log_every": 1, "disc_start": 1, "amp": "off"}}
FAST_STUDY = {"seeds": 1, "generator_steps": 4, "downstream_steps": 4, "batch_size": 8, "per_image": 3,
        "generator": TINY_GENERATOR}


# --------------------------------------------------------------------------- a VAE with an exact likelihood
class PPCA(torch.nn.Module):
    """Probabilistic PCA x = W z + sigma * eps as a model with the medvae interface (x: (B, 1, 4, 4))."""

    def __init__(self, W, sigma, imperfect=False):
        super().__init__()
        self.W, self.sigma, self.imperfect = W, sigma, imperfect
        self.latent_dim = W.shape[1]
        # Orthogonal columns: the exact posterior is diagonal, so a diagonal encoder can be exact.
        m = (W.T @ W).diagonal() + sigma**2
        self.post_scale, self.post_var = 1 / m, sigma**2 / m

    def encode(self, x):
        mu = (x.flatten(1) @ self.W) * self.post_scale
        logvar = self.post_var.log().expand_as(mu)
        if self.imperfect:  # deliberately wrong posterior: IWAE must then improve with k
            mu, logvar = 0.6 * mu + 0.3, logvar + 1.0
        return mu, logvar

    def decode(self, z):
        return (z @ self.W.T).view(-1, 1, 4, 4)

    def log_likelihood(self, x, x_hat):
        d = x.flatten(1) - x_hat.flatten(1)
        return -0.5 * (d.pow(2).sum(1) / self.sigma**2 + d.shape[1] * math.log(2 * math.pi * self.sigma**2))

    def exact_log_px(self, x):
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(self.W.shape[0], dtype=self.W.dtype)
        return torch.distributions.MultivariateNormal(torch.zeros(self.W.shape[0], dtype=self.W.dtype),
                                                      cov).log_prob(x.flatten(1))


def ppca_model(imperfect):
    """A PPCA model (exact log p(x) known) and 64 images it explains: (model, (64, 1, 4, 4) float64)."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(16, 3, generator=g, dtype=torch.float64))
    W = q * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    model = PPCA(W, 0.3, imperfect)
    x = model.decode(torch.randn(64, 3, generator=g, dtype=torch.float64)) + 0.3 * torch.randn(
        64, 1, 4, 4, generator=g, dtype=torch.float64)
    return model, x


# --------------------------------------------------------------------------------------------- training runs
def best_is_the_logged_max(run: str | os.PathLike, key: str) -> dict[int, float]:
    """Check that a run's best.pt, and run.json's best_key / best_score, are the maximum of ``val_<key>`` in its
    train_log.jsonl (the log is the independent record); returns step -> logged score."""
    from medvae.training.checkpoint import load_checkpoint

    run = Path(run)
    entries = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    scores = {e["step"]: e[f"val_{key}"] for e in entries if f"val_{key}" in e}
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["step"] == max(scores, key=scores.get) and best["best_score"] == max(scores.values())
    info = json.loads((run / "run.json").read_text())
    assert info["best_key"] == key and info["best_score"] == max(scores.values())
    return scores


def noisy_stack(path: str | os.PathLike, depth: int) -> np.ndarray:
    """A (36, 40, depth) int16 NIfTI stack of uniform noise in 0..999 (0.5 × 0.5 × 2 mm) at ``path``; its data."""
    import nibabel as nib

    data = (np.random.default_rng(0).random((36, 40, depth)) * 1000).astype(np.int16)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 2.0, 1.0])), str(path))
    return data

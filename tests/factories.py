"""Builders shared by the tests and the benchmarks: patch stores, IDX image sets, phantom cohorts,
DICOM instances.

Each builder writes what medvae reads in its on-disk format, from the contracts in
docs/architecture.md, not through the code a test checks (the IDX writer follows LeCun's
description, a DICOM image is built element by element with pydicom). Benchmarks import this
module too (they put the repository root on ``sys.path``), so it imports nothing from pytest.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from medvae.data.store import PatchStore, write_store

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

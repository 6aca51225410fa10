"""Synthetic datasets: decode prior samples, audit them for memorization, write physical units.

Output of ``generate(RUN, OUT, config)``::

    OUT/synthetic/<modality>/<id>.nii.gz   CT (and MR): int16 HU, NIfTI, LPS voxel axes (X, Y, 1)
    OUT/synthetic/<modality>/<id>.tif      microscopy: uint16 ImageJ TIFF, µm pixel size
    OUT/synthetic/<modality>/<id>.png      8-bit preview (the store's window / normalization)
    OUT/manifest.csv                       one row per sample (MANIFEST_COLUMNS)
    OUT/generation.json                    parameters, counts, audit thresholds, timings
    OUT/audit.png                          sample vs real nearest-neighbour distance histograms
    OUT/augmented_store/                   with mix_with: real patches + synthetic ones

Reproducibility: sample ``i``'s latent depends only on ``(seed, i)``: latents are drawn on the
CPU in fixed chunks of ``CHUNK`` rows, chunk ``k`` from a ``torch.Generator`` seeded with
``SeedSequence([seed, k])``. So the batch size, the device and ``n`` do not change which latent a
sample gets (``n`` can be raised later and the first samples stay the same); decoding on the
same device with the same arguments gives byte-identical files (no timestamps are written).
Resumption: files are written atomically, so a file that exists is complete; a re-run with the
same arguments (checked against ``generation.json``) writes only the missing files.

Modality of a sample: the modality of its nearest training patch (pixel space), so a model
trained on a CT + microscopy store writes each sample in the units of what it resembles.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from medvae import audit
from medvae.config import GenerateConfig
from medvae.data.store import PatchStore, open_store, write_store
from medvae.devices import select_device
from medvae.engine.checkpoint import resolve_checkpoint
from medvae.errors import InputError
from medvae.files import atomic_open, atomic_path, sha256_file, sha256_json, write_json

log = logging.getLogger(__name__)
CHUNK = 256
MANIFEST_COLUMNS = ("id", "modality", "path", "preview", "mask", "seed", "checkpoint_sha256", "latent_norm",
                    "nearest_train_distance", "nearest_train_distance_features", "nearest_train_patient",
                    "flagged")
PARAM_KEYS = ("checkpoint_sha256", "store_hash", "seed", "temperature", "format", "drop_flagged",
              "audit_percentile")


# --------------------------------------------------------------------------- latents
def _chunk_seed(seed: int, chunk: int) -> int:
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1, np.uint64)[0])


def latents(seed: int, start: int, stop: int, dim: int, temperature: float = 1.0) -> torch.Tensor:
    """Prior latents of samples ``start..stop-1``: ``(stop - start, dim)`` float32 on the CPU."""
    first, last = start // CHUNK, (stop - 1) // CHUNK
    z = torch.cat([torch.randn(CHUNK, dim, generator=torch.Generator().manual_seed(_chunk_seed(seed, k)))
                   for k in range(first, last + 1)])
    return z[start - first * CHUNK: stop - first * CHUNK] * temperature


@contextlib.contextmanager
def _deterministic_cudnn():
    """cuDNN picks the same (deterministic) kernels every run; restored afterwards."""
    old = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old


# --------------------------------------------------------------------------- writers
def _spacing_unit(modality: str) -> str:
    return "um" if modality == "microscopy" else "mm"


def write_nifti(path: Path, arr: np.ndarray, spacing: tuple[float, float], unit: str = "mm") -> None:
    """``arr: (C, H, W)`` rows = y (posterior), columns = x (patient left) -> NIfTI ``(X, Y, 1[, C])``.

    The voxel axes are ('L', 'P', 'S') as in CONTRACTS.md, so the RAS affine is diag(-sx, -sy, 1).
    """
    import nibabel as nib

    sy, sx = spacing
    data = np.transpose(arr, (2, 1, 0))[:, :, None]  # (X, Y, 1, C)
    data = data[..., 0] if arr.shape[0] == 1 else data
    affine = np.diag([-sx, -sy, 1.0, 1.0])
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units(xyz=unit)
    img.header["descrip"] = b"medvae synthetic"
    with atomic_path(path) as tmp:
        nib.save(img, tmp)  # nibabel's gzip writer stores mtime 0: same bytes every run


def write_tiff(path: Path, arr: np.ndarray, spacing: tuple[float, float], unit: str = "um") -> None:
    """``arr: (C, H, W)`` -> TIFF with pixel size; ImageJ hyperstack when uint16/uint8/float32."""
    import tifffile

    sy, sx = spacing
    data = arr[0] if arr.shape[0] == 1 else arr
    imagej = arr.dtype in (np.uint8, np.uint16, np.float32)
    kw = ({"imagej": True, "metadata": {"unit": unit, "axes": "YX" if arr.shape[0] == 1 else "CYX"}}
          if imagej else {"resolutionunit": "CENTIMETER" if unit == "mm" else "NONE"})
    scale = 10.0 if (unit == "mm" and not imagej) else 1.0  # TIFF has no mm unit: store pixels per cm
    with atomic_path(path) as tmp:  # no datetime tag is written: same bytes every run
        tifffile.imwrite(tmp, data, photometric="minisblack", resolution=(scale / sx, scale / sy), **kw)


def write_png(path: Path, x01: np.ndarray) -> None:
    """8-bit preview of ``x01: (C, H, W)`` in [0, 1] (first channel; RGB when C == 3)."""
    from PIL import Image

    img = np.rint(np.clip(x01, 0, 1) * 255).astype(np.uint8)
    img = np.transpose(img, (1, 2, 0)) if img.shape[0] == 3 else img[0]
    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


def to_file_dtype(phys: np.ndarray, modality: str) -> np.ndarray:
    """Physical values -> the file's integer type: uint16 counts (microscopy), int16 HU (else)."""
    if modality == "microscopy":
        return np.clip(np.rint(phys), 0, 65535).astype(np.uint16)
    return np.clip(np.rint(phys), -32768, 32767).astype(np.int16)


def _sample_files(sample_id: str, modality: str, fmt: str, masked: bool) -> dict[str, str]:
    """Relative paths of one sample's files: ``path`` (main), ``preview`` and optional ``mask``."""
    base = f"synthetic/{modality}/{sample_id}"
    if fmt == "png":
        main = None
    elif fmt == "npy":
        main = ".npy"
    elif fmt == "tiff" or modality == "microscopy":
        main = ".tif"
    else:
        main = ".nii.gz"
    files = {"path": base + main if main else "", "preview": base + ".png"}
    if masked:
        files["mask"] = base + "_mask" + (main if main and main != ".npy" else ".png")
    return files


def write_npy(path: Path, x01: np.ndarray) -> None:
    """Raw model output ``(C, H, W)`` in [0, 1] as float32 .npy."""
    with atomic_path(path) as tmp:
        np.save(tmp, x01.astype(np.float32))


def _write_sample(out: Path, files: dict[str, str], x01: np.ndarray, mask: np.ndarray | None,
                  phys: np.ndarray, modality: str, spacing: tuple[float, float]) -> tuple[int, int]:
    """Write the files of one sample that do not exist yet; returns ``(written, already there)``."""
    unit = _spacing_unit(modality)

    def physical(p: Path, arr: np.ndarray) -> None:
        (write_tiff if p.suffix == ".tif" else write_nifti)(p, arr, spacing, unit)

    raw = files["path"].endswith(".npy")
    contents = {"preview": x01, "path": x01 if raw else to_file_dtype(phys, modality),
                "mask": None if mask is None else (mask > 0.5).astype(np.uint8)}
    written = skipped = 0
    for key, rel in files.items():
        if not rel:
            continue
        p = out / rel
        if p.exists():  # written atomically, so complete
            skipped += 1
        elif p.suffix == ".png":
            write_png(p, contents[key].astype(np.float32))
            written += 1
        elif p.suffix == ".npy":
            write_npy(p, contents[key])
            written += 1
        else:
            physical(p, contents[key])
            written += 1
    return written, skipped


# --------------------------------------------------------------------------- inputs
def _load_model(path: Path, device: torch.device):
    from medvae.engine.checkpoint import load_model

    return load_model(path, device=device, ema=True)


def _run_store(run: Path, ckpt_path: Path) -> Path:
    """The store a run trained on, from ``RUN/run.json`` (RUN or the checkpoint's run directory)."""
    for cand in (run / "run.json", ckpt_path.parent.parent / "run.json"):
        if cand.is_file():
            store = json.loads(cand.read_text(encoding="utf-8")).get("store")
            if store:
                return Path(store)
    raise InputError(f"{run}: no run.json naming the training store; give the --out of `medvae train`")


def _check_params(out: Path, params: dict) -> None:
    """A re-run into OUT must use the arguments the files there were made with."""
    path = out / "generation.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text(encoding="utf-8")).get("params", {})
    diff = [f"{k}: {old.get(k)!r} -> {params[k]!r}" for k in PARAM_KEYS if old.get(k) != params[k]]
    if diff:
        raise InputError(f"{out}: holds a generation made with other settings ({'; '.join(diff)}); "
                         "use another --out or delete it")


def _renormalize(x01: np.ndarray, modality: str, src: PatchStore, dst: PatchStore) -> np.ndarray:
    """Re-express [0, 1] values of ``src``'s normalization in ``dst``'s (same physical values)."""
    a, b = src.normalization(modality), dst.normalization(modality)
    if (a["low"], a["high"]) == (b["low"], b["high"]):
        return x01
    return np.clip((src.to_physical(x01, modality) - b["low"]) / (b["high"] - b["low"]), 0, 1)


# --------------------------------------------------------------------------- generate
def generate(run, out, config: GenerateConfig, device: str = "auto", mix_with=None, ratio: float = 1.0,
             progress=None) -> dict:
    """Write ``config.n`` synthetic samples of a trained run in physical units, audited.

    Args:
        run: the run directory of ``medvae train`` (or a checkpoint file inside one).
        out: output directory (see the module docstring for its layout).
        config: GenerateConfig (n, seed, format, batch_size, temperature, checkpoint,
            audit_percentile, drop_flagged).
        device: ``auto|cpu|cuda``; decoding and the audit run there.
        mix_with: a real patch store: also write ``OUT/augmented_store`` with all its patches plus
            ``round(ratio * its train patches)`` unflagged synthetic ones (split ``train``); samples
            past ``n`` are decoded (not written as files) when the ``n`` generated are too few.
        progress: optional callback ``progress(done, total)`` after each batch.

    Returns:
        The ``generation.json`` summary dict.
    """
    t_start = time.perf_counter()
    run, out = Path(run), Path(out)
    if config.seed < 0:
        raise InputError(f"--seed {config.seed}: must be >= 0")
    dev = select_device(device)
    ckpt_path = resolve_checkpoint(run, config.checkpoint)
    ckpt_sha = sha256_file(ckpt_path)
    model, meta = _load_model(ckpt_path, dev)
    model.eval()
    store = open_store(_run_store(run, ckpt_path))
    if meta.get("store_hash") and meta["store_hash"] != store.content_hash:
        log.warning("%s: the store changed since %s was trained (hash differs)", store.path, ckpt_path.name)
    chans = int(store.meta["channels"])
    masked = store.labels is not None and int(model.config.in_channels) == chans + 1
    params = {"run": str(run.resolve()), "checkpoint": str(ckpt_path.resolve()),
              "checkpoint_sha256": ckpt_sha,
              "store": str(store.path.resolve()), "store_hash": store.content_hash, "seed": config.seed,
              "n": config.n, "temperature": config.temperature, "format": config.format,
              "batch_size": config.batch_size, "drop_flagged": config.drop_flagged,
              "audit_percentile": config.audit_percentile, "conditioned_on_labels": masked}
    _check_params(out, params)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "generation.json", {"status": "running", "params": params})

    mix = open_store(mix_with) if mix_with is not None else None
    n_mix = int(round(ratio * mix.select(split="train").size)) if mix is not None else 0
    if mix is not None and tuple(mix.patches.shape[1:]) != tuple(store.patches.shape[1:]):
        raise InputError(f"{mix.path}: patches {tuple(mix.patches.shape[1:])} do not match the model's "
                         f"{tuple(store.patches.shape[1:])}; mix with a store of the same patch size and "
                         "channels")

    timings = {"load": time.perf_counter() - t_start, "decode": 0.0, "audit": 0.0, "write": 0.0}
    t = time.perf_counter()
    ref = audit.build_reference(store, dev, percentile=config.audit_percentile)
    timings["audit"] += time.perf_counter() - t

    rows, mix_x, mix_m, mix_rows = [], [], [], []
    all_nn: dict[str, list[float]] = {s: [] for s in audit.SPACES}
    counts = {"written_files": 0, "skipped_existing": 0, "flagged": 0, "dropped": 0}
    limit = config.n + 2 * n_mix + config.batch_size  # when most samples are flagged, stop (and warn)
    start = 0
    # zlib / PNG encoding release the GIL: a few threads write one batch's files in parallel
    with ThreadPoolExecutor(max_workers=4) as pool, _deterministic_cudnn(), torch.inference_mode():
        while start < config.n or (len(mix_rows) < n_mix and start < limit):
            stop = start + config.batch_size if n_mix else min(start + config.batch_size, config.n)
            t = time.perf_counter()
            z = latents(config.seed, start, stop, int(model.latent_dim), config.temperature)
            x = model.decode(z.to(dev)).float().clamp_(0, 1)
            x_np = x.cpu().numpy()
            timings["decode"] += time.perf_counter() - t
            t = time.perf_counter()
            res = audit.audit_batch(ref, audit.features(x[:, :chans]))
            timings["audit"] += time.perf_counter() - t
            t = time.perf_counter()
            jobs = []
            for j, i in enumerate(range(start, stop)):
                mod, flagged = str(res["modality"][j]), bool(res["flagged"][j])
                img, mask = x_np[j, :chans], (x_np[j, chans:] if masked else None)
                if i < config.n:
                    sid = f"{i:06d}"
                    drop = flagged and config.drop_flagged
                    files = {k: "" for k in ("path", "preview", "mask")}
                    if not drop:
                        files.update(_sample_files(sid, mod, config.format, masked))
                        phys = store.to_physical(img, mod)
                        jobs.append(pool.submit(_write_sample, out, files, img, mask, phys, mod,
                                                store.spacing(mod)))
                    counts["flagged"] += flagged
                    counts["dropped"] += drop
                    for s in audit.SPACES:
                        all_nn[s].append(float(res[s][j]))
                    rows.append({"id": sid, "modality": mod, **files, "seed": config.seed,
                                 "checkpoint_sha256": ckpt_sha, "latent_norm": f"{float(z[j].norm()):.6g}",
                                 "nearest_train_distance": f"{res['pixel'][j]:.6g}",
                                 "nearest_train_distance_features": f"{res['feature'][j]:.6g}",
                                 "nearest_train_patient": res["patient"][j], "flagged": int(flagged)})
                if mix is not None and not flagged and len(mix_rows) < n_mix:
                    mix_x.append(_renormalize(img, mod, store, mix).astype(np.float16))
                    mix_m.append((mask > 0.5).astype(np.uint8) if mask is not None else None)
                    mix_rows.append((mod, f"seed{config.seed}/{i:06d}"))
            for job in jobs:
                written, skipped = job.result()
                counts["written_files"] += written
                counts["skipped_existing"] += skipped
            timings["write"] += time.perf_counter() - t
            start = stop
            if progress is not None:
                progress(min(start, config.n), config.n)

    t = time.perf_counter()
    with atomic_open(out / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    all_nn = {s: np.asarray(v) for s, v in all_nn.items()}
    audit.plot_audit(out / "audit.png", ref, all_nn)
    augmented = None
    if mix is not None:
        if len(mix_rows) < n_mix:
            log.warning("augmented store: only %d of %d synthetic patches passed the audit",
                        len(mix_rows), n_mix)
        augmented = write_augmented_store(out / "augmented_store", mix, mix_x, mix_m, mix_rows, params, ratio)
    timings["write"] += time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start

    line = audit.summary_line(ref, config.n, counts["flagged"], config.drop_flagged)
    log.info(line)
    per_mod = {m: sum(r["modality"] == m for r in rows) for m in sorted({r["modality"] for r in rows})}
    summary = {
        "status": "done", "params": params,
        "counts": {"samples": config.n, "per_modality": per_mod, **counts},
        "audit": {"summary": line, "percentile": config.audit_percentile, "thresholds": ref.thresholds,
                  "flagged": counts["flagged"], "train_patches": int(ref.rows.size),
                  "calibration_pairs": int(ref.real_nn["pixel"].size), "notes": ref.notes,
                  "sample_nn_median": {s: float(np.median(v)) if v.size else None for s, v in all_nn.items()},
                  "real_nn_median": {s: float(np.median(v)) if v.size else None
                                     for s, v in ref.real_nn.items()},
                  "figure": "audit.png"},
        "augmented_store": augmented,
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "samples_per_s": round(config.n / max(timings["total"], 1e-9), 2),
        "device": str(dev),
    }
    write_json(out / "generation.json", summary)
    return summary


def write_augmented_store(path: Path, real: PatchStore, syn_x: list, syn_m: list, syn_rows: list,
                          params: dict, ratio: float) -> dict:
    """All patches of ``real`` + the synthetic ones (split ``train``), with ``source`` real|synthetic.

    The real rows keep their index values; their original ``source`` moves to the extra column
    ``origin`` (for synthetic rows: the sample id). Labels are kept only when every synthetic
    patch has a generated mask.
    """
    n_real, n_syn = len(real), len(syn_rows)
    dtype = real.meta.get("dtype", "float16")
    real_x = np.asarray(real.patches) if dtype == "float16" else real.get(slice(None))
    shape = real.patches.shape[1:]
    syn = np.stack(syn_x).astype(real_x.dtype) if n_syn else np.zeros((0, *shape), real_x.dtype)
    patches = np.concatenate([real_x, syn])
    labels = None
    if real.labels is not None and all(m is not None for m in syn_m):
        syn_lab = np.stack(syn_m) if n_syn else np.zeros((0, *real.labels.shape[1:]), np.uint8)
        labels = np.concatenate([np.asarray(real.labels), syn_lab])
    elif real.labels is not None:
        log.warning("augmented store: the model generates no masks, so the store is written without labels")
    idx = real.index
    index = {
        "patient_id": [*idx["patient_id"], *(["synthetic"] * n_syn)],
        "modality": [*idx["modality"], *(m for m, _ in syn_rows)],
        "split": [*idx["split"], *(["train"] * n_syn)],
        "slice_index": [*idx["slice_index"], *([-1] * n_syn)],
        "y": [*idx["y"], *([-1] * n_syn)],
        "x": [*idx["x"], *([-1] * n_syn)],
        "foreground_fraction": [*idx["foreground_fraction"], *([float("nan")] * n_syn)],  # not measured
        "source": ["real"] * n_real + ["synthetic"] * n_syn,
        "origin": [*idx["source"], *(sid for _, sid in syn_rows)],
    }
    info = {"real_store": str(real.path.resolve()), "real_store_hash": real.content_hash,
            "checkpoint_sha256": params["checkpoint_sha256"], "seed": params["seed"],
            "temperature": params["temperature"], "ratio": ratio, "n_real": n_real, "n_synthetic": n_syn,
            "n_real_train": int(real.select(split="train").size)}
    meta = {k: real.meta[k] for k in ("config", "normalization", "spacing", "volumes") if k in real.meta}
    meta.update(dtype=dtype, content_hash=sha256_json(info), augmented=info)
    write_store(path, patches, index, meta, labels=labels)
    log.info("augmented store %s: %d real + %d synthetic patches", path, n_real, n_syn)
    return {"path": "augmented_store", **info}

"""`medvae denoise RUN INPUT --out OUTPUT`: every slice of every scan, at native resolution, written
back in the input's own format and geometry.

- Inputs: a NIfTI or TIFF file, a DICOM series directory, a directory holding any of these, or a
  manifest (``.csv`` of `medvae discover`; its ``ok`` rows).
- Intensities go to the model's [0, 1] scale with the normalization of the store the run was
  trained on (CT: the store's HU window; microscopy and MR: the stack's own percentiles, computed
  by prepare's :func:`medvae.data.transforms.normalization_constants` with the store's
  ``PrepareConfig``), and back to physical units afterwards. CT voxels outside the window pass through unchanged (the
  model never saw them).
- Slices are denoised whole (batches of ``batch_size`` slices, padded to the model's multiple),
  or with MONAI's ``sliding_window_inference`` (``tile`` > 0: gaussian-blended tiles with
  ``overlap``) where memory requires; GPU when present. Inference mode and channels_last
  (float rounding apart, fp32's values); ``amp: bf16`` is ~3x faster on CPUs with AMX, its outputs
  within ~1e-2 of fp32's on the [0, 1] scale. Threads: torch's (all cores).
- Outputs: NIfTI with the input's affine and header (same data type), ImageJ TIFF with the input's
  µm spacing and dtype, DICOM series -> NIfTI (int16 HU, the series' RAS affine). Each file is
  written atomically (``medvae.files.atomic_path``), and an existing output is skipped, so an
  interrupted run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from medvae.config import DenoiseConfig, PrepareConfig
from medvae.data.manifest import read_manifest
from medvae.data.transforms import normalization_constants
from medvae.errors import InputError
from medvae.files import atomic_path
from medvae.io import load_volume
from medvae.io.formats import NIFTI_SUFFIXES, TIFF_SUFFIXES, scan_format, scan_stem
from medvae.io.writers import write_tiff
from medvae.training.checkpoint import load_model
from medvae.training.rundir import RunDir

log = logging.getLogger(__name__)


def find_inputs(path: str | os.PathLike) -> list[Path]:
    """The scans named by ``path``: itself (file or DICOM directory), a manifest's ok rows, or the
    NIfTI / TIFF files and DICOM series directories under a directory, sorted."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return [Path(r.path) for r in read_manifest(path) if r.status == "ok"]
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"{path}: input not found; give a scan file, a scan directory or a manifest")
    found: list[Path] = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        names = sorted(files)
        scans = [Path(root) / f for f in names if f.lower().endswith(NIFTI_SUFFIXES + TIFF_SUFFIXES)]
        found += scans
        rest = [f for f in names if not f.startswith(".") and Path(root, f) not in scans]
        if rest and any(f.lower().endswith(".dcm") or "." not in f for f in rest):
            found.append(Path(root))  # a DICOM series folder
    if not found:
        raise InputError(f"{path}: no NIfTI, TIFF or DICOM scans found under it")
    return found


def output_path(src: Path, fmt: str, out: Path, single: bool) -> Path:
    """Where a scan's denoised copy goes: ``out`` itself for one file given a file name, else
    ``out/<scan stem>`` + the input's suffix (``.nii.gz`` for DICOM)."""
    suffix = ".nii.gz" if fmt == "dicom" else next(s for s in NIFTI_SUFFIXES + TIFF_SUFFIXES
                                                    if src.name.lower().endswith(s))
    if single and out.name.lower().endswith(NIFTI_SUFFIXES + TIFF_SUFFIXES):
        return out
    return out / f"{scan_stem(src)}{suffix}"


class SliceDenoiser:
    """A trained denoise run applied to ``(N, H, W)`` stacks of [0, 1] slices.

    Args:
        run: run directory of a ``task: denoise`` training.
        cfg: DenoiseConfig (checkpoint, batch size, tile / overlap).
        device: torch device.
    """

    def __init__(self, run, cfg: DenoiseConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        run_dir = RunDir(run)
        self.model, self.meta = load_model(run_dir.checkpoint(cfg.checkpoint), device=device)
        if not hasattr(self.model, "denoise"):
            raise InputError(f"{run}: model {self.meta.get('model_config', {}).get('name')} is not fully "
                             "convolutional; train --model dae or unet-vae with --task denoise")
        self.store = run_dir.store() if run_dir.info() else None
        # the settings the training patches were normalized with (defaults for a run without its store)
        saved = (self.store.meta.get("config") or {}) if self.store is not None else {}
        self.prepare_config = PrepareConfig(**{k: v for k, v in saved.items() if k in PrepareConfig.model_fields})
        # channels_last: oneDNN's (and cuDNN's) native layout for these convolutions, ~1.35x faster on the
        # CPU; the same arithmetic up to float rounding (1e-7 on the [0, 1] scale)
        self.channels_last = device.type in ("cpu", "cuda")
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size or (1 if self.device.type == "cpu" else 8)

    def _autocast(self):
        if self.cfg.amp != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @torch.inference_mode()
    def __call__(self, slices: np.ndarray, on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        out = np.empty(slices.shape, np.float32)
        for i in range(0, len(slices), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(slices[i:i + self.batch_size], np.float32))
            x = x[:, None].to(self.device)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                if self.cfg.tile > 0:
                    from monai.inferers import sliding_window_inference  # MONAI import is slow; only when tiling

                    y = sliding_window_inference(x, (self.cfg.tile, self.cfg.tile), x.shape[0],
                                                 lambda t: self.model.denoise(t), overlap=self.cfg.overlap,
                                                 mode="gaussian")
                else:
                    y = self.model.denoise(x)
            out[i:i + len(x)] = y[:, 0].float().cpu().numpy()
            if on_batch is not None:
                on_batch(len(x))
        return out

    def window(self, volume: np.ndarray, modality: str) -> tuple[float, float]:
        """(low, high) mapping ``volume`` to [0, 1] as prepare mapped the training patches: CT the store's
        HU window; otherwise (or without one) the stack's own percentiles, as prepare normalizes a
        microscopy or MR stack (a constant stack gets a window of width 1)."""
        if modality == "ct" and self.store is not None and "ct" in self.store.meta.get("normalization", {}):
            n = self.store.normalization("ct")
            return float(n["low"]), float(n["high"])
        n = normalization_constants(volume, "microscopy", self.prepare_config)
        lo, hi = float(n["low"]), float(n["high"])
        return lo, hi if hi > lo else lo + 1.0

    def volume(self, volume: np.ndarray, modality: str, on_batch=None) -> np.ndarray:
        """Denoise ``(..., Y, X)`` in physical units slice by slice; physical units back."""
        lo, hi = self.window(volume, modality)
        flat = volume.reshape(-1, *volume.shape[-2:]).astype(np.float32)
        x01 = (flat - lo) / (hi - lo)
        den = lo + self(np.clip(x01, 0, 1) if modality == "ct" else x01, on_batch) * (hi - lo)
        if modality == "ct":  # outside the window the model saw nothing: keep the input
            den = np.where((x01 >= 0) & (x01 <= 1), den, flat)
        return den.reshape(volume.shape)


def _cast(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(arr), info.min, info.max).astype(dtype)
    return arr.astype(dtype)


def _nifti(den: SliceDenoiser, src: Path, dst: Path, modality: str, on_batch) -> int:
    import nibabel as nib

    img = nib.load(str(src))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim < 2 or data.ndim > 3:
        raise InputError(f"{src}: {data.ndim}D NIfTI; denoise takes 2D or 3D volumes")
    zyx = data.T if data.ndim == 3 else data.T[None]  # (k, j, i): slices along the third voxel axis
    out = den.volume(zyx, modality, on_batch).T.reshape(data.shape)
    hdr = img.header.copy()
    new = nib.Nifti1Image(_cast(out, hdr.get_data_dtype()) if hdr.get_slope_inter()[0] in (None, 1.0)
                          else out, img.affine, hdr)
    new.set_qform(img.get_qform(), code=int(img.header["qform_code"]))
    new.set_sform(img.get_sform(), code=int(img.header["sform_code"]))
    with atomic_path(dst) as tmp:
        nib.save(new, tmp)
    return zyx.shape[0]


def _tiff(den: SliceDenoiser, src: Path, dst: Path, on_batch) -> int:
    import tifffile

    with tifffile.TiffFile(str(src)) as tif:
        dtype = tif.series[0].dtype
    vol = load_volume(src)
    out = den.volume(vol.array, "microscopy", on_batch)
    axes = "CZYX" if out.ndim == 4 else "ZYX"
    write_tiff(dst, _cast(out, dtype) if dtype in (np.uint8, np.uint16) else out.astype(np.float32), axes,
               vol.spacing, unit="um")
    return int(np.prod(out.shape[:-2]))


def _dicom(den: SliceDenoiser, src: Path, dst: Path, on_batch) -> int:
    import nibabel as nib

    vol = load_volume(src)
    out = den.volume(vol.array, "ct", on_batch)
    affine = vol.affine if vol.affine is not None else np.diag([*vol.spacing[::-1], 1.0])
    img = nib.Nifti1Image(_cast(out, np.dtype(np.int16)).transpose(2, 1, 0), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    with atomic_path(dst) as tmp:
        nib.save(img, tmp)
    return out.shape[0]


def denoise_scans(run, inputs, out, cfg: DenoiseConfig | None = None, device: torch.device | str = "cpu",
                  on_batch: Callable[[int], None] | None = None,
                  on_file: Callable[[Path, Path, bool], None] | None = None) -> list[dict]:
    """Denoise every scan named by ``inputs`` into ``out``; returns one dict per scan
    (``input, output, format, slices, skipped``). ``on_batch(n)`` after each batch of n slices and
    ``on_file(src, dst, skipped)`` before each scan drive a progress display."""
    cfg = cfg or DenoiseConfig()
    device = torch.device(device)
    den = SliceDenoiser(run, cfg, device)
    srcs, out = find_inputs(inputs), Path(out)
    single = len(srcs) == 1 and not Path(inputs).suffix.lower() == ".csv"
    done = []
    for src in srcs:
        fmt = scan_format(src)
        dst = output_path(src, fmt, out, single)
        skipped = dst.exists()
        if on_file is not None:
            on_file(src, dst, skipped)
        n = 0
        if not skipped:
            modality = "microscopy" if fmt == "tiff" else ("ct" if cfg.modality == "auto" else cfg.modality)
            if fmt == "nifti":
                n = _nifti(den, src, dst, modality, on_batch)
            elif fmt == "tiff":
                n = _tiff(den, src, dst, on_batch)
            else:
                n = _dicom(den, src, dst, on_batch)
        done.append({"input": str(src), "output": str(dst), "format": fmt, "slices": n, "skipped": skipped})
    return done

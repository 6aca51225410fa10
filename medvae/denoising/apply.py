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
  (float rounding apart, fp32's values); ``amp: auto`` (the default) runs the model in bf16 where the
  device has it (:func:`medvae.training.runtime.resolve_amp`), ~3x faster on CPUs with AMX, its outputs
  within ~1e-2 of fp32's on the [0, 1] scale and cast to float32 before anything is written; ``off``
  is fp32. Threads: torch's (all cores).
- unet-vae runs (DivNoising): ``samples`` N > 0 returns the MMSE estimate, the mean of N posterior
  samples' clean estimates (a generator seeded with ``seed`` anew for every scan), and ``sd`` also
  writes their per-pixel sample sd in physical units (float32) as ``<stem>_sd`` + the suffix beside
  each output (0 outside a CT window). n2v / n2s ``--posterior`` runs (a dae with ``model.prior``):
  the output is the posterior mean given each noisy pixel, and ``sd`` writes the closed-form
  posterior sd the same way (no samples). A scan is done when its output exists (the sd is written
  first).
- Outputs: NIfTI with the input's affine and header (same data type), ImageJ TIFF with the input's
  µm spacing and dtype, DICOM series -> NIfTI (int16 HU, the series' RAS affine). Each file is
  written atomically (``medvae.files.atomic_path``), and an existing output is skipped, so an
  interrupted run resumes where it stopped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from medvae.config import DenoiseConfig, PrepareConfig
from medvae.data.manifest import read_manifest
from medvae.data.transforms import normalization_constants
from medvae.errors import ConfigError, InputError
from medvae.files import atomic_path
from medvae.io import load_volume
from medvae.io.formats import NIFTI_SUFFIXES, TIFF_SUFFIXES, scan_format, scan_stem
from medvae.io.writers import write_tiff
from medvae.models import UNetVAE
from medvae.training.checkpoint import load_model
from medvae.training.rundir import RunDir
from medvae.training.runtime import autocast, precision_name, resolve_amp

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
        self.amp_dtype = resolve_amp(cfg.amp, device)
        run_dir = RunDir(run)
        self.model, self.meta = load_model(run_dir.checkpoint(cfg.checkpoint), device=device)
        name = self.meta.get("model_config", {}).get("name")
        if not hasattr(self.model, "denoise"):
            raise InputError(f"{run}: model {name} is not fully convolutional; train --model dae or unet-vae "
                             "with --task denoise")
        # n2v --posterior: a dae predicting a prior, whose posterior sd is in closed form (no samples)
        prior = bool(getattr(self.model.config, "prior", False))
        if (cfg.samples > 0 or (cfg.sd and not prior)) and not isinstance(self.model, UNetVAE):
            raise ConfigError(f"{run}: model {name} is deterministic: posterior samples (--samples, --sd) need a "
                              "unet-vae run (e.g. --objective divnoising); --sd alone also an n2v --posterior run")
        if cfg.sd and not prior and cfg.samples < 2:
            raise ConfigError(f"--sd needs at least 2 posterior samples (--samples N), got {cfg.samples}")
        self.generator = torch.Generator().manual_seed(cfg.seed)
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

    def reseed(self) -> None:
        """Restart the posterior samples' generator at ``cfg.seed`` (before each scan)."""
        self.generator.manual_seed(self.cfg.seed)

    def _predict(self, t: torch.Tensor) -> torch.Tensor:
        """The model's denoised ``t`` (MMSE of ``cfg.samples`` posterior samples when > 0), with the
        posterior sd as a second block of channels when ``cfg.sd``."""
        if self.cfg.sd:
            return torch.cat(self.model.denoise(t, self.cfg.samples, self.generator, return_sd=True), 1)
        return self.model.denoise(t, self.cfg.samples, self.generator) if self.cfg.samples else self.model.denoise(t)

    def __call__(self, slices: np.ndarray, on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """Denoised ``(N, H, W)`` [0, 1] slices (the MMSE estimate with ``cfg.samples``)."""
        return self._run(slices, on_batch)[0]

    @torch.inference_mode()
    def _run(self, slices: np.ndarray, on_batch) -> tuple[np.ndarray, np.ndarray | None]:
        out = np.empty(slices.shape, np.float32)
        sd = np.empty(slices.shape, np.float32) if self.cfg.sd else None
        for i in range(0, len(slices), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(slices[i:i + self.batch_size], np.float32))
            x = x[:, None].to(self.device)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.amp_dtype):
                if self.cfg.tile > 0:
                    from monai.inferers import sliding_window_inference  # MONAI import is slow; only when tiling

                    y = sliding_window_inference(x, (self.cfg.tile, self.cfg.tile), x.shape[0], self._predict,
                                                 overlap=self.cfg.overlap, mode="gaussian")
                else:
                    y = self._predict(x)
            out[i:i + len(x)] = y[:, 0].float().cpu().numpy()
            if sd is not None:
                sd[i:i + len(x)] = y[:, 1].float().cpu().numpy()
            if on_batch is not None:
                on_batch(len(x))
        return out, sd

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

    def volume(self, volume: np.ndarray, modality: str, on_batch=None):
        """Denoise ``(..., Y, X)`` in physical units slice by slice; physical units back. With
        ``cfg.sd`` returns ``(denoised, posterior sd)``, the sd in physical units too."""
        lo, hi = self.window(volume, modality)
        flat = volume.reshape(-1, *volume.shape[-2:]).astype(np.float32)
        x01 = (flat - lo) / (hi - lo)
        self.reseed()
        den01, sd01 = self._run(np.clip(x01, 0, 1) if modality == "ct" else x01, on_batch)
        den = lo + den01 * (hi - lo)
        sd = sd01 * (hi - lo) if sd01 is not None else None
        if modality == "ct":  # outside the window the model saw nothing: keep the input
            inside = (x01 >= 0) & (x01 <= 1)
            den = np.where(inside, den, flat)
            sd = np.where(inside, sd, 0.0).astype(np.float32) if sd is not None else None
        if sd is None:
            return den.reshape(volume.shape)
        return den.reshape(volume.shape), sd.reshape(volume.shape)


def _cast(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(arr), info.min, info.max).astype(dtype)
    return arr.astype(dtype)


def sd_path(dst: Path) -> Path:
    """Where a scan's posterior sd goes: ``<stem>_sd`` + the output's suffix, beside it."""
    suffix = next((s for s in NIFTI_SUFFIXES + TIFF_SUFFIXES if dst.name.lower().endswith(s)), dst.suffix)
    return dst.with_name(f"{dst.name[: len(dst.name) - len(suffix)]}_sd{suffix}")


def _split(result, want_sd: bool):
    return result if want_sd else (result, None)


def _nifti(den: SliceDenoiser, src: Path, dst: Path, modality: str, on_batch) -> int:
    import nibabel as nib

    img = nib.load(str(src))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim < 2 or data.ndim > 3:
        raise InputError(f"{src}: {data.ndim}D NIfTI; denoise takes 2D or 3D volumes")
    zyx = data.T if data.ndim == 3 else data.T[None]  # (k, j, i): slices along the third voxel axis
    out, sd = _split(den.volume(zyx, modality, on_batch), den.cfg.sd)
    out = out.T.reshape(data.shape)
    hdr = img.header.copy()

    def save(arr: np.ndarray, header, path: Path) -> None:
        new = nib.Nifti1Image(arr, img.affine, header)
        new.set_qform(img.get_qform(), code=int(img.header["qform_code"]))
        new.set_sform(img.get_sform(), code=int(img.header["sform_code"]))
        with atomic_path(path) as tmp:
            nib.save(new, tmp)

    if sd is not None:
        sd_hdr = img.header.copy()
        sd_hdr.set_data_dtype(np.float32)
        sd_hdr.set_slope_inter(1.0, 0.0)
        save(sd.T.reshape(data.shape).astype(np.float32), sd_hdr, sd_path(dst))
    save(_cast(out, hdr.get_data_dtype()) if hdr.get_slope_inter()[0] in (None, 1.0) else out, hdr, dst)
    return zyx.shape[0]


def _tiff(den: SliceDenoiser, src: Path, dst: Path, on_batch) -> int:
    import tifffile

    with tifffile.TiffFile(str(src)) as tif:
        dtype = tif.series[0].dtype
    vol = load_volume(src)
    out, sd = _split(den.volume(vol.array, "microscopy", on_batch), den.cfg.sd)
    axes = "CZYX" if out.ndim == 4 else "ZYX"
    if sd is not None:
        write_tiff(sd_path(dst), sd.astype(np.float32), axes, vol.spacing, unit="um")
    write_tiff(dst, _cast(out, dtype) if dtype in (np.uint8, np.uint16) else out.astype(np.float32), axes,
               vol.spacing, unit="um")
    return int(np.prod(out.shape[:-2]))


def _dicom(den: SliceDenoiser, src: Path, dst: Path, on_batch) -> int:
    import nibabel as nib

    vol = load_volume(src)
    out, sd = _split(den.volume(vol.array, "ct", on_batch), den.cfg.sd)
    affine = vol.affine if vol.affine is not None else np.diag([*vol.spacing[::-1], 1.0])
    for arr, path in ([(sd.astype(np.float32), sd_path(dst))] if sd is not None else []) + \
            [(_cast(out, np.dtype(np.int16)), dst)]:
        img = nib.Nifti1Image(arr.transpose(2, 1, 0), affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units(xyz="mm")
        with atomic_path(path) as tmp:
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
    log.info("denoising in %s on %s (amp: %s)", precision_name(den.amp_dtype), device, cfg.amp)
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

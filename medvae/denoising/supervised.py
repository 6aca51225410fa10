"""The supervised denoise training task (beside :mod:`medvae.denoising.selfsupervised`): each clean
batch becomes ``(noisy input, clean target)``, and validation scores the denoised val patches.

The noise of step ``s`` comes from a generator seeded with ``(train.seed, s)``
(:func:`medvae.denoising.noise.step_generator`) and depends on nothing else, so a run resumed from a
checkpoint draws exactly the noise an uninterrupted run draws. Per-patch constants (the store's
normalization ``low`` / ``high`` of the patch's volume, its pixel size in mm) are looked up once
per store row and indexed with the batch's ``rows``. :class:`DenoiseTask` implements the
trainer's task interface (:class:`medvae.training.tasks.Task`).
"""

from __future__ import annotations

import numpy as np
import torch

from medvae.config import NoiseConfig, TrainConfig
from medvae.data.loader import Batch
from medvae.data.store import PatchStore
from medvae.denoising import noise
from medvae.errors import ConfigError
from medvae.metrics import images as metrics
from medvae.training.runtime import full_precision
from medvae.training.tasks import TrainingPair
from medvae.training.validate import over_batches

VAL_SEED_OFFSET = 7919  # validation noise stream: (seed + offset, batch index), never a training step's


def row_constants(store: PatchStore) -> dict[str, np.ndarray]:
    """Per store row: ``low``, ``high`` (the volume's own normalization, else the modality's) and
    ``pixel_mm`` (the modality's in-plane spacing; µm / 1000 for microscopy)."""
    pids, mods = store.index["patient_id"].astype(str), store.index["modality"].astype(str)
    low, high, pix = (np.zeros(len(store), np.float32) for _ in range(3))
    for pid, mod in sorted(set(zip(pids.tolist(), mods.tolist()))):
        m = (pids == pid) & (mods == mod)
        try:
            norm = store.normalization(mod, pid)
        except KeyError:
            norm = store.normalization(mod)
        low[m], high[m] = float(norm["low"]), float(norm["high"])
        try:
            sy, sx = store.spacing(mod)
            pix[m] = float(np.sqrt(sy * sx)) / (1000.0 if mod == "microscopy" else 1.0)
        except KeyError:
            pix[m] = 1.0
    if np.any(high <= low):
        raise ConfigError(f"{store.path}: a volume's normalization has high <= low; the noise models need "
                          "a positive intensity range")
    return {"low": low, "high": high, "pixel_mm": pix}


def random_crop(size: int, gen: torch.Generator, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same random ``size``² window of each of ``xs`` ``(B, C, H, W)`` (one window for the whole
    batch, drawn from ``gen``); ``xs`` as they are when ``size`` is 0 or not smaller than the patch.
    Every denoise objective's ``noise.crop``."""
    h, w = xs[0].shape[-2:]
    if not 0 < size < min(h, w):
        return xs
    y0, x0 = (int(v) for v in torch.randint(0, min(h, w) - size + 1, (2,), generator=gen, device=gen.device))
    return tuple(x[..., y0:y0 + size, x0:x0 + size] for x in xs)


def random_symmetry(gen: torch.Generator, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each of ``xs`` ``(B, C, H, W)`` turned by the same one of the square's 8 symmetries (k quarter turns, then
    a transpose or not), drawn from ``gen``: ``noise.flips``. CT noise simulated over 180° of parallel-beam
    projections and Poisson-Gaussian noise have no preferred orientation, so every turn is a plausible patch."""
    k = int(torch.randint(0, 8, (1,), generator=gen, device=gen.device))
    out = tuple(torch.rot90(x, k % 4, dims=(-2, -1)) for x in xs)
    return tuple(x.transpose(-2, -1) for x in out) if k >= 4 else out


class DenoiseTask:
    """Corrupts training batches and validates denoising; one per training run. best.pt is the best
    val PSNR; denoisers take no class / modality condition.

    Args:
        store: the patch store trained on.
        cfg: NoiseConfig (kind, level range, read noise, CT photons / angles).
        seed: the run's ``train.seed``.
    """

    name = "denoise"
    best_key = "psnr"
    conditional = False

    def __init__(self, store: PatchStore, cfg: NoiseConfig, seed: int):
        self.store, self.cfg, self.seed = store, cfg, int(seed)
        self.consts = row_constants(store)
        noise.level_range(cfg.kind, cfg.levels)  # validate the range early

    def corrupt(self, x: torch.Tensor, rows: np.ndarray, gen: torch.Generator,
                levels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noisy x, levels)`` for clean ``x`` of store ``rows``; levels sampled when None."""
        c = self.cfg
        if levels is None:
            levels = noise.sample_levels(c.kind, x.shape[0], gen, c.levels)
        k = {name: torch.from_numpy(v[rows]).to(x.device) for name, v in self.consts.items()}
        noisy = noise.corrupt(x.float(), c.kind, levels.to(x.device), gen, low=k["low"], high=k["high"],
                              pixel_mm=k["pixel_mm"], read_noise=c.read_noise, ct_photons=c.ct_photons,
                              ct_angles=c.ct_angles)
        return noisy.to(x.dtype), levels

    def training_pair(self, batch: Batch, step: int) -> TrainingPair:
        """``(noisy input, clean target)`` of training step ``step`` for the clean ``batch`` (``noise.target``
        noisy: a second noisy copy at the same levels as the target); with ``noise.crop`` both are the same random
        crop (the noise is made on the whole patch, so CT streaks keep their geometry), with ``noise.flips`` the
        same symmetry."""
        x = batch.x
        gen = noise.step_generator(self.seed, step, x.device)
        noisy, levels = self.corrupt(x, batch.rows, gen)
        target = self.corrupt(x, batch.rows, gen, levels)[0] if self.cfg.target == "noisy" else x
        pair = random_crop(self.cfg.crop, gen, noisy, target)
        return TrainingPair(*(random_symmetry(gen, *pair) if self.cfg.flips else pair))

    def validate(self, model: torch.nn.Module, tc: TrainConfig, device: torch.device,
                 channels_last: bool = False) -> dict[str, float]:
        """Mean ``psnr``, ``ssim``, ``mse`` of the denoised val patches and ``noisy_psnr`` of their
        noisy inputs, over the same patches and noise every time (levels across the whole range)."""

        def batch_metrics(i: int, rows: np.ndarray) -> dict[str, torch.Tensor]:
            x = torch.from_numpy(self.store.get(rows)).to(device)
            # the trainer validates under its autocast: the noise (the CT projector's sparse matmul has no
            # bf16 kernel on the CPU) and the metrics are float32, only the model runs in reduced precision
            with full_precision(device):
                noisy, _ = self.corrupt(x, rows, noise.step_generator(self.seed + VAL_SEED_OFFSET, i, device))
            out = model(noisy).x_hat.float().clamp(0, 1)
            with full_precision(device):
                return {"psnr": metrics.psnr(out, x), "ssim": metrics.ssim(out, x), "mse": metrics.mse(out, x),
                        "noisy_psnr": metrics.psnr(noisy.float(), x)}

        return over_batches(model, self.store, tc.batch_size, tc.val_batches, batch_metrics, torch.float64)

"""Noise models of the denoise task: Gaussian, Poisson–Gaussian (fluorescence) and low-dose CT.

Every model takes clean images ``x: (B, C, H, W)`` on the store's [0, 1] scale and per-image
constants (the store's normalization ``low``, ``high`` mapping [0, 1] back to counts / HU, the
pixel size), and returns a noisy copy on the same scale. Nothing is clipped: a noisy value may
leave [0, 1], as a real noisy measurement mapped by the same window would before clipping.

- ``gaussian``: ``x + sigma * N(0, 1)``; mean x, variance sigma².
- ``poisson-gaussian``: in the store's original counts ``c = low + x (high - low)`` (clamped at
  0), ``photons`` is the expected photon count at ``c = high``; ``y = Poisson(c * photons / high) +
  N(0, read_noise²)`` photons, mapped back to counts and to [0, 1]. Mean x, variance
  ``(lambda + read_noise²) / g² / (high - low)²`` with ``g = photons / high``, ``lambda = g c``.
- ``ct-lowdose``: HU -> linear attenuation (water 0.0192 /mm), parallel-beam line integrals p
  (:class:`ParallelBeam`), transmitted counts ``Poisson(N0 d e^-p)`` at dose fraction d of
  ``ct_photons`` = N0, log transform, and the projection-domain noise ``p_noisy - p`` reconstructed
  by filtered back-projection (ramp filter as scikit-image's ``iradon``) and added to the clean
  image: streaks along the most attenuating rays, as in low-dose CT. By the delta method the image
  variance is ``sum_k W_jk² e^{p_k} / (N0 d)`` with W the FBP operator.

Noise is drawn from a ``torch.Generator`` that the caller seeds (the trainer: from ``(seed,
step)``), so a resumed run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch

MU_WATER = 0.0192  # linear attenuation of water at ~70 keV, 1/mm
DEFAULT_LEVELS = {"gaussian": (0.02, 0.15), "poisson-gaussian": (5.0, 100.0), "ct-lowdose": (0.05, 0.25)}
LEVEL_NAMES = {"gaussian": "sigma", "poisson-gaussian": "photons", "ct-lowdose": "dose"}
_LOG_UNIFORM = ("poisson-gaussian", "ct-lowdose")  # scale parameters: sampled uniformly in log


def level_range(kind: str, levels=None) -> tuple[float, float]:
    """The ``(low, high)`` range of noise levels of ``kind`` (the config's or the default)."""
    lo, hi = levels if levels is not None else DEFAULT_LEVELS[kind]
    if not 0 < lo <= hi:
        raise ValueError(f"noise levels must satisfy 0 < low <= high, got {(lo, hi)}")
    return float(lo), float(hi)


def eval_levels(kind: str, levels=None, chosen=None) -> list[float]:
    """The levels evaluation reports: ``chosen``, else low, middle (geometric for scale
    parameters) and high of the range."""
    if chosen:
        return [float(v) for v in chosen]
    lo, hi = level_range(kind, levels)
    mid = math.sqrt(lo * hi) if kind in _LOG_UNIFORM else (lo + hi) / 2
    return [lo, mid, hi]


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from ``(seed, step)`` alone: the noise of a step does not depend on history."""
    state = int(np.random.SeedSequence([int(seed), int(step), 0x4E015E]).generate_state(1, np.uint64)[0])
    return torch.Generator(device=device).manual_seed(state & ((1 << 63) - 1))


def sample_levels(kind: str, n: int, gen: torch.Generator, levels=None) -> torch.Tensor:
    """(n,) float32 levels on ``gen``'s device: uniform in the range (log-uniform for photons, dose)."""
    lo, hi = level_range(kind, levels)
    u = torch.rand(n, generator=gen, device=gen.device)
    if kind in _LOG_UNIFORM:
        return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    return lo + u * (hi - lo)


def _per_image(v, x: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) value as a (B, 1, 1, 1) float32 tensor on x's device."""
    t = torch.as_tensor(v, dtype=torch.float32, device=x.device)
    return t.reshape(-1, 1, 1, 1) if t.dim() else t.reshape(1, 1, 1, 1)


def gaussian(x: torch.Tensor, sigma, gen: torch.Generator) -> torch.Tensor:
    """``x + sigma * N(0, 1)``; sigma a scalar or (B,) on the [0, 1] scale."""
    return x + _per_image(sigma, x) * torch.randn(x.shape, generator=gen, device=x.device)


def poisson_gaussian(x: torch.Tensor, low, high, photons, read_noise: float, gen: torch.Generator) -> torch.Tensor:
    """Photon shot noise plus camera read noise in the store's original counts (module docstring)."""
    low, high, photons = _per_image(low, x), _per_image(high, x), _per_image(photons, x)
    counts = (low + x * (high - low)).clamp_min(0.0)
    gain = photons / high.clamp_min(1e-6)  # photons per count
    y = torch.poisson(counts * gain, generator=gen)
    if read_noise > 0:
        y = y + read_noise * torch.randn(x.shape, generator=gen, device=x.device)
    return (y / gain - low) / (high - low)


def _ramp_filter(size: int) -> np.ndarray:
    """The ramp filter of scikit-image's ``iradon`` (from the spatial-domain Ram-Lak kernel), rfft half."""
    n = np.concatenate((np.arange(1, size / 2 + 1, 2, dtype=int), np.arange(size / 2 - 1, 0, -2, dtype=int)))
    f = np.zeros(size)
    f[0] = 0.25
    f[1::2] = -1 / (np.pi * n) ** 2
    return (2 * np.real(np.fft.fft(f)))[: size // 2 + 1]


class ParallelBeam:
    """Parallel-beam projector and filtered back-projection of ``(H, W)`` images, as sparse matrices.

    Pixel-driven: pixel (i, j) at the centred position (x, y) lands on detector coordinate
    ``t = x cos θ + y sin θ``, split linearly between the two nearest of ``n_det`` unit-width bins
    (the diagonal plus a margin); ``n_angles`` angles over [0°, 180°). Projection is ``A @ image``,
    back-projection ``Aᵀ``; FBP is ``π / (2 n_angles) · Aᵀ ramp(sinogram)`` as ``iradon``. Built once
    per size and device (:func:`parallel_beam`); lengths are in pixels.
    """

    def __init__(self, h: int, w: int, n_angles: int, device: torch.device | str = "cpu"):
        self.h, self.w, self.n_angles = h, w, n_angles
        self.n_det = int(math.ceil(math.hypot(h, w))) + 3
        theta = np.arange(n_angles) * np.pi / n_angles
        yy, xx = np.mgrid[:h, :w]
        xc, yc = (xx - (w - 1) / 2).ravel(), ((h - 1) / 2 - yy).ravel()
        t = np.cos(theta)[:, None] * xc[None] + np.sin(theta)[:, None] * yc[None] + (self.n_det - 1) / 2
        lo = np.floor(t).astype(np.int64)
        frac = (t - lo).astype(np.float32)
        rows_base = (np.arange(n_angles)[:, None] * self.n_det)
        pix = np.broadcast_to(np.arange(h * w)[None], t.shape)
        rows = np.concatenate([(rows_base + lo).ravel(), (rows_base + lo + 1).ravel()])
        cols = np.concatenate([pix.ravel(), pix.ravel()])
        vals = np.concatenate([(1 - frac).ravel(), frac.ravel()])
        shape = (n_angles * self.n_det, h * w)
        idx = torch.from_numpy(np.stack([rows, cols]))
        with warnings.catch_warnings():  # "sparse CSR support is in beta" / invariant checks: informational
            warnings.simplefilter("ignore", UserWarning)
            coo = torch.sparse_coo_tensor(idx, torch.from_numpy(vals), shape).coalesce()
            self.A = coo.to_sparse_csr().to(device)
            self.At = coo.t().coalesce().to_sparse_csr().to(device)
        self.n_pad = max(64, 2 ** int(math.ceil(math.log2(2 * self.n_det))))
        self.ramp = torch.from_numpy(_ramp_filter(self.n_pad)).float().to(device)

    def project(self, img: torch.Tensor) -> torch.Tensor:
        """(B, H, W) -> sinogram (B, n_angles, n_det) of line integrals (pixel lengths)."""
        b = img.shape[0]
        return (self.A @ img.reshape(b, -1).T.float()).T.reshape(b, self.n_angles, self.n_det)

    def fbp(self, sino: torch.Tensor) -> torch.Tensor:
        """(B, n_angles, n_det) -> filtered back-projection (B, H, W)."""
        b = sino.shape[0]
        q = torch.fft.irfft(torch.fft.rfft(sino.float(), n=self.n_pad) * self.ramp, n=self.n_pad)[..., :self.n_det]
        out = (self.At @ q.reshape(b, -1).T) * (math.pi / (2 * self.n_angles))
        return out.T.reshape(b, self.h, self.w)


@functools.lru_cache(maxsize=8)
def _beam(h: int, w: int, n_angles: int, device: str) -> ParallelBeam:
    return ParallelBeam(h, w, n_angles, device)


def parallel_beam(h: int, w: int, n_angles: int = 0, device: torch.device | str = "cpu") -> ParallelBeam:
    """The (cached) :class:`ParallelBeam` of an ``(h, w)`` image; ``n_angles`` 0 = ``max(h, w)``."""
    return _beam(h, w, n_angles or max(h, w), str(torch.device(device)))


def ct_lowdose(x: torch.Tensor, low, high, pixel_mm, dose, gen: torch.Generator, photons: float = 1e5,
               n_angles: int = 0) -> torch.Tensor:
    """Low-dose CT noise from the projection domain (module docstring); x in the HU window [low, high]."""
    b, c, h, w = x.shape
    low, high = _per_image(low, x), _per_image(high, x)
    pixel_mm, n0 = _per_image(pixel_mm, x), _per_image(dose, x) * photons
    beam = parallel_beam(h, w, n_angles, x.device)
    hu = low + x.float() * (high - low)
    mu_px = (MU_WATER * (1 + hu / 1000)).clamp_min(0) * pixel_mm  # attenuation per pixel length
    p = beam.project(mu_px.reshape(b * c, h, w)).reshape(b, c, beam.n_angles, beam.n_det)
    expected = n0 * torch.exp(-p)
    counts = torch.poisson(expected, generator=gen).clamp_min(1.0)
    d = -torch.log(counts / n0) - p
    noise_px = beam.fbp(d.reshape(b * c, beam.n_angles, beam.n_det)).reshape(b, c, h, w)
    noise_hu = noise_px / pixel_mm / MU_WATER * 1000
    return x + noise_hu / (high - low)


def corrupt(x: torch.Tensor, kind: str, levels: torch.Tensor, gen: torch.Generator, *, low=0.0, high=1.0,
            pixel_mm=1.0, read_noise: float = 2.0, ct_photons: float = 1e5, ct_angles: int = 0) -> torch.Tensor:
    """Noisy copy of ``x`` with noise ``kind`` at per-image ``levels`` (sigma, photons or dose)."""
    if kind == "gaussian":
        return gaussian(x, levels, gen)
    if kind == "poisson-gaussian":
        return poisson_gaussian(x, low, high, levels, read_noise, gen)
    if kind == "ct-lowdose":
        return ct_lowdose(x, low, high, pixel_mm, levels, gen, ct_photons, ct_angles)
    raise ValueError(f"unknown noise kind {kind!r}; choose one of {tuple(DEFAULT_LEVELS)}")

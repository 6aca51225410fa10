"""Poisson–Gaussian noise from the noisy images themselves, and the generalized Anscombe transform.

Model: a noisy value ``z`` of clean value ``x`` has mean ``x`` and variance ``a·x + b`` (Foi et al.
2008, "Practical Poissonian-Gaussian noise modeling and fitting for single-image raw-data"):
``a`` is the gain (image units per photon: ``z = a·photons + read noise``) and ``b`` the variance
at ``x = 0`` (the read-noise variance, less ``a`` times the zero-photon level when that is not 0).

:func:`estimate_noise` fits (a, b) from ONE image (or pools several), in the spirit of Foi et al.:

1. a high-pass residual ``d = k * z`` with the 3×3 kernel ``k = [1 -2 1]ᵀ[1 -2 1] / 6`` (unit L2
   norm; it annihilates every signal of the form ``f(row) + g(col)``, so planes and ramps leave no
   trace), whose variance is the noise variance where the signal is smooth;
2. the local mean ``m`` of ``z`` on a 7×7 window (uncorrelated with ``d``: the kernel sums to 0);
3. smooth pixels only: a pixel whose Gaussian-smoothed gradient is an outlier in its intensity bin
   (edges, texture) is dropped;
4. level sets: equal-count bins of ``m``; per bin the mean of ``m`` and the unbiased variance of
   ``d`` (its mean is 0 in theory, the sample mean is subtracted);
5. a weighted least squares ``var = a·mean + b`` over the bins, weights ``n / (2 var²)`` (the
   variance of a sample variance), iterated with the fitted variances, bins with a residual beyond
   3 standard errors dropped (robust to bins with structure left in them).

Clipping of the data (Foi's clipped model) is not modelled: the stores keep unclipped values.

:func:`gat` / :func:`inverse_gat`: the generalized Anscombe transform
``f(z) = 2/a · sqrt(max(a·z + 3/8·a² + b, 0))`` (noise variance ≈ 1 for all x) and the closed-form
approximation of its exact unbiased inverse (Mäkitalo & Foi 2013, "Optimal inversion of the
generalized Anscombe transformation for Poisson-Gaussian noise", the closed form of their
``GenAnscombe_inverse_closed_form``: the Poisson exact unbiased inverse's closed form of Mäkitalo &
Foi 2011 with σ² = b / a² subtracted, clipped at 0); :func:`inverse_gat_algebraic` is the plain
algebraic inverse. For ``a ≈ 0`` (Gaussian noise) the transform degenerates to ``z / sqrt(b)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

_K1 = np.array([1.0, -2.0, 1.0])
HIGHPASS = np.outer(_K1, _K1) / 6.0  # unit L2 norm, sums to 0
MEAN_WINDOW = 7
_GAUSSIAN_LIMIT = 1e-6  # a <= this · b (relative to the image scale): treated as Gaussian noise


@dataclass(frozen=True)
class NoiseCalibration:
    """Fitted noise variance ``a·x + b`` on the images' scale.

    ``n_pixels``: smooth pixels used, ``n_bins``: level sets kept in the fit, ``x_range``: the
    range of local means covered (the fit extrapolates outside it)."""

    a: float
    b: float
    n_pixels: int
    n_bins: int
    x_range: tuple[float, float]

    def variance(self, x) -> np.ndarray:
        return self.a * np.asarray(x, dtype=np.float64) + self.b

    def photons(self, offset: float = 0.0) -> dict[str, float]:
        """The same noise in photons, given ``offset``: the image value of zero photons (0 when the
        data have no black level; for a store, ``-low / (high - low)`` of its normalization).
        ``photons_per_unit``: photons per image unit (1 / a); ``read_noise_photons``: read-noise sd
        in photons, ``sqrt(b + a·offset) / a`` (NaN without a Poisson part)."""
        if self.a <= 0:
            return {"photons_per_unit": math.inf, "read_noise_photons": math.nan}
        return {"photons_per_unit": 1.0 / self.a,
                "read_noise_photons": math.sqrt(max(self.b + self.a * offset, 0.0)) / self.a}

    def as_dict(self, offset: float | None = None) -> dict:
        """JSON-ready: a, b, n_pixels, n_bins, x_range (and the photon view when ``offset`` is given)."""
        out = asdict(self)
        out["x_range"] = list(self.x_range)
        if offset is not None:
            out.update(offset=float(offset), **self.photons(offset))
        return out


def _local_stats(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(residual d, local mean m, smoothed gradient g) on the valid interior of a 2D image."""
    from scipy import ndimage

    z = np.asarray(img, dtype=np.float64)
    d = ndimage.correlate(z, HIGHPASS, mode="reflect")
    m = ndimage.uniform_filter(z, MEAN_WINDOW, mode="reflect")
    g = ndimage.gaussian_gradient_magnitude(z, 2.0, mode="reflect")
    r = MEAN_WINDOW // 2 + 1
    inner = (slice(r, -r), slice(r, -r))
    return d[inner].ravel(), m[inner].ravel(), g[inner].ravel()


def _bins(m: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each value: equal-count bins of ``m``."""
    edges = np.quantile(m, np.linspace(0, 1, n_bins + 1)[1:-1])
    return np.searchsorted(edges, m, side="right")


def _smooth_mask(m: np.ndarray, g: np.ndarray, n_bins: int) -> np.ndarray:
    """Pixels whose smoothed gradient is not an outlier (median + 3 MAD) within their intensity bin."""
    keep = np.ones(m.size, bool)
    idx = _bins(m, n_bins)
    for i in range(n_bins):
        sel = idx == i
        if sel.sum() < 8:
            continue
        gi = g[sel]
        med = np.median(gi)
        mad = 1.4826 * np.median(np.abs(gi - med))
        keep[sel] = gi <= med + 3 * mad
    return keep


def estimate_noise(images, n_bins: int | None = None, min_per_bin: int = 300) -> NoiseCalibration:
    """Fit the Poisson–Gaussian variance ``a·x + b`` of one noisy 2D image, or pool the level sets
    of several (an ``(H, W)`` array, an ``(N, H, W)`` / ``(N, C, H, W)`` array or a list of 2D
    arrays; every channel counts as an image). See the module docstring for the method.

    Args:
        n_bins: level sets (default: one per ``min_per_bin`` smooth pixels, 8 to 40).
        min_per_bin: fewest pixels per level set.
    """
    arrs = [np.asarray(images)] if not isinstance(images, (list, tuple)) else [np.asarray(i) for i in images]
    planes = [p for a in arrs for p in (a.reshape(-1, *a.shape[-2:]) if a.ndim > 2 else a[None])]
    ds, ms, gs = [], [], []
    for p in planes:
        if min(p.shape) < 2 * MEAN_WINDOW:
            continue
        d, m, g = _local_stats(p)
        ds.append(d)
        ms.append(m)
        gs.append(g)
    if not ds:
        raise ValueError(f"no image of at least {2 * MEAN_WINDOW}² pixels to estimate the noise from")
    d, m, g = np.concatenate(ds), np.concatenate(ms), np.concatenate(gs)
    ok = np.isfinite(d) & np.isfinite(m) & np.isfinite(g)
    d, m, g = d[ok], m[ok], g[ok]
    keep = _smooth_mask(m, g, max(4, min(40, m.size // (4 * min_per_bin))))
    d, m = d[keep], m[keep]
    nb = n_bins or int(np.clip(m.size // min_per_bin, 8, 40))
    nb = max(2, min(nb, m.size // 8))
    idx = _bins(m, nb)
    cnt = np.bincount(idx, minlength=nb).astype(np.float64)
    use = cnt >= 8
    mean = np.bincount(idx, m, nb)[use] / cnt[use]
    dm = np.bincount(idx, d, nb)[use] / cnt[use]
    var = (np.bincount(idx, d * d, nb)[use] - cnt[use] * dm ** 2) / (cnt[use] - 1)
    n = cnt[use]
    a, b, kept = _fit(mean, var, n)
    return NoiseCalibration(float(a), float(b), int(keep.sum()), int(kept.sum()),
                            (float(mean.min()), float(mean.max())))


def _fit(mean: np.ndarray, var: np.ndarray, n: np.ndarray, iters: int = 6) -> tuple[float, float, np.ndarray]:
    """Weighted least squares of ``var ≈ a·mean + b`` (weights n / (2 v²) of the fitted v), iterated,
    dropping bins beyond 3 standard errors; a is kept >= 0."""
    kept = np.ones(mean.size, bool)
    fitted = np.maximum(var, 1e-20)
    a = b = 0.0
    for _ in range(iters):
        w = n / (2 * np.maximum(fitted, 1e-20) ** 2)
        X = np.stack([mean, np.ones_like(mean)], 1)
        sw = np.sqrt(w * kept)
        coef, *_ = np.linalg.lstsq(X * sw[:, None], var * sw, rcond=None)
        a, b = float(coef[0]), float(coef[1])
        if a < 0:  # no signal dependence: a constant variance
            a = 0.0
            b = float(np.sum(w * kept * var) / np.sum(w * kept))
        fitted = np.maximum(a * mean + b, 1e-12 * max(float(np.max(var)), 1e-30))
        se = fitted * np.sqrt(2 / np.maximum(n - 1, 1))
        new = np.abs(var - fitted) <= 3 * se
        if new.sum() < 2 or np.array_equal(new, kept):
            break
        kept = new
    return a, b, kept


# ---------------------------------------------------------------------- generalized Anscombe


def _gaussian_limit(a: float, b: float) -> bool:
    return a <= _GAUSSIAN_LIMIT * max(b, 1e-30)


def gat(z, a: float, b: float) -> np.ndarray:
    """Generalized Anscombe transform of data with variance ``a·x + b``: ``2/a · sqrt(max(a·z + 3/8·a²
    + b, 0))``; the transformed noise has variance ≈ 1. Gaussian noise (a ≈ 0): ``z / sqrt(b)``."""
    z = np.asarray(z, dtype=np.float64)
    a, b = max(float(a), 0.0), float(b)
    if _gaussian_limit(a, b):
        return z / math.sqrt(max(b, 1e-30))
    return 2.0 / a * np.sqrt(np.maximum(a * z + 0.375 * a * a + b, 0.0))


def inverse_gat(D, a: float, b: float) -> np.ndarray:
    """Closed-form approximation of the exact unbiased inverse of :func:`gat` (Mäkitalo & Foi 2013):
    with ``σ² = b / a²``, ``x/a = max(D²/4 + √(3/2)/(4D) − 11/(8D²) + 5√(3/2)/(8D³) − 1/8 − σ², 0)``.
    It maps ``E[gat(z)]`` back to ``E[z]`` (the asymptotic inverse is biased at low counts)."""
    D = np.asarray(D, dtype=np.float64)
    a, b = max(float(a), 0.0), float(b)
    if _gaussian_limit(a, b):
        return D * math.sqrt(max(b, 1e-30))
    s = math.sqrt(1.5)
    Dc = np.maximum(D, 1e-6)
    x = 0.25 * Dc ** 2 + 0.25 * s / Dc - 1.375 / Dc ** 2 + 0.625 * s / Dc ** 3 - 0.125 - b / a ** 2
    return a * np.maximum(x, 0.0)


def inverse_gat_algebraic(D, a: float, b: float) -> np.ndarray:
    """The algebraic inverse of :func:`gat` (``gat`` then this is the identity where ``a·z + 3/8·a² + b
    >= 0``): ``z = ((a·D/2)² − 3/8·a² − b) / a``."""
    D = np.asarray(D, dtype=np.float64)
    a, b = max(float(a), 0.0), float(b)
    if _gaussian_limit(a, b):
        return D * math.sqrt(max(b, 1e-30))
    return ((0.5 * a * D) ** 2 - 0.375 * a * a - b) / a

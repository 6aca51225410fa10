"""Sample-quality metrics on feature vectors: FID, KID, precision / recall, density / coverage.

All take ``(N, D)`` feature matrices of real and generated images (from
:mod:`medvae.evaluation.features`, a network trained on the store's own training split — ImageNet Inception
weights cannot be downloaded and would not fit CT or fluorescence anyway).

- ``fid``: Fréchet distance between Gaussians fitted to the two sets (Heusel et al. 2017).
- ``kid``: unbiased MMD² with the cubic polynomial kernel ``(x·y / D + 1)^3``, averaged over random
  subsets, with its standard deviation over subsets (Bińkowski et al. 2018).
- ``precision`` / ``recall``: the fraction of generated (real) points inside the k-NN balls of the
  real (generated) set (Kynkäänniemi et al. 2019, k = 3).
- ``density`` / ``coverage``: the mean number of real k-NN balls holding a generated point,
  divided by k; the fraction of real balls holding at least one (Naeem et al. 2020, k = 5).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


def _f64(x) -> np.ndarray:
    return np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||² + tr(C1 + C2 - 2 (C1 C2)^½) for two Gaussians."""
    covmean = linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():  # singular product: regularise as the reference FID code does
        eps = np.eye(len(cov1)) * 1e-6
        covmean = linalg.sqrtm((cov1 + eps) @ (cov2 + eps))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))


def fid(real, fake) -> float:
    """FID between two feature sets ``(N, D)``, ``(M, D)`` (both N, M >= 2)."""
    a, b = _f64(real), _f64(fake)
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def kid_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with the kernel ``k(a, b) = (a·b / D + 1)^3`` on one pair of sets."""
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.mean())


def kid(real, fake, subsets: int = 50, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID: mean and standard deviation of :func:`kid_mmd2` over random subsets (without replacement
    inside a subset), each of ``min(subset_size, N, M)`` points."""
    a, b = _f64(real), _f64(fake)
    size = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    vals = [kid_mmd2(a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)])
            for _ in range(subsets)]
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if subsets > 1 else 0.0


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance of each point to its k-th nearest neighbour within ``x`` (itself excluded)."""
    d = _pairwise(x, x)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself (distance 0)


def _pairwise(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return np.sqrt(np.maximum(sq, 0.0))


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN balls."""
    a, b = _f64(real), _f64(fake)
    ra, rb = _knn_radii(a, k), _knn_radii(b, k)
    d = _pairwise(a, b)  # (N real, M fake)
    precision = float((d <= ra[:, None]).any(0).mean())
    recall = float((d <= rb[None, :]).any(1).mean())
    return precision, recall


def density_coverage(real, fake, k: int = 5) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020) with the real set's k-NN balls."""
    a, b = _f64(real), _f64(fake)
    inside = _pairwise(a, b) <= _knn_radii(a, k)[:, None]  # (N real, M fake)
    density = float(inside.sum() / (k * len(b)))
    coverage = float(inside.any(1).mean())
    return density, coverage


def sample_metrics(real, fake, seed: int = 0) -> dict[str, float]:
    """All of the above between two feature sets; names as in ``metric_table.SAMPLE_METRICS``."""
    # Subsets of half the smaller set: subsets of all points would only permute them (sd 0).
    kid_mean, kid_sd = kid(real, fake, subset_size=max(2, min(len(real), len(fake)) // 2), seed=seed)
    precision, recall = precision_recall(real, fake)
    density, coverage = density_coverage(real, fake)
    return {"fid": fid(real, fake), "kid": kid_mean, "kid_sd": kid_sd, "precision": precision, "recall": recall,
            "density": density, "coverage": coverage}

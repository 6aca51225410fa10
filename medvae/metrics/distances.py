"""Distances between sets of images: real patches vs model samples, on the tensors' device.

- ``mmd2`` is the unbiased MMD² with a sum of Gaussian kernels (median-heuristic bandwidths),
  computed in blocks so 20k × 20k fits in bounded memory; ``mmd_test`` adds a permutation p-value.
- Features: ``pixel_features`` (area-downsampled pixels) and ``random_conv_features`` (a fixed,
  seeded random conv net — no downloaded weights).
- ``intensity_wasserstein``: 1-D Wasserstein distance between value distributions (e.g. HU).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import wasserstein_distance

# ----------------------------------------------------------------------------- MMD


def _sqdist(a: torch.Tensor, b: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    return (a2[:, None] + b2[None, :] - 2 * a @ b.T).clamp_min_(0)


def median_bandwidth(Z: torch.Tensor, max_points: int = 2000, seed: int = 0) -> float:
    """Median pairwise Euclidean distance of (a seeded subsample of) the rows of ``Z``."""
    if Z.shape[0] > max_points:
        g = torch.Generator().manual_seed(seed)
        Z = Z[torch.randperm(Z.shape[0], generator=g)[:max_points].to(Z.device)]
    Z = Z.double()
    z2 = Z.pow(2).sum(1)
    d = _sqdist(Z, Z, z2, z2)
    iu = torch.triu_indices(Z.shape[0], Z.shape[0], 1, device=Z.device)
    med = d[iu[0], iu[1]].median().sqrt().item()
    return med if med > 0 else 1.0


def _prepare(X, Y) -> tuple[torch.Tensor, torch.Tensor]:
    X = torch.as_tensor(X)
    Y = torch.as_tensor(Y, device=X.device)
    if X.dim() != 2 or Y.dim() != 2 or X.shape[1] != Y.shape[1]:
        raise ValueError(f"mmd2 expects (N, D) and (M, D) features, got {tuple(X.shape)} and {tuple(Y.shape)}")
    if X.shape[0] < 2 or Y.shape[0] < 2:
        raise ValueError("mmd2 needs at least 2 samples on each side")
    X, Y = X.float(), Y.float()
    # Distances are translation invariant; centring keeps |a|^2 + |b|^2 - 2ab well conditioned.
    center = torch.cat([X, Y]).mean(0, keepdim=True)
    return X - center, Y - center


def _bandwidths(Z: torch.Tensor, bandwidths) -> list[float]:
    if bandwidths is None:
        med = median_bandwidth(Z)
        return [0.5 * med, med, 2.0 * med]
    return [float(b) for b in np.atleast_1d(bandwidths)]


def _kernel(d2: torch.Tensor, gammas: list[float]) -> torch.Tensor:
    out = torch.exp(d2 * (-gammas[0]))
    for g in gammas[1:]:
        out += torch.exp(d2 * (-g))
    return out


def mmd2(X, Y, bandwidths=None, block: int = 4096) -> float:
    """Unbiased MMD² (Gretton et al. 2012) between samples X (N, D) and Y (M, D).

    Kernel: k(a, b) = sum_h exp(-|a - b|^2 / (2 h^2)) over the bandwidths h (default: the
    median pairwise distance of the pooled sample times 0.5, 1 and 2). The kernel matrix is
    never held whole: blocks of ``block`` rows are formed, reduced and dropped (peak extra memory
    ~ block^2 * 8 bytes), with sums accumulated in float64. Unitless (kernel units; the maximum
    k(a, a) is the number of bandwidths). ~0 (can be slightly negative) when X and Y come from
    one distribution; lower is better.
    """
    X, Y = _prepare(X, Y)
    gammas = [1.0 / (2 * h * h) for h in _bandwidths(torch.cat([X, Y]), bandwidths)]
    n, m = X.shape[0], Y.shape[0]

    def offdiag_sum(A: torch.Tensor) -> float:
        a2 = A.pow(2).sum(1)
        total = 0.0
        for i in range(0, A.shape[0], block):
            for j in range(i, A.shape[0], block):
                k = _kernel(_sqdist(A[i:i + block], A[j:j + block], a2[i:i + block], a2[j:j + block]), gammas)
                s = k.sum(dtype=torch.float64).item()
                if i == j:
                    s -= torch.diagonal(k).sum(dtype=torch.float64).item()
                    total += s
                else:
                    total += 2 * s  # the mirrored block
        return total

    def cross_sum(A: torch.Tensor, B: torch.Tensor) -> float:
        a2, b2 = A.pow(2).sum(1), B.pow(2).sum(1)
        total = 0.0
        for i in range(0, A.shape[0], block):
            for j in range(0, B.shape[0], block):
                k = _kernel(_sqdist(A[i:i + block], B[j:j + block], a2[i:i + block], b2[j:j + block]), gammas)
                total += k.sum(dtype=torch.float64).item()
        return total

    with torch.no_grad():
        kxx = offdiag_sum(X) / (n * (n - 1))
        kyy = offdiag_sum(Y) / (m * (m - 1))
        kxy = cross_sum(X, Y) / (n * m)
    return float(kxx + kyy - 2 * kxy)


def mmd_test(X, Y, permutations: int = 200, seed: int = 0, bandwidths=None, max_points: int = 8192,
             block: int = 4096) -> tuple[float, float]:
    """Unbiased MMD² and its permutation-test p-value.

    The statistic is ``mmd2`` on all of X and Y. For the null distribution the pooled kernel
    matrix (zero diagonal) is built once, blockwise, and every permutation's MMD² follows from
    two matrix products with the (N, P) label matrix, so P permutations cost one N² x P matmul
    instead of P kernel evaluations. When N + M > ``max_points`` (so the N² float32 matrix would
    exceed ~256 MiB), the permutation test runs on a seeded subsample of ``max_points`` rows in
    the original proportions: the p-value is then the subsample's (conservative: less power).

    Returns:
        (mmd2, p_value) with p = (1 + #{permuted >= observed}) / (1 + permutations).
    """
    X, Y = _prepare(X, Y)
    bw = _bandwidths(torch.cat([X, Y]), bandwidths)
    stat = mmd2(X, Y, bw, block=block)
    g = torch.Generator().manual_seed(seed)
    n, m = X.shape[0], Y.shape[0]
    if n + m > max_points:
        nx = max(2, round(max_points * n / (n + m)))
        ny = max(2, max_points - nx)
        X = X[torch.randperm(n, generator=g)[:nx].to(X.device)]
        Y = Y[torch.randperm(m, generator=g)[:ny].to(Y.device)]
        n, m = X.shape[0], Y.shape[0]
    gammas = [1.0 / (2 * h * h) for h in bw]
    Z = torch.cat([X, Y])
    N = n + m
    z2 = Z.pow(2).sum(1)
    with torch.no_grad():
        K = torch.empty(N, N, device=Z.device, dtype=torch.float32)
        for i in range(0, N, block):
            K[i:i + block] = _kernel(_sqdist(Z[i:i + block], Z, z2[i:i + block], z2), gammas)
        K.fill_diagonal_(0)
        labels = torch.zeros(N, permutations + 1, device=Z.device, dtype=torch.float32)
        labels[:n, 0] = 1  # column 0: the observed split
        for p in range(1, permutations + 1):
            labels[torch.randperm(N, generator=g)[:n].to(Z.device), p] = 1
        KA = (K @ labels).double()  # (N, P+1): sum_j K_ij a_j
        r = K.sum(1, dtype=torch.float64)[:, None]
        A = labels.double()
        sxx = (A * KA).sum(0)
        sxy = (A * (r - KA)).sum(0)
        syy = r.sum() - sxx - 2 * sxy
        stats = sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m)
    observed, null = stats[0], stats[1:]
    p_value = (1 + (null >= observed - 1e-12).sum().item()) / (1 + permutations)
    return stat, float(p_value)


# ----------------------------------------------------------------------------- features


def pixel_features(x: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Area-downsampled pixels as features: (B, C, H, W) -> (B, C * size * size) float32."""
    return F.adaptive_avg_pool2d(x.float(), size).flatten(1)


@lru_cache(maxsize=16)
def _random_net(channels: int, seed: int, dim: int, device: str) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    widths = [channels, 32, 64, 128, dim]
    layers: list[torch.nn.Module] = []
    for cin, cout in zip(widths[:-1], widths[1:]):
        conv = torch.nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        with torch.no_grad():  # He-normal weights from our generator: the net is a pure function of seed
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / (cin * 9)))
            conv.bias.copy_(torch.randn(cout, generator=g) * 0.01)
        layers += [conv, torch.nn.ReLU()]
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()]
    net = torch.nn.Sequential(*layers).to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@torch.no_grad()
def random_conv_features(x: torch.Tensor, dim: int = 512, seed: int = 0, chunk: int = 512) -> torch.Tensor:
    """Features of a fixed, seeded random conv net (4 stride-2 3x3 convs + ReLU, global mean).

    Random-network embeddings are a weight-free stand-in for Inception features (no download);
    the net depends only on (C, seed, dim) and is cached per device.

    Args:
        x: (B, C, H, W) in [0, 1].

    Returns:
        (B, dim) float32.
    """
    net = _random_net(int(x.shape[1]), int(seed), int(dim), str(x.device))
    x = x.float()
    # Inputs centred so the ReLUs see both signs.
    return torch.cat([net(x[i:i + chunk] * 2 - 1) for i in range(0, x.shape[0], chunk)]) if len(x) else \
        x.new_zeros(0, dim)


# ----------------------------------------------------------------------------- intensities


def intensity_wasserstein(a, b, max_samples: int | None = 2_000_000, seed: int = 0) -> float:
    """1-D Wasserstein-1 distance between two samples of values (e.g. HU of real vs synthetic CT).

    ``scipy.stats.wasserstein_distance`` on the raw values: in their units (HU for CT, counts for
    microscopy); 0 for identical distributions, lower is better. Samples larger than
    ``max_samples`` are subsampled (seeded) first.
    """
    rng = np.random.default_rng(seed)

    def prep(v):
        v = np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64).ravel()
        if max_samples is not None and v.size > max_samples:
            v = rng.choice(v, max_samples, replace=False)
        return v

    a, b = prep(a), prep(b)
    if a.size == 0 or b.size == 0:
        raise ValueError("intensity_wasserstein needs non-empty samples")
    return float(wasserstein_distance(a, b))

"""Image-quality, likelihood and distribution metrics, batched on the tensors' device.

Conventions: images are ``(B, C, H, W)`` in [0, 1] (``data_range`` 1); per-image metrics
return ``(B,)``. Likelihoods are in nats per image (summed over pixels and channels).

- ``ssim`` is the standard SSIM of Wang et al. (2004): 11-tap Gaussian window, sigma 1.5,
  K1 = 0.01, K2 = 0.03, population (co)variances, mean over the *valid* region (the border of
  5 pixels where the window leaves the image is dropped). That is exactly what
  ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1)`` and MONAI's ``compute_ssim_and_cs`` compute (both
  checked in tests); we filter separably with banded-matrix products, faster on CPU than
  MONAI's 11x11 grouped convolution.
- ``psnr``, ``mse``, ``mae``: MONAI's definitions (mean over C, H, W per image), in plain torch
  so that importing metrics stays light (validation runs in every training process).
- ``ms_ssim``: MONAI's MS-SSIM needs (11 - 1) * 2**4 + 1 = 161 pixels with its defaults and
  fails on 128-pixel patches; ours uses as many of the standard 5 scales as the window fits
  into (4 for 128 px, 5 from 176 px) and renormalises the standard weights to sum to 1.

Distances between sets of images (MMD², features, intensity W₁) live in ``medvae.distances``
and are re-exported here.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from medvae.distances import (  # noqa: F401  (re-exported: one import for every metric)
    intensity_wasserstein,
    median_bandwidth,
    mmd2,
    mmd_test,
    pixel_features,
    random_conv_features,
)
from medvae.losses import kl_normal, reparameterize, standard_normal  # kl_normal re-exported

__all__ = [
    "ssim", "ms_ssim", "psnr", "mse", "mae", "kl_normal", "elbo", "iwae_log_likelihood",
    "bits_per_dim", "median_bandwidth", "mmd2", "mmd_test", "pixel_features",
    "random_conv_features", "intensity_wasserstein",
]

# ----------------------------------------------------------------------------- reconstruction


@lru_cache(maxsize=32)
def _window_matrix(n: int, win: int, sigma: float, device: str, dtype: torch.dtype) -> torch.Tensor:
    """(n - win + 1, n) banded matrix whose rows are the shifted 1-D Gaussian window.

    The window is sampled and normalised, as skimage's gaussian_filter (truncate 3.5 -> 11 taps at
    sigma 1.5) and MONAI's gaussian_1d(approx="sampled", normalize=True).
    """
    r = torch.arange(win, dtype=torch.float64) - (win - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    out = n - win + 1
    m = torch.zeros(out, n, dtype=torch.float64)
    idx = torch.arange(out)[:, None] + torch.arange(win)[None, :]
    m.scatter_(1, idx, g.expand(out, win).contiguous())
    return m.to(device=device, dtype=dtype)


def _ssim_cs_maps(x: torch.Tensor, y: torch.Tensor, data_range: float, win: int, sigma: float,
                  k1: float, k2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SSIM and contrast-structure maps over the valid region: ``(B, C, H-win+1, W-win+1)``.

    The separable Gaussian filter is applied as two dense matrix products with banded window
    matrices (Gh @ img @ Gw^T): on CPU, BLAS beats depthwise / grouped convolutions by 4-5x
    for 11-tap windows on 128-pixel images even though it multiplies zeros. Only four local
    moments are filtered: var_x + var_y needs E[x^2 + y^2], never E[x^2] and E[y^2] apart.
    """
    h, w = x.shape[-2:]
    gh = _window_matrix(h, win, sigma, str(x.device), x.dtype)
    gw = gh if w == h else _window_matrix(w, win, sigma, str(x.device), x.dtype)
    stack = torch.stack([x, y, x * x + y * y, x * y])  # (4, B, C, H, W)
    mu_x, mu_y, e_sq, e_xy = gh @ stack @ gw.T
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_xy = mu_x * mu_y
    mu_sq = mu_x * mu_x + mu_y * mu_y
    cs = (2 * (e_xy - mu_xy) + c2) / (e_sq - mu_sq + c2)
    lum = (2 * mu_xy + c1) / (mu_sq + c1)
    return lum * cs, cs


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Structural similarity per image (mean over channels and the valid region).

    Args:
        x, y: (B, C, H, W) images, H and W >= ``win_size``.
        data_range: max - min of the intensity scale (1 for [0, 1] images).

    Returns:
        (B,) SSIM in [-1, 1]; 1 for identical images. Unitless, higher is better.
    """
    _check_pair(x, y)
    x, y = _as_float(x), _as_float(y)
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"ssim needs images of at least {win_size} pixels, got {tuple(x.shape[-2:])}")
    # Chunks of ~32 128² pairs keep the (4, chunk, C, H, W) moment stack (8 MB) near the cache:
    # the element-wise half of SSIM is memory-bound, and 256-pair chunks were 2.5x slower.
    chunk = max(1, (1 << 19) // (x[0].numel()))
    return torch.cat([_ssim_cs_maps(x[i:i + chunk], y[i:i + chunk], data_range, win_size, sigma, k1, k2)[0]
                      .flatten(1).mean(1) for i in range(0, x.shape[0], chunk)])


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang, Simoncelli & Bovik (2003)


def ms_ssim_scales(size: int, win_size: int = 11, max_scales: int = 5) -> int:
    """Number of scales such that the coarsest scale (size / 2**(s-1)) still holds the window."""
    s = 1
    while s < max_scales and size // 2**s >= win_size:
        s += 1
    return s


def ms_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5,
            weights: tuple[float, ...] = MS_SSIM_WEIGHTS, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Multi-scale SSIM per image (Wang et al. 2003), usable on 128-pixel patches.

    Uses the first ``s`` of the standard weights renormalised to sum 1, where ``s`` is the
    largest number of scales (<= len(weights)) whose coarsest image (2x2 average pooling per
    scale) is at least ``win_size`` pixels: 4 scales at 128 px (coarsest 16 px), 5 from 176 px.
    Contrast-structure terms are clamped at 0 before the fractional powers (as pytorch-msssim)
    so strongly anti-correlated images give 0 rather than NaN.

    Returns:
        (B,) MS-SSIM in [0, 1]; 1 for identical images. Unitless, higher is better.
    """
    _check_pair(x, y)
    x, y = _as_float(x), _as_float(y)
    n = ms_ssim_scales(min(x.shape[-2:]), win_size, len(weights))
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"ms_ssim needs images of at least {win_size} pixels, got {tuple(x.shape[-2:])}")
    w = torch.tensor(weights[:n], dtype=x.dtype, device=x.device)
    w = w / w.sum()
    terms = []
    for i in range(n):
        s_map, cs_map = _ssim_cs_maps(x, y, data_range, win_size, sigma, k1, k2)
        if i < n - 1:
            terms.append(cs_map.flatten(2).mean(2).clamp_min(0))  # (B, C)
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        else:
            terms.append(s_map.flatten(2).mean(2).clamp_min(0))
    vals = torch.stack(terms, dim=0)  # (S, B, C)
    return torch.prod(vals ** w.view(-1, 1, 1), dim=0).mean(1)


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image, (B,), in squared intensity units ([0,1] scale); lower is better."""
    _check_pair(x, y)
    return (_as_float(x) - _as_float(y)).square().flatten(1).mean(1)


def mae(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per image, (B,), in intensity units ([0,1] scale); lower is better."""
    _check_pair(x, y)
    return (_as_float(x) - _as_float(y)).abs().flatten(1).mean(1)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, (B,), in dB: 20 log10(range) - 10 log10(MSE) (MONAI's).

    Identical images give +inf. Higher is better.
    """
    return 20 * math.log10(data_range) - 10 * torch.log10(mse(x, y))


# ----------------------------------------------------------------------------- likelihoods

_LOG_2PI = math.log(2 * math.pi)


@torch.no_grad()
def elbo(model, x: torch.Tensor, generator: torch.Generator | None = None,
         return_terms: bool = False, posterior: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Evidence lower bound per image, nats: E_q[log p(x|z)] - KL(q(z|x) || p(z)).

    One-sample estimate of the reconstruction term (z = mu + sigma * eps, eps from
    ``generator`` when given, so the estimate is reproducible) and the analytic KL. Unbiased
    for the ELBO; its expectation is <= log p(x). Higher is better.

    Args:
        model: any model with ``encode``, ``decode`` and ``log_likelihood`` (docs/architecture.md).
        x: (B, C, H, W) in [0, 1].
        posterior: ``(mu, logvar)`` of ``model.encode(x)`` when the caller has it already.

    Returns:
        (B,) ELBO; with ``return_terms`` also a dict with ``nll`` (-log p(x|z)), ``kl`` and
        ``x_hat`` (the decoded *sample*; use ``decode(mu)`` for the deterministic recon).
    """
    mu, logvar = model.encode(x) if posterior is None else posterior
    z = reparameterize(mu, logvar, generator).to(mu.dtype)
    x_hat = model.decode(z)
    ll = model.log_likelihood(x, x_hat).float()
    kl = kl_normal(mu.float(), logvar.float())
    out = ll - kl
    if return_terms:
        return out, {"nll": -ll, "kl": kl, "x_hat": x_hat}
    return out


@torch.no_grad()
def iwae_log_likelihood(model, x: torch.Tensor, k: int = 64, batch_chunk: int = 1024,
                        generator: torch.Generator | None = None,
                        posterior: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Importance-weighted log-likelihood bound (Burda et al. 2016) per image, nats.

    log p(x) >= log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x), z_i ~ q(z|x) = N(mu, diag sigma^2),
    with p(z) = N(0, I). Computed with log-sum-exp; k = 1 is the one-sample ELBO (with the
    Monte-Carlo KL), and the bound tightens monotonically (in expectation) to log p(x) as k
    grows. Works for any likelihood: it only calls ``model.log_likelihood``.

    Args:
        model: encode / decode / log_likelihood as in docs/architecture.md.
        x: (B, C, H, W).
        k: importance samples per image.
        batch_chunk: at most this many decoded images per decoder call (bounds memory).
        generator: optional torch.Generator for reproducible samples.
        posterior: ``(mu, logvar)`` of ``model.encode(x)`` when the caller has it already.

    Returns:
        (B,) lower bound on log p(x) in nats; higher is better.
    """
    if k < 1:
        raise ValueError(f"iwae_log_likelihood: k must be >= 1, got {k}")
    mu, logvar = model.encode(x) if posterior is None else posterior
    dt = torch.promote_types(mu.dtype, torch.float32)  # at least float32 for the densities
    mu32, logvar32 = mu.to(dt), logvar.to(dt)
    std = (0.5 * logvar32).exp()
    b, d = mu.shape
    per_call = max(1, batch_chunk // b)  # samples of every image decoded per call
    log_w = []
    for start in range(0, k, per_call):
        kk = min(per_call, k - start)
        eps = standard_normal((kk, b, d), mu32.device, generator).to(mu32.dtype)
        z = mu32 + std * eps  # (kk, B, D)
        x_hat = model.decode(z.reshape(kk * b, d).to(mu.dtype))
        x_rep = x.unsqueeze(0).expand(kk, *x.shape).reshape(kk * b, *x.shape[1:])
        ll = model.log_likelihood(x_rep, x_hat).to(dt).view(kk, b)
        log_pz = -0.5 * (z.pow(2).sum(-1) + d * _LOG_2PI)
        log_qz = -0.5 * (eps.pow(2).sum(-1) + logvar32.sum(-1) + d * _LOG_2PI)
        log_w.append(ll + log_pz - log_qz)
    lw = torch.cat(log_w, 0)  # (k, B)
    return torch.logsumexp(lw, 0) - math.log(k)


def bits_per_dim(log_likelihood_nats, n_dims: int, levels: int | None = None):
    """Negative log-likelihood in bits per dimension: -LL / (n_dims ln 2). Lower is better.

    Our likelihoods are densities of continuous images on [0, 1] (no dequantization), so the
    raw value can be negative (a density may exceed 1). Given ``levels`` (e.g. 256 for 8-bit
    data), it is converted to the usual discrete convention for data uniformly dequantized on a
    grid of that many levels: bpd + log2(levels) (p of a bin of width 1/levels ~ density/levels).
    """
    bpd = -log_likelihood_nats / (n_dims * math.log(2))
    if levels is not None:
        bpd = bpd + math.log2(levels)
    return bpd

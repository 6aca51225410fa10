"""Image-quality metrics (SSIM, MS-SSIM, PSNR, MSE, MAE), batched on the tensors' device.

Conventions: images are ``(B, C, H, W)`` in [0, 1] (``data_range`` 1); per-image metrics
return ``(B,)``.

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

Likelihoods (ELBO, IWAE) live in ``medvae.metrics.elbo``, distances between sets of images in
``medvae.metrics.distances``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

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



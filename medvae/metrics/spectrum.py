"""Sharpness as the radially averaged power spectrum: how a set's power is shared between spatial frequencies.

Blur removes power at high spatial frequencies; a VAE's reconstructions and samples are typically blurrier
than real images. Per image the mean is removed (the DC term carries no sharpness), the image is transformed
and its squared coefficients are averaged over equal-width rings of radial frequency ``r = sqrt(fy² + fx²)``
in cycles/pixel, ``0 < r ≤ 0.5``. Channels are averaged; the set's spectrum is the mean of its images'.

**Why the FFT of the mirrored image, not of the image.** The FFT treats a patch as periodic: where its
opposite edges differ (almost always: an organ at one edge, air at the other) the jump adds power at every
frequency along the axes. On 128² camera crops that jump held most of the power above 0.25 cycles/pixel:
after a Gaussian blur of σ 1.5 px, which keeps 0.4 % of the power at 0.25 cycles/pixel and less above, the
FFT still measured 28–36 % of the sharp crops' power in every ring there (the DCT: 0.25 % and less).
Mirroring the image into a (2H, 2W) symmetric one leaves no jump; the FFT of that mirror is the orthonormal
DCT-II (``scipy.fft.dctn(norm="ortho")``, coefficient ``k`` at ``k / 2H`` cycles/pixel), scaled.
It is orthonormal, so the coefficients' squares sum to the image's variance and white noise of variance σ²
has σ² in every coefficient: a flat spectrum. Coefficients past ``r = 0.5`` (diagonal frequencies beyond the
axes' Nyquist, the corner of the frequency square) are left out, so every band is a whole quarter ring; a
coefficient at exactly a band edge belongs to the band above.

- :func:`radial_power`: ``(n_bands,)`` mean power per coefficient of each band (or per image);
- :func:`band_shares`: each band's share of the total power (its mean power × its number of coefficients);
- :func:`high_band_share`: the share of the power at or above ``cutoff`` cycles/pixel (a band edge);
- :func:`high_band_ratio`: a model's images' share over the real images' share: 1.0 = as sharp as real,
  below 1 blurrier, above 1 more high-frequency power (noise, checkerboard artefacts);
  :func:`share_above` and :func:`ratio_above` are the same on spectra already computed.

Images are ``(N, C, H, W)`` and square (the patch stores' patches are); computed in float32, batched.
"""

from __future__ import annotations

from functools import lru_cache

import torch

HIGH_CUTOFF = 0.25  # cycles/pixel: the upper half of the frequencies up to the axes' Nyquist


def _side(x: torch.Tensor) -> int:
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"the power spectrum expects square (N, C, H, W) images, got {tuple(x.shape)}; "
                         "crop or pad them to a square first")
    return int(x.shape[-1])


@lru_cache(maxsize=16)
def band_index(size: int, n_bands: int) -> torch.Tensor:
    """``(size, size)`` int64: the band of each DCT coefficient ``(ky, kx)`` of a ``size``² image (at
    ``(ky, kx) / 2·size`` cycles/pixel); -1 for the DC coefficient and the corner past 0.5 cycles/pixel."""
    # a band narrower than one coefficient (1 / 2·size cycles/pixel) may hold none: its mean would be NaN
    if not 1 <= n_bands < size:
        raise ValueError(f"{n_bands} bands are too many for {size}×{size} images: each band must be wider than "
                         f"one frequency step (1/{2 * size} cycles/pixel); use at most {max(1, size - 1)}")
    k = torch.arange(size, dtype=torch.float64)
    radius = torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2)  # in steps; exact on perfect squares, the only edge hits
    band = torch.floor(radius * n_bands / size).long().clamp(max=n_bands - 1)  # r = 0.5 in the last band
    band[(radius == 0) | (radius > size)] = -1
    return band


def band_edges(n_bands: int) -> torch.Tensor:
    """``(n_bands + 1,)`` float64 band edges in cycles/pixel, 0 .. 0.5."""
    return torch.linspace(0.0, 0.5, n_bands + 1, dtype=torch.float64)


def band_sizes(size: int, n_bands: int) -> torch.Tensor:
    """``(n_bands,)`` float64: how many DCT coefficients of a ``size``² image each band holds."""
    band = band_index(size, n_bands)
    return torch.bincount(band[band >= 0], minlength=n_bands).double()


def dct_power(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` squared orthonormal DCT-II coefficients of each image (``scipy.fft.dctn(norm="ortho")``
    squared), from the FFT of its (2H, 2W) mirror image: ``|FFT(mirror)[ky, kx]| = 4·|C[ky, kx]|`` with
    ``C`` the unnormalized DCT-II."""
    h, w = x.shape[-2:]
    mirror = torch.cat([x, x.flip(-1)], -1)
    mirror = torch.cat([mirror, mirror.flip(-2)], -2)
    power = torch.fft.rfft2(mirror)[..., :h, :w].abs().square()  # the mirror is real: half the FFT (2.3x faster)
    # the orthonormal scale per axis: 1/N for k = 0, 2/N otherwise; over 16 for the mirror's factor 4
    sy = torch.full((h, 1), 2.0 / h, dtype=power.dtype, device=x.device)
    sx = torch.full((1, w), 2.0 / w, dtype=power.dtype, device=x.device)
    sy[0], sx[0, 0] = 1.0 / h, 1.0 / w
    return power * (sy * sx / 16)


def radial_power(x: torch.Tensor, n_bands: int = 16, per_image: bool = False) -> torch.Tensor:
    """Mean squared DCT coefficient in each radial band, after removing each image's mean.

    Args:
        x: ``(N, C, H, W)`` images, H = W (any scale: shares and ratios do not depend on it).
        n_bands: equal-width bands over 0 .. 0.5 cycles/pixel (fewer than H, so none is empty).
        per_image: return each image's spectrum instead of the set's mean.

    Returns:
        ``(n_bands,)`` float64 (``(N, n_bands)`` with ``per_image``), on the CPU, in x's units² per
        coefficient: white noise of variance σ² has σ² in every band.
    """
    size = _side(x)
    band = band_index(size, n_bands).to(x.device)
    x = x.float()
    power = dct_power(x - x.mean(dim=(-2, -1), keepdim=True)).mean(1)  # (N, H, W), channels averaged
    keep = band >= 0
    sums = torch.zeros(len(x), n_bands, dtype=torch.float64, device=x.device)
    sums.index_add_(1, band[keep], power[:, keep].double())
    per = sums.cpu() / band_sizes(size, n_bands)
    return per if per_image else per.mean(0)


def band_shares(power: torch.Tensor, size: int) -> torch.Tensor:
    """Each band's share of the total power of ``size``² images whose spectrum is ``power`` (``(..., n_bands)``,
    :func:`radial_power`); sums to 1 over the last axis."""
    total = power.double() * band_sizes(size, power.shape[-1])
    return total / total.sum(-1, keepdim=True)


def share_above(power: torch.Tensor, size: int, cutoff: float = HIGH_CUTOFF) -> float:
    """The share of power at or above ``cutoff`` cycles/pixel of a spectrum ``power`` (``(n_bands,)``);
    ``cutoff`` must be one of the band edges."""
    n_bands = power.shape[-1]
    edge = cutoff * 2 * n_bands
    if not 0 <= edge <= n_bands or abs(edge - round(edge)) > 1e-9:
        raise ValueError(f"cutoff {cutoff} cycles/pixel is not an edge of {n_bands} bands over 0 .. 0.5; "
                         f"use a multiple of {0.5 / n_bands:g}")
    return float(band_shares(power, size)[..., round(edge):].sum(-1))


def ratio_above(fake: torch.Tensor, real: torch.Tensor, size: int, cutoff: float = HIGH_CUTOFF) -> float:
    """:func:`share_above` of the spectrum ``fake`` over that of ``real`` (NaN where the real share is 0)."""
    real_share = share_above(real, size, cutoff)
    return share_above(fake, size, cutoff) / real_share if real_share else float("nan")


def high_band_share(x: torch.Tensor, cutoff: float = HIGH_CUTOFF, n_bands: int = 16) -> float:
    """The share of the images' power at or above ``cutoff`` cycles/pixel (``x``: ``(N, C, H, W)``, H = W)."""
    return share_above(radial_power(x, n_bands), _side(x), cutoff)


def high_band_ratio(fake: torch.Tensor, real: torch.Tensor, cutoff: float = HIGH_CUTOFF, n_bands: int = 16) -> float:
    """:func:`high_band_share` of ``fake`` over that of ``real``: 1.0 = as sharp as real, < 1 blurrier."""
    size = _side(real)
    if _side(fake) != size:
        raise ValueError(f"fake images are {tuple(fake.shape[-2:])}, real ones {tuple(real.shape[-2:])}: "
                         "compare spectra of one size")
    return ratio_above(radial_power(fake, n_bands), radial_power(real, n_bands), size, cutoff)

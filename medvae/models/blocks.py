"""Building blocks of the convolutional VAE: residual units, down- and upsampling.

All blocks take and return feature maps ``(B, C, H, W)``; they are safe under ``torch.autocast``
and with ``channels_last`` memory format (no views that assume contiguity).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def group_norm(channels: int, groups: int) -> nn.Module:
    """GroupNorm with the largest group count <= ``groups`` that divides ``channels``; ``groups`` 0: no
    normalization (a fully convolutional denoiser applied to whole images: GroupNorm's statistics of a
    training patch are not those of the image, and the last one removes the image's mean level)."""
    if groups == 0:
        return nn.Identity()
    g = math.gcd(channels, groups)
    return nn.GroupNorm(g, channels, eps=1e-6)


class ResUnit(nn.Module):
    """Pre-activation residual unit: (GroupNorm -> SiLU -> conv3x3) twice, plus a skip.

    The skip is the identity when ``in_ch == out_ch`` and a 1x1 conv otherwise.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        groups: GroupNorm groups (reduced to a divisor of the channel count).
    """

    def __init__(self, in_ch: int, out_ch: int, groups: int = 8) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.act = nn.SiLU()
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve the resolution: a strided 3x3 conv (``mode="conv"``: learned, no aliasing-prone pooling),
    or ``"blurpool"``: a 3x3 conv at full resolution, then a fixed ``[1 2 1]ᵀ[1 2 1] / 16`` blur taken
    with stride 2 (Zhang 2019's anti-aliased ConvBlurPool; N2V2's replacement of max-pooling, whose
    aliasing shows as checkerboard artefacts in blind-spot networks)."""

    def __init__(self, in_ch: int, out_ch: int, mode: str = "conv") -> None:
        super().__init__()
        if mode not in ("conv", "blurpool"):
            raise ValueError(f"unknown downsample mode {mode!r}")
        self.mode = mode
        self.conv = nn.Conv2d(in_ch, out_ch, 3, stride=2 if mode == "conv" else 1, padding=1)
        if mode == "blurpool":
            k = torch.tensor([1.0, 2.0, 1.0])
            self.register_buffer("blur", (torch.outer(k, k) / 16).expand(out_ch, 1, 3, 3).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.mode == "blurpool":
            h = nn.functional.conv2d(nn.functional.pad(h, (1, 1, 1, 1), mode="reflect"), self.blur.to(h.dtype),
                                     stride=2, groups=h.shape[1])
        return h


def icnr_(conv: nn.Conv2d, scale: int = 2) -> nn.Conv2d:
    """ICNR init (Aitken et al. 2017) of a conv feeding PixelShuffle(scale), in place.

    Each group of ``scale**2`` output channels that PixelShuffle interleaves into one output
    channel gets identical kernels and biases, so at init the shuffle equals nearest upsampling
    of a conv output: no checkerboard artifacts.
    """
    out_ch, in_ch, kh, kw = conv.weight.shape
    sub = nn.Conv2d(in_ch, out_ch // scale**2, (kh, kw))  # PyTorch's default conv init
    with torch.no_grad():
        conv.weight.copy_(sub.weight.repeat_interleave(scale**2, dim=0))
        if conv.bias is not None:
            conv.bias.copy_(sub.bias.repeat_interleave(scale**2, dim=0))
    return conv


class Upsample(nn.Module):
    """Double the resolution.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        mode: ``"nearest"`` (nearest-neighbour x2 then conv3x3), ``"pixelshuffle"``
            (conv3x3 to 4*out_ch then PixelShuffle(2), ICNR-initialised) or ``"transpose"``
            (ConvTranspose2d k4 s2 p1; may show checkerboard artifacts, kept as an option).
    """

    def __init__(self, in_ch: int, out_ch: int, mode: str = "nearest") -> None:
        super().__init__()
        self.mode = mode
        if mode == "nearest":
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        elif mode == "pixelshuffle":
            self.up = nn.Identity()
            self.conv = nn.Conv2d(in_ch, out_ch * 4, 3, padding=1)
            icnr_(self.conv, 2)
            self.shuffle = nn.PixelShuffle(2)
        elif mode == "transpose":
            self.up = nn.Identity()
            self.conv = nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1)
        else:
            raise ValueError(f"unknown upsample mode {mode!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.up(x))
        if self.mode == "pixelshuffle":
            h = self.shuffle(h)
        return h

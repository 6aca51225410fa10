"""The VAE–GAN's critic: a PatchGAN discriminator, optionally a projection critic."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from medvae.models.blocks import group_norm


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017) returning a logits map and its features.

    ``n_layers`` strided conv4x4 + LeakyReLU(0.2) layers (no norm in the first; GroupNorm in
    the others unless spectral norm is on), one stride-1 conv4x4 layer, then a conv4x4 to one
    logit per patch. Inputs in [0, 1] are mapped to [-1, 1].

    Args:
        in_channels: image channels.
        channels: width of the first layer (doubled per layer, at most x8).
        n_layers: strided layers.
        norm_groups: GroupNorm groups.
        spectral_norm: wrap every conv in spectral normalisation (Miyato et al. 2018).
        n_conditions: > 0 makes it a projection critic (Miyato & Koyama 2018): each patch logit gains
            the inner product of its spatially pooled last features with an embedding of the image's condition id,
            given by ``condition`` (a callable returning the ids of the current batch, set by the VAE–GAN).
    """

    def __init__(
        self, in_channels: int = 1, channels: int = 64, n_layers: int = 3, norm_groups: int = 8,
        spectral_norm: bool = False, n_conditions: int = 0,
    ) -> None:
        super().__init__()

        def conv(i: int, o: int, stride: int) -> nn.Module:
            c = nn.Conv2d(i, o, 4, stride=stride, padding=1)
            return _spectral_norm(c) if spectral_norm else c

        def norm(o: int) -> nn.Module:
            return nn.Identity() if spectral_norm else group_norm(o, norm_groups)

        layers = [nn.Sequential(conv(in_channels, channels, 2), nn.LeakyReLU(0.2))]
        ch = channels
        for k in range(1, n_layers):
            out = channels * min(2**k, 8)
            layers.append(nn.Sequential(conv(ch, out, 2), norm(out), nn.LeakyReLU(0.2)))
            ch = out
        out = channels * min(2**n_layers, 8)
        layers.append(nn.Sequential(conv(ch, out, 1), norm(out), nn.LeakyReLU(0.2)))
        self.layers = nn.ModuleList(layers)
        self.head = conv(out, 1, 1)
        self.projection = nn.Embedding(n_conditions, out) if n_conditions else None
        self.condition = None  # () -> ids (B,) of the current batch; the owning VAE–GAN sets it

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: (B, C, H, W) in [0, 1] -> (logits (B, 1, h, w), [features of every layer])."""
        h = x * 2.0 - 1.0
        feats = []
        for layer in self.layers:
            h = layer(h)
            feats.append(h)
        logits = self.head(h)
        if self.projection is not None:
            ids = self.condition()
            e = self.projection(ids.to(h.device).repeat(h.shape[0] // len(ids)))
            logits = logits + (h.mean((2, 3)) * e.to(h.dtype)).sum(1)[:, None, None, None]  # on every patch
        return logits, feats

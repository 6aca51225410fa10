"""The convolutional VAE (vector latent) on :class:`medvae.models.vae.base.VAEBase`."""

from __future__ import annotations

import math

import torch
from torch import nn

from medvae.config import MonaiConfig, VAEConfig
from medvae.models.blocks import Downsample, ResUnit, Upsample, group_norm
from medvae.models.vae.base import VAEBase

BOTTLENECK = 8  # spatial size of the last encoder feature map, for every image size


def stage_channels(config: VAEConfig | MonaiConfig, bottleneck: int = BOTTLENECK) -> list[int]:
    """Channels at each resolution, from the image size down to the ``bottleneck`` (8x8; a spatial latent's size).

    ``config.channels`` (None: the patch-size default, ``resolved_channels()``) gives the
    first stages; deeper stages (256² inputs need one more than 128²) repeat its last entry.
    Returns ``n_down + 1`` entries.
    """
    n_down = int(round(math.log2(config.image_size / bottleneck)))
    ch = list(config.resolved_channels())
    return [ch[min(k, len(ch) - 1)] for k in range(n_down + 1)]


class ConvVAE(VAEBase):
    """2D convolutional VAE with a vector or a spatial latent.

    Encoder: conv3x3 stem, then per resolution ``res_units`` residual units and a strided conv,
    down to an 8x8 map (a spatial latent: its size); GroupNorm + SiLU; then a vector latent: flatten and a
    linear layer to (mu, logvar) of ``latent_dim``; a spatial latent: a 1x1 conv to (mu, logvar) of
    ``spatial_channels`` per position (as the latent-diffusion autoencoders). Decoder mirrored: linear to
    (C, 8, 8) (spatial: conv3x3 from the latent map), residual units, upsample (nearest+conv, pixel-shuffle or
    transposed conv) per resolution, GroupNorm + SiLU, conv3x3 to logits. Latents are flat ``(B, D)`` either way;
    a spatial model's ``latent_shape`` is their ``(c, h, w)``.

    Args:
        config: VAEConfig (in_channels, image_size 64/128/256, latent_dim or latent spatial, channels,
            res_units, norm_groups, upsample, likelihood, fixed_scale).
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__(config)
        self.spatial = config.latent == "spatial"
        side = config.resolved_spatial_size() if self.spatial else BOTTLENECK
        chs = stage_channels(config, side)
        g, r = config.norm_groups, config.res_units
        c_bot = chs[-1]
        self.bottleneck_shape = (c_bot, side, side)
        flat = c_bot * side * side

        enc: list[nn.Module] = [nn.Conv2d(config.in_channels, chs[0], 3, padding=1)]
        for k in range(len(chs) - 1):
            enc += [ResUnit(chs[k], chs[k], g) for _ in range(r)]
            enc.append(Downsample(chs[k], chs[k + 1]))
        enc += [ResUnit(c_bot, c_bot, g) for _ in range(r)]
        enc += [group_norm(c_bot, g), nn.SiLU()]
        self.encoder = nn.Sequential(*enc)
        cond = config.condition_dim if self.conditional else 0
        if self.spatial:
            c = config.spatial_channels
            self.latent_shape = (c, side, side)
            self.latent_dim = c * side * side
            self.to_stats = nn.Conv2d(c_bot + cond, 2 * c, 1)
            self.from_latent = nn.Conv2d(c + cond, c_bot, 3, padding=1)
        else:
            self.latent_dim = config.latent_dim
            self.to_stats = nn.Linear(flat + cond, 2 * self.latent_dim)
            self.from_latent = nn.Linear(self.latent_dim + cond, flat)
        dec: list[nn.Module] = [ResUnit(c_bot, c_bot, g) for _ in range(r)]
        for k in reversed(range(len(chs) - 1)):
            dec.append(Upsample(chs[k + 1], chs[k], config.upsample))
            dec += [ResUnit(chs[k], chs[k], g) for _ in range(r)]
        dec += [group_norm(chs[0], g), nn.SiLU()]
        self.decoder = nn.Sequential(*dec)
        self.out_conv = nn.Conv2d(chs[0], config.in_channels, 3, padding=1)

    @property
    def last_decoder_weight(self) -> nn.Parameter:
        return self.out_conv.weight

    def _with_condition(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` (B, F) or a map (B, C, h, w) with the condition embedding appended (features, or channels
        constant over the map) for a conditional model, else ``h``."""
        c = self.condition_vector(h.shape[0])
        if c is None:
            return h
        c = c.to(h.dtype)
        return torch.cat([h, c[:, :, None, None].expand(-1, -1, *h.shape[2:]) if h.dim() == 4 else c], 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) in [0, 1] -> mu, logvar: (B, D); logvar clamped to [-30, 20]."""
        return self.posterior(self.features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> the encoder's flattened feature map (B, F), before the condition joins it."""
        self._check_input(x)
        return self.encoder(x).reshape(x.shape[0], -1)

    def posterior(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, F) -> mu, logvar (B, D) of q(z | x[, condition]); split from ``encode`` so a model that
        asks for every class of one image (M2) runs the convolutions once."""
        if self.spatial:
            h = h.reshape(h.shape[0], *self.bottleneck_shape)
        mu, logvar = self.to_stats(self._with_condition(h)).chunk(2, dim=1)  # features or channels
        return mu.flatten(1), logvar.clamp(-30.0, 20.0).flatten(1)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, D) -> decoder logits (B, C, H, W); the mean image is ``likelihood.mean`` of them."""
        if self.spatial:
            h = self.from_latent(self._with_condition(z.reshape(z.shape[0], *self.latent_shape)))
        else:
            h = self.from_latent(self._with_condition(z)).reshape(z.shape[0], *self.bottleneck_shape)
        return self.out_conv(self.decoder(h))

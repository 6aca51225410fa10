"""MONAI baselines behind the medvae model interface: VarAutoEncoder and AutoencoderKL.

Both are driven through their submodules rather than their ``forward`` methods, so behaviour
is the standard VAE one on every MONAI version: ``encode`` returns the posterior (mu, logvar)
and eval-mode ``forward`` decodes the posterior mean (MONAI's ``VarAutoEncoder`` returns
mu + std in eval by default, and ``AutoencoderKL.forward`` samples even in eval). Outputs go
through a sigmoid so x_hat is in [0, 1], and the pixel likelihood is the one every medvae model
shares (:class:`medvae.models.distributions.Likelihood`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL, VarAutoEncoder
from torch import nn

from medvae.config import MonaiConfig
from medvae.errors import ConfigError
from medvae.models.vae.base import VAEBase
from medvae.models.vae.conv import BOTTLENECK, stage_channels


def _last_conv_weight(module: nn.Module) -> nn.Parameter:
    """Weight of the conv that produces ``module``'s output (the last one registered)."""
    convs = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    return convs[-1].weight


class MonaiVAE(VAEBase):
    """MONAI ``VarAutoEncoder`` (vector latent) with medvae's interface.

    Same depth rule as ConvVAE: stride-2 stages with ``stage_channels(config)[1:]`` down to an
    8x8 map, ``config.res_units`` MONAI residual units per stage, instance norm and PReLU
    (MONAI's defaults), latent ``config.latent_dim``.
    """

    def __init__(self, config: MonaiConfig) -> None:
        super().__init__(config)
        self.latent_dim = config.latent_dim
        chs = tuple(stage_channels(config)[1:])
        size = config.image_size
        self.net = VarAutoEncoder(
            spatial_dims=2,
            in_shape=(config.in_channels, size, size),
            out_channels=config.in_channels,
            latent_size=config.latent_dim,
            channels=chs,
            strides=(2,) * len(chs),
            num_res_units=config.res_units,
            use_sigmoid=False,
        )
        self.bottleneck_shape = (chs[-1], BOTTLENECK, BOTTLENECK)
        self._last = _last_conv_weight(self.net.decode)

    @property
    def last_decoder_weight(self) -> nn.Parameter:
        return self._last

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) -> mu, logvar (B, D), from the encoder and the mu / logvar heads."""
        self._check_input(x)
        h = self.net.intermediate(self.net.encode(x)).reshape(x.shape[0], -1)
        return self.net.mu(h), self.net.logvar(h).clamp(-30.0, 20.0)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, D) -> logits (B, C, H, W) (MONAI's decode_forward without its sigmoid)."""
        h = F.relu(self.net.decodeL(z)).reshape(z.shape[0], *self.bottleneck_shape)
        return self.net.decode(h)


class MonaiKL(VAEBase):
    """MONAI ``AutoencoderKL`` (spatial latent, as in latent diffusion) with medvae's interface.

    Levels ``stage_channels(config)`` (ConvVAE's, down to an 8x8 map), ``config.res_units + 1``
    residual blocks per level (LDM uses 2), no attention (MONAI needs einops for it, which is
    not a dependency). Its spatial latent has ``latent_dim / 64`` channels at 8x8, flattened,
    so ``latent_dim`` equals ConvVAE's; mu and logvar are (B, D), the prior N(0, I) over all D.
    """

    def __init__(self, config: MonaiConfig) -> None:
        super().__init__(config)
        chs = tuple(stage_channels(config))
        area = BOTTLENECK * BOTTLENECK
        if config.latent_dim % area:
            raise ConfigError(
                f"model.latent_dim={config.latent_dim}: monai-kl needs a multiple of {area} "
                f"(its latent is channels x {BOTTLENECK} x {BOTTLENECK}); e.g. 128"
            )
        c = config.latent_dim // area
        self.latent_shape = (c, BOTTLENECK, BOTTLENECK)
        self.latent_dim = config.latent_dim
        self.net = AutoencoderKL(
            spatial_dims=2,
            in_channels=config.in_channels,
            out_channels=config.in_channels,
            num_res_blocks=config.res_units + 1,
            channels=chs,
            attention_levels=(False,) * len(chs),
            latent_channels=c,
            norm_num_groups=math.gcd(*chs, config.norm_groups),
            with_encoder_nonlocal_attn=False,
            with_decoder_nonlocal_attn=False,
        )
        self._last = _last_conv_weight(self.net.decoder)

    @property
    def last_decoder_weight(self) -> nn.Parameter:
        return self._last

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) -> mu, logvar (B, D): AutoencoderKL.encode's heads, no sampling."""
        self._check_input(x)
        h = self.net.encoder(x)
        mu = self.net.quant_conv_mu(h)
        logvar = self.net.quant_conv_log_sigma(h).clamp(-30.0, 20.0)  # as AutoencoderKL.encode
        return mu.reshape(x.shape[0], -1), logvar.reshape(x.shape[0], -1)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, D) -> logits (B, C, H, W) through post_quant_conv and the decoder."""
        return self.net.decode(z.reshape(z.shape[0], *self.latent_shape))

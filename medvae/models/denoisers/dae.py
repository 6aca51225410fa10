"""``dae``: the deterministic denoising U-Net (a :class:`medvae.models.denoisers.interface.Denoiser`,
no latent): noisy in, the denoised image's likelihood parameters out."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from medvae.config import DAEConfig
from medvae.errors import ConfigError
from medvae.models.denoisers.interface import DenoiserOutput
from medvae.models.denoisers.unet import UNetLayers, pad_to_multiple
from medvae.models.distributions import Likelihood


class DAE(UNetLayers, nn.Module):
    """The U-Net (:class:`medvae.models.denoisers.unet.UNetLayers`) with its skips and no latent.

    Args:
        config: DAEConfig: in_channels, channels (one entry per resolution), res_units, norm_groups,
            upsample, likelihood, top_skip, downsample, input_residual.
    """

    def __init__(self, config: DAEConfig) -> None:
        super().__init__()
        self.config = config
        self.likelihood = Likelihood(config.likelihood, config.in_channels, config.fixed_scale,
                                     noise_model=(config.noise_a, config.noise_b))
        self._build_unet(config, variational=False)

    @contextlib.contextmanager
    def conditioned_on(self, ids: torch.Tensor | None):
        """Denoisers take no class / modality condition: ``ids`` must be None."""
        if ids is not None:
            raise ConfigError("the dae takes no class or modality condition")
        yield

    def forward(self, x: torch.Tensor) -> DenoiserOutput:
        """Noisy (or clean) x ``(B, C, H, W)`` (H, W multiples of ``multiple``) -> the denoised image."""
        h, feats = self._encode_features(x)
        logits = self._decode(h, feats, x)
        return DenoiserOutput(self.likelihood.mean(logits), logits)

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, samples: int = 0, generator: torch.Generator | None = None,
                return_sd: bool = False) -> torch.Tensor:
        """x ``(B, C, H, W)`` of any size -> the denoised image, same shape (padded internally). The dae
        is deterministic: ``samples`` and ``return_sd`` are refused."""
        if samples > 0 or return_sd:
            raise ConfigError("the dae model is deterministic: it has no posterior to sample; train unet-vae")
        xp, (h, w) = pad_to_multiple(x, self.multiple)
        return self.forward(xp).x_hat[..., :h, :w]

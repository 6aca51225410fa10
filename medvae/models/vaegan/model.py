"""The VAE–GAN hybrid: the ConvVAE plus a PatchGAN-style discriminator.

The VAE keeps its encoder and prior (varied samples); the discriminator judges the decoder
on reconstructions and decoded prior samples (sharp samples), as in Larsen et al. 2016. The
losses and the critic's step live in :mod:`medvae.training.adversarial`.
"""

from __future__ import annotations

import torch

from medvae.config import VAEGANConfig
from medvae.models.vae.conv import ConvVAE
from medvae.models.vaegan.discriminator import PatchDiscriminator


class VAEGAN(ConvVAE):
    """ConvVAE + PatchDiscriminator (``discriminator``: its own optimizer trains it, medvae.training.adversarial).

    Args:
        config: VAEGANConfig; ``disc_channels``, ``disc_layers``, ``spectral_norm`` shape D.
    """

    def __init__(self, config: VAEGANConfig) -> None:
        super().__init__(config)
        self.discriminator = PatchDiscriminator(
            config.in_channels, config.disc_channels, config.disc_layers, config.norm_groups,
            config.spectral_norm, len(config.condition_names) if self.conditional else 0,
        )
        if self.conditional:
            self.discriminator.condition = self._critic_ids

    def _critic_ids(self) -> torch.Tensor:
        if self._condition is None:
            raise ValueError("the projection critic was called outside `conditioned_on(ids)`")
        return self._condition

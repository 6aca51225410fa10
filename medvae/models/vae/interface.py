"""What a VAE-like model is to the code that trains, scores and samples it: :class:`VariationalModel`,
and what its ``forward`` returns (:class:`VAEOutput`). Training, evaluation and synthesis depend on
this, never on a model class; :class:`medvae.models.vae.base.VAEBase` implements it once for the
ConvVAE, the VAE–GAN, the MONAI baselines and unet-vae."""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Protocol

import torch
from torch import nn

from medvae.models.distributions import Likelihood


class VAEOutput(NamedTuple):
    """What ``forward`` returns: everything the losses need, so they never call the model.

    x_hat: (B, C, H, W) mean image in [0, 1]; mu, logvar, z: (B, D) (a spatial latent:
    (B, D, h, w)); logits: (B, C, H, W) the decoder's raw output for z; x_prior: (n_prior, C, H, W)
    decoded prior samples, or None.
    """

    x_hat: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor
    logits: torch.Tensor | None = None
    x_prior: torch.Tensor | None = None


class VariationalModel(Protocol):
    """A VAE-like model: images ``(B, C, H, W)`` in [0, 1], likelihoods in nats per image.

    config: the family's config it was built from (stored with its weights); latent_dim: D;
    likelihood: the decoder's pixel likelihood; last_decoder_weight: the weight the adaptive
    adversarial weight is computed on. A class- or modality-conditioned model is called inside
    ``with model.conditioned_on(ids):``; an unconditional one accepts ``conditioned_on(None)``.
    """

    latent_dim: int
    likelihood: Likelihood

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (mu, logvar) of q(z | x)."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z -> mean image in [0, 1]."""

    def forward(self, x: torch.Tensor, n_prior: int = 0) -> VAEOutput:
        """Everything the training losses need, so DDP sees every gradient through ``forward``."""

    def log_likelihood(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """log p(x | x_hat) per image, (B,) nats."""

    def conditioned_on(self, ids: torch.Tensor | None) -> contextlib.AbstractContextManager:
        """Condition ids ``(B,)`` for the calls inside the block."""

    @property
    def last_decoder_weight(self) -> nn.Parameter: ...

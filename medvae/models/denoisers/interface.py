"""What a denoiser is to the code that trains and applies it: :class:`Denoiser`, and what its ``forward``
returns. ``dae`` is one; ``unet-vae`` is one too and also a VAE-like model
(:class:`medvae.models.vae.interface.VariationalModel`)."""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Protocol

import torch
from torch import nn

from medvae.models.distributions import Likelihood


class DenoiserOutput(NamedTuple):
    """The dae's ``forward``: x_hat ``(B, C, H, W)`` the denoised mean image in [0, 1]; logits: the
    decoder's raw output (the likelihood's parameter); prior_logvar: a prior network's (``model.prior``)
    per-pixel log-variance of the clean value around x_hat, else None."""

    x_hat: torch.Tensor
    logits: torch.Tensor
    prior_logvar: torch.Tensor | None = None


class Denoiser(Protocol):
    """A fully convolutional denoiser: noisy ``(B, C, H, W)`` in [0, 1] -> denoised, the same shape.

    likelihood: the pixel likelihood its training loss scores the target under; multiple: H and W of
    ``forward``'s input must be multiples of it (``denoise`` pads any size); last_decoder_weight: the
    output conv's weight. Denoisers take no class / modality condition: ``conditioned_on(None)``.
    """

    likelihood: Likelihood
    multiple: int

    def forward(self, x: torch.Tensor) -> DenoiserOutput:
        """``x_hat`` and ``logits`` of the denoised image (unet-vae: a VAEOutput, which has both)."""

    def denoise(self, x: torch.Tensor, samples: int = 0, generator: torch.Generator | None = None,
                return_sd: bool = False):
        """x of any size -> the denoised image (padded internally)."""

    def conditioned_on(self, ids: torch.Tensor | None) -> contextlib.AbstractContextManager:
        """A no-op for ``None``."""

    @property
    def last_decoder_weight(self) -> nn.Parameter: ...

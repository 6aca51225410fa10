"""The base class of every VAE-like model (ConvVAE, VAE–GAN, the MONAI baselines, unet-vae).

Subclasses implement ``encode`` and ``decode_logits``; the base class supplies ``decode`` (mean
image), ``forward`` (what the training losses need, :class:`medvae.models.vae.interface.VAEOutput`),
``log_likelihood`` and ``conditioned_on`` from them, with the pixel likelihood of
:class:`medvae.models.distributions.Likelihood`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from medvae.config import MonaiConfig, UNetVAEConfig, VAEConfig
from medvae.errors import ConfigError
from medvae.models.distributions import Likelihood, reparameterize, standard_normal
from medvae.models.vae.interface import VAEOutput


class VAEBase(nn.Module):
    """The :class:`medvae.models.vae.interface.VariationalModel` interface on top of ``encode`` / ``decode_logits``.

    Subclasses set ``latent_dim`` and ``last_decoder_weight`` and implement ``encode(x)`` and
    ``decode_logits(z)``.
    """

    latent_dim: int

    def __init__(self, config: VAEConfig | MonaiConfig | UNetVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.likelihood = Likelihood(config.likelihood, config.in_channels, config.fixed_scale,
                                     noise_model=(config.noise_a, config.noise_b))
        # class / modality models: an embedding of the condition id (medvae.data.conditions); the id of
        # the current batch is set by `conditioned_on`, so every caller (losses, metrics) stays unchanged
        self.condition_embedding = None
        if config.condition in ("class", "modality"):
            self.condition_embedding = nn.Embedding(len(config.condition_names), config.condition_dim)
        self._condition: torch.Tensor | None = None

    @property
    def conditional(self) -> bool:
        return self.condition_embedding is not None

    @contextlib.contextmanager
    def conditioned_on(self, ids: torch.Tensor | None):
        """Inside the block, encode / decode / the critic use condition ``ids (B,)`` for batches of B (or a
        multiple of B: the VAE–GAN feeds its critic real, reconstructed and prior images of the same ids).
        ``None`` is allowed for an unconditional model only."""
        if self.conditional and ids is None:
            raise ConfigError(f"this model is conditioned on {self.config.condition} "
                              f"({', '.join(self.config.condition_names)}): give a condition id per image")
        old = self._condition
        self._condition = ids if self.conditional else None
        try:
            yield
        finally:
            self._condition = old

    def condition_vector(self, batch: int) -> torch.Tensor | None:
        """The embedding ``(batch, condition_dim)`` of the current ids, or None for an unconditional model."""
        if not self.conditional:
            return None
        ids = self._condition
        if ids is None:
            raise ConfigError("a conditional model was called outside `conditioned_on(ids)`")
        if batch % len(ids):
            raise ValueError(f"batch of {batch} images for {len(ids)} condition ids")
        return self.condition_embedding(ids.to(self.condition_embedding.weight.device).repeat(batch // len(ids)))

    # --- to implement
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @property
    def last_decoder_weight(self) -> nn.Parameter:  # pragma: no cover
        raise NotImplementedError

    # --- shared
    def _check_input(self, x: torch.Tensor) -> None:
        size, ch = self.config.image_size, self.config.in_channels
        if x.dim() != 4 or x.shape[1] != ch or x.shape[-2:] != (size, size):
            raise ConfigError(
                f"model expects (B, {ch}, {size}, {size}) images, got {tuple(x.shape)}; "
                "set model.image_size / model.in_channels to the patch store's shape"
            )

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, D) -> mean image (B, C, H, W) in [0, 1] (sigmoid of the decoder logits; the
        continuous-Bernoulli mean for that likelihood)."""
        return self.likelihood.mean(self.decode_logits(z))

    def forward(self, x: torch.Tensor, n_prior: int = 0) -> VAEOutput:
        """x: (B, C, H, W) in [0, 1] -> :class:`VAEOutput`.

        z is sampled (:func:`medvae.models.distributions.reparameterize`) in training mode and the posterior mean
        in eval mode, so eval reconstructions are deterministic. ``n_prior > 0`` also decodes that
        many z ~ N(0, I) (``x_prior``, the critic's second kind of fake), drawn after z.
        """
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar) if self.training else mu
        logits = self.decode_logits(z)
        x_prior = None
        if n_prior > 0:
            x_prior = self.decode(standard_normal((n_prior, self.latent_dim), x.device))
        return VAEOutput(self.likelihood.mean(logits), mu, logvar, z, logits, x_prior)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def log_likelihood(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """log p(x | x_hat) summed over pixels: (B,) float32 nats. x_hat is the mean image."""
        return self.likelihood.log_prob(x, mean=x_hat)

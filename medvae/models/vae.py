"""The convolutional VAE (vector latent) and the base class implementing the model interface.

Every medvae model derives from :class:`VAEBase`, which implements
:class:`medvae.models.interface.GenerativeModel`: subclasses implement ``encode`` and
``decode_logits``; the base class supplies ``decode`` (mean image), ``forward`` (what the
training losses need, see :class:`medvae.models.interface.VAEOutput`), ``log_likelihood``,
``conditioned_on`` and ``generator_parameters`` from them, with the pixel likelihood of
:class:`medvae.models.distributions.Likelihood`.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from medvae.config import ModelConfig
from medvae.errors import ConfigError
from medvae.models.blocks import Downsample, ResUnit, Upsample, group_norm
from medvae.models.distributions import Likelihood, reparameterize, standard_normal
from medvae.models.interface import VAEOutput

BOTTLENECK = 8  # spatial size of the last encoder feature map, for every image size


class VAEBase(nn.Module):
    """The model interface of docs/architecture.md on top of ``encode`` / ``decode_logits``.

    Subclasses set ``latent_dim`` and ``last_decoder_weight`` and implement ``encode(x)`` and
    ``decode_logits(z)``.
    """

    latent_dim: int
    discriminator: nn.Module | None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.discriminator = None  # instance attribute: a VAE–GAN replaces it with a Module
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

    def log_likelihood_logits(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """As ``log_likelihood`` from the decoder's raw logits (exact for Bernoulli types)."""
        return self.likelihood.log_prob(x, logits=logits)

    def generator_parameters(self) -> list[nn.Parameter]:
        """All parameters except the discriminator's."""
        skip = set()
        if self.discriminator is not None:
            skip = {id(p) for p in self.discriminator.parameters()}
        return [p for p in self.parameters() if id(p) not in skip]


def stage_channels(config: ModelConfig) -> list[int]:
    """Channels at each resolution, from the image size down to the 8x8 bottleneck.

    ``config.channels`` (None: the patch-size default, ``ModelConfig.resolved_channels``) gives the
    first stages; deeper stages (256² inputs need one more than 128²) repeat its last entry.
    Returns ``n_down + 1`` entries.
    """
    n_down = int(round(math.log2(config.image_size / BOTTLENECK)))
    ch = list(config.resolved_channels())
    return [ch[min(k, len(ch) - 1)] for k in range(n_down + 1)]


class ConvVAE(VAEBase):
    """2D convolutional VAE with a vector latent.

    Encoder: conv3x3 stem, then per resolution ``res_units`` residual units and a strided conv,
    down to an 8x8 map; GroupNorm + SiLU; flatten; linear to (mu, logvar) of ``latent_dim``.
    Decoder mirrored: linear to (C, 8, 8), residual units, upsample (nearest+conv,
    pixel-shuffle or transposed conv) per resolution, GroupNorm + SiLU, conv3x3 to logits.

    Args:
        config: ModelConfig (in_channels, image_size 64/128/256, latent_dim, channels,
            res_units, norm_groups, upsample, likelihood, fixed_scale).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.latent_dim = config.latent_dim
        chs = stage_channels(config)
        g, r = config.norm_groups, config.res_units
        c_bot = chs[-1]
        self.bottleneck_shape = (c_bot, BOTTLENECK, BOTTLENECK)
        flat = c_bot * BOTTLENECK * BOTTLENECK

        enc: list[nn.Module] = [nn.Conv2d(config.in_channels, chs[0], 3, padding=1)]
        for k in range(len(chs) - 1):
            enc += [ResUnit(chs[k], chs[k], g) for _ in range(r)]
            enc.append(Downsample(chs[k], chs[k + 1]))
        enc += [ResUnit(c_bot, c_bot, g) for _ in range(r)]
        enc += [group_norm(c_bot, g), nn.SiLU()]
        self.encoder = nn.Sequential(*enc)
        cond = config.condition_dim if self.conditional else 0
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
        """``h (B, F)`` with the condition embedding appended (a conditional model), else ``h``."""
        c = self.condition_vector(h.shape[0])
        return h if c is None else torch.cat([h, c.to(h.dtype)], 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) in [0, 1] -> mu, logvar: (B, D); logvar clamped to [-30, 20]."""
        self._check_input(x)
        h = self.encoder(x).reshape(x.shape[0], -1)
        h = self._with_condition(h)
        mu, logvar = self.to_stats(h).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, D) -> decoder logits (B, C, H, W); the mean image is ``likelihood.mean`` of them."""
        h = self.from_latent(self._with_condition(z)).reshape(z.shape[0], *self.bottleneck_shape)
        return self.out_conv(self.decoder(h))

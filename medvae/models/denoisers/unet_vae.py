"""``unet-vae``: the U-Net with a spatial Gaussian latent at its bottleneck, a VAE and a denoiser.

``mu``, ``logvar`` are the spatial latent ``(B, latent_channels, H/2^n, W/2^n)`` flattened to
``(B, D)``; ``decode(z)`` (prior samples, :mod:`medvae.synthesis.sampling`) runs the decoder without
skip features (zeros). It can return the MMSE estimate of N posterior samples and their per-pixel sd
(:meth:`UNetVAE.denoise`; DivNoising, Prakash et al. 2021).
"""

from __future__ import annotations

import torch

from medvae.config import UNetVAEConfig
from medvae.errors import ConfigError
from medvae.models.denoisers.unet import BORDER_MARGIN, UNetLayers, pad_to_multiple
from medvae.models.distributions import reparameterize, standard_normal
from medvae.models.vae.base import VAEBase
from medvae.models.vae.interface import VAEOutput


class UNetVAE(UNetLayers, VAEBase):
    """The U-Net (:class:`medvae.models.denoisers.unet.UNetLayers`) with a spatial latent.

    Args:
        config: UNetVAEConfig: in_channels, image_size (the latent's size), channels (one entry per
            resolution), res_units, norm_groups, upsample, likelihood, skip_connections, latent_channels.
    """

    def __init__(self, config: UNetVAEConfig) -> None:
        super().__init__(config)
        self._build_unet(config, variational=True)
        side = config.image_size // self.multiple
        self.latent_shape = (config.latent_channels, side, side)
        self.latent_dim = config.latent_channels * side * side

    def _stats(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.to_stats(h).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (mu, logvar) flattened ``(B, D)``."""
        h, _ = self._encode_features(x)
        mu, logvar = self._stats(h)
        return mu.flatten(1), logvar.flatten(1)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """z ``(B, D)`` (or the spatial ``(B, c, h, w)``) -> logits, decoded without skip features."""
        z = z.reshape(z.shape[0], *self.latent_shape) if z.dim() == 2 else z
        return self._decode(self.from_latent(z), None, None)

    def forward(self, x: torch.Tensor, n_prior: int = 0) -> VAEOutput:
        """Noisy (or clean) x -> :class:`VAEOutput` whose ``x_hat`` is the denoised image; z is sampled in
        training mode and the posterior mean in eval mode."""
        h, feats = self._encode_features(x)
        mu, logvar = self._stats(h)
        z = reparameterize(mu, logvar) if self.training else mu
        logits = self._decode(self.from_latent(z), feats, x)
        x_prior = None
        if n_prior > 0:
            x_prior = self.decode(standard_normal((n_prior, self.latent_dim), x.device))
        return VAEOutput(self.likelihood.mean(logits), mu.flatten(1), logvar.flatten(1), z.flatten(1), logits,
                         x_prior)

    def posterior_samples(self, x: torch.Tensor, n: int, generator: torch.Generator | None = None):
        """The clean estimates of ``n`` posterior samples, one at a time: for each, ``z = mu + sigma * eps``
        (eps from ``generator``, ``mu.shape`` per draw) decoded with the input's skip features; yields
        ``(B, C, H, W)`` images (x's size must be a multiple)."""
        h, feats = self._encode_features(x)
        mu, logvar = self._stats(h)
        for _ in range(n):
            z = reparameterize(mu, logvar, generator).to(mu.dtype)
            yield self.likelihood.mean(self._decode(self.from_latent(z), feats, x))

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, samples: int = 0, generator: torch.Generator | None = None,
                return_sd: bool = False):
        """x ``(B, C, H, W)`` of any size -> denoised image, same shape (padded internally).

        ``samples`` 0: one forward pass (the posterior mean code). ``samples`` N > 0: the MMSE estimate,
        the mean of N posterior samples' clean estimates (:meth:`posterior_samples`), and with
        ``return_sd`` also their per-pixel sample sd (N - 1 in the denominator; zeros for N = 1):
        returns ``(mean, sd)``.
        """
        xp, (rows, cols) = pad_to_multiple(x, self.multiple, BORDER_MARGIN)
        if samples <= 0:
            if return_sd:
                raise ConfigError("a posterior sd needs posterior samples: give samples >= 2 (unet-vae)")
            return self.forward(xp).x_hat[..., rows, cols]
        mean = m2 = None
        for k, s in enumerate(self.posterior_samples(xp, samples, generator), start=1):
            s = s.float()
            if mean is None:
                mean, m2 = s.clone(), torch.zeros_like(s)
            else:  # Welford: stable running mean and sum of squared deviations
                delta = s - mean
                mean += delta / k
                m2 += delta * (s - mean)
        mean = mean[..., rows, cols].to(x.dtype)
        if not return_sd:
            return mean
        sd = (m2 / max(samples - 1, 1)).sqrt()[..., rows, cols].to(x.dtype)
        return mean, sd

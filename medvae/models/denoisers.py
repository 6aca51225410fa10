"""Fully convolutional denoisers: ``unet-vae`` (a VAE with a spatial latent and optional U-Net skips)
and ``dae`` (a deterministic denoising autoencoder with skips).

Both are U-shaped stacks of the ConvVAE's blocks (residual units, strided-conv downsampling,
nearest-neighbour upsampling + conv: no transposed convolutions, so no checkerboard artefacts) and
take any image whose height and width are multiples of ``2 ** (len(channels) - 1)``, so a model
trained on 128² patches denoises whole 512² slices at native resolution (callers pad other sizes:
:func:`pad_to_multiple`). The output is a residual on the input in logit space,
``sigmoid(logit(x_in) + f(x_in))``, so an untrained model starts near the identity
(``input_residual``; DivNoising turns it off, and the skips, so that the latent is the only path
from the noisy input to the output).

Options for self-supervised training (ModelConfig): ``top_skip`` False drops the skip at full
resolution and ``downsample: blurpool`` replaces the strided convs by anti-aliased ones, N2V2's
two architecture fixes (Höck et al. 2022). ``unet-vae`` can return the MMSE estimate of N
posterior samples and their per-pixel sd (:meth:`UNetDenoiser.denoise`; DivNoising, Prakash et
al. 2021).

Interface (docs/architecture.md, "Model interface"): ``encode`` / ``decode`` / ``forward`` /
``log_likelihood`` as every medvae model. ``unet-vae``: ``mu``, ``logvar`` are the spatial latent
``(B, latent_channels, H/2^n, W/2^n)`` flattened to ``(B, D)``; ``decode(z)`` (so prior samples,
:mod:`medvae.synthesis.sampling`) runs the decoder without skip features (zeros). ``dae``: no
latent distribution: ``mu`` and ``logvar`` are zeros ``(B, 1)`` (KL 0) and ``decode`` raises
ConfigError.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medvae.config import ModelConfig
from medvae.errors import ConfigError
from medvae.models.blocks import Downsample, ResUnit, Upsample, group_norm
from medvae.models.distributions import reparameterize, standard_normal
from medvae.models.interface import VAEOutput
from medvae.models.vae import VAEBase

_IN_CLAMP = 0.005  # logit of the input is taken on [0.005, 0.995]


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad ``(B, C, H, W)`` at the bottom / right to multiples of ``multiple``; returns the
    padded tensor and the original ``(H, W)`` to crop back to."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


class UNetDenoiser(VAEBase):
    """The U-shaped network behind ``unet-vae`` (``variational=True``) and ``dae``.

    Args:
        config: ModelConfig: in_channels, image_size (the latent's size), channels (one entry per
            resolution), res_units, norm_groups, upsample, likelihood, skip_connections,
            latent_channels.
        variational: a spatial Gaussian latent at the bottleneck (unet-vae) or none (dae).
    """

    def __init__(self, config: ModelConfig, variational: bool) -> None:
        super().__init__(config)
        chs, g, r = list(config.resolved_channels()), config.norm_groups, config.res_units
        self.variational, self.skips = variational, config.skip_connections or not variational
        self.n_down = len(chs) - 1
        self.multiple = 2 ** self.n_down
        self.stem = nn.Conv2d(config.in_channels, chs[0], 3, padding=1)
        self.enc = nn.ModuleList(nn.Sequential(*[ResUnit(c, c, g) for _ in range(r)]) for c in chs[:-1])
        self.down = nn.ModuleList(Downsample(chs[k], chs[k + 1], config.downsample) for k in range(self.n_down))
        self.mid = nn.Sequential(*[ResUnit(chs[-1], chs[-1], g) for _ in range(max(r, 1))])
        lc = config.latent_channels
        if variational:
            self.to_stats = nn.Sequential(group_norm(chs[-1], g), nn.SiLU(), nn.Conv2d(chs[-1], 2 * lc, 1))
            self.from_latent = nn.Conv2d(lc, chs[-1], 3, padding=1)
        self.up = nn.ModuleList(Upsample(chs[k + 1], chs[k], config.upsample) for k in range(self.n_down))
        # the skip of level k is used unless skips are off, or k is the top level and top_skip is off (N2V2)
        self.skip_at = [self.skips and (k > 0 or config.top_skip) for k in range(self.n_down)]
        self.fuse = nn.ModuleList(ResUnit(2 * chs[k] if self.skip_at[k] else chs[k], chs[k], g)
                                  for k in range(self.n_down))
        self.out_norm = nn.Sequential(group_norm(chs[0], g), nn.SiLU())
        self.out_conv = nn.Conv2d(chs[0], config.in_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)  # start at the identity (the residual is 0)
        nn.init.zeros_(self.out_conv.bias)
        side = config.image_size // self.multiple
        self.latent_shape = (lc, side, side)
        self.latent_dim = lc * side * side if variational else 1

    @property
    def last_decoder_weight(self) -> nn.Parameter:
        return self.out_conv.weight

    def _check_input(self, x: torch.Tensor) -> None:
        ch, m = self.config.in_channels, self.multiple
        if x.dim() != 4 or x.shape[1] != ch or x.shape[-2] % m or x.shape[-1] % m:
            raise ConfigError(f"{self.config.name} expects (B, {ch}, H, W) with H and W multiples of {m}, got "
                              f"{tuple(x.shape)}; pad the image (medvae.models.denoisers.pad_to_multiple)")

    def _encode_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self._check_input(x)
        h = self.stem(x)
        feats = []
        for block, down in zip(self.enc, self.down):
            h = block(h)
            feats.append(h)
            h = down(h)
        return self.mid(h), feats

    def _stats(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.to_stats(h).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (mu, logvar) flattened ``(B, D)`` (unet-vae) or zeros ``(B, 1)`` (dae)."""
        h, _ = self._encode_features(x)
        if not self.variational:
            zero = h.new_zeros(x.shape[0], 1)
            return zero, zero
        mu, logvar = self._stats(h)
        return mu.flatten(1), logvar.flatten(1)

    def _decode(self, h: torch.Tensor, feats: list[torch.Tensor] | None, x_in: torch.Tensor | None) -> torch.Tensor:
        for k in reversed(range(self.n_down)):
            h = self.up[k](h)
            if self.skip_at[k]:
                h = torch.cat([h, feats[k] if feats is not None else torch.zeros_like(h)], 1)
            h = self.fuse[k](h)
        out = self.out_conv(self.out_norm(h))
        if x_in is not None and self.config.input_residual:
            out = out + torch.logit(x_in.float().clamp(_IN_CLAMP, 1 - _IN_CLAMP)).to(out.dtype)
        return out

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """z ``(B, D)`` -> logits, decoded without skip features (unet-vae only)."""
        if not self.variational:
            raise ConfigError("the dae model is deterministic: it has no latent to decode or sample from")
        z = z.reshape(z.shape[0], *self.latent_shape) if z.dim() == 2 else z
        return self._decode(self.from_latent(z), None, None)

    def forward(self, x: torch.Tensor, n_prior: int = 0) -> VAEOutput:
        """Noisy (or clean) x -> :class:`VAEOutput` whose ``x_hat`` is the denoised image.

        unet-vae samples z in training mode and takes the posterior mean in eval mode.
        """
        h, feats = self._encode_features(x)
        if self.variational:
            mu, logvar = self._stats(h)
            z = reparameterize(mu, logvar) if self.training else mu
            h = self.from_latent(z)
            mu, logvar, z = mu.flatten(1), logvar.flatten(1), z.flatten(1)
        else:
            mu = logvar = z = h.new_zeros(x.shape[0], 1)
        logits = self._decode(h, feats, x)
        x_prior = None
        if n_prior > 0:
            x_prior = self.decode(standard_normal((n_prior, self.latent_dim), x.device))
        return VAEOutput(self.likelihood.mean(logits), mu, logvar, z, logits, x_prior)

    def posterior_samples(self, x: torch.Tensor, n: int, generator: torch.Generator | None = None):
        """The clean estimates of ``n`` posterior samples of unet-vae, one at a time: for each,
        ``z = mu + sigma * eps`` (eps from ``generator``, ``mu.shape`` per draw) decoded with the
        input's skip features; yields ``(B, C, H, W)`` images (x's size must be a multiple)."""
        if not self.variational:
            raise ConfigError("the dae model is deterministic: it has no posterior to sample; train unet-vae")
        h, feats = self._encode_features(x)
        mu, logvar = self._stats(h)
        for _ in range(n):
            z = reparameterize(mu, logvar, generator).to(mu.dtype)
            yield self.likelihood.mean(self._decode(self.from_latent(z), feats, x))

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, samples: int = 0, generator: torch.Generator | None = None,
                return_sd: bool = False):
        """x ``(B, C, H, W)`` of any size -> denoised image, same shape (padded internally).

        ``samples`` 0: one forward pass (unet-vae decodes the posterior mean code). ``samples`` N > 0
        (unet-vae): the MMSE estimate, the mean of N posterior samples' clean estimates
        (:meth:`posterior_samples`), and with ``return_sd`` also their per-pixel sample sd (N - 1
        in the denominator; zeros for N = 1): returns ``(mean, sd)``.
        """
        xp, (h, w) = pad_to_multiple(x, self.multiple)
        if samples <= 0:
            if return_sd:
                raise ConfigError("a posterior sd needs posterior samples: give samples >= 2 (unet-vae)")
            return self.forward(xp).x_hat[..., :h, :w]
        mean = m2 = None
        for k, s in enumerate(self.posterior_samples(xp, samples, generator), start=1):
            s = s.float()
            if mean is None:
                mean, m2 = s.clone(), torch.zeros_like(s)
            else:  # Welford: stable running mean and sum of squared deviations
                delta = s - mean
                mean += delta / k
                m2 += delta * (s - mean)
        mean = mean[..., :h, :w].to(x.dtype)
        if not return_sd:
            return mean
        sd = (m2 / max(samples - 1, 1)).sqrt()[..., :h, :w].to(x.dtype)
        return mean, sd

"""Fully convolutional denoisers: ``unet-vae`` (a VAE with a spatial latent and optional U-Net skips)
and ``dae`` (a deterministic denoising autoencoder with skips).

Both are U-shaped stacks of the ConvVAE's blocks (residual units, strided-conv downsampling,
nearest-neighbour upsampling + conv: no transposed convolutions, so no checkerboard artefacts) and
take any image whose height and width are multiples of ``2 ** (len(channels) - 1)``, so a model
trained on 128² patches denoises whole 512² slices at native resolution (callers pad other sizes:
:func:`pad_to_multiple`). The output is a residual on the input in logit space,
``sigmoid(logit(x_in) + f(x_in))``, so an untrained model starts near the identity.

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
        chs, g, r = list(config.channels), config.norm_groups, config.res_units
        self.variational, self.skips = variational, config.skip_connections or not variational
        self.n_down = len(chs) - 1
        self.multiple = 2 ** self.n_down
        self.stem = nn.Conv2d(config.in_channels, chs[0], 3, padding=1)
        self.enc = nn.ModuleList(nn.Sequential(*[ResUnit(c, c, g) for _ in range(r)]) for c in chs[:-1])
        self.down = nn.ModuleList(Downsample(chs[k], chs[k + 1]) for k in range(self.n_down))
        self.mid = nn.Sequential(*[ResUnit(chs[-1], chs[-1], g) for _ in range(max(r, 1))])
        lc = config.latent_channels
        if variational:
            self.to_stats = nn.Sequential(group_norm(chs[-1], g), nn.SiLU(), nn.Conv2d(chs[-1], 2 * lc, 1))
            self.from_latent = nn.Conv2d(lc, chs[-1], 3, padding=1)
        self.up = nn.ModuleList(Upsample(chs[k + 1], chs[k], config.upsample) for k in range(self.n_down))
        self.fuse = nn.ModuleList(ResUnit(2 * chs[k] if self.skips else chs[k], chs[k], g) for k in range(self.n_down))
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
            if self.skips:
                h = torch.cat([h, feats[k] if feats is not None else torch.zeros_like(h)], 1)
            h = self.fuse[k](h)
        out = self.out_conv(self.out_norm(h))
        if x_in is not None:
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

    @torch.no_grad()
    def denoise(self, x: torch.Tensor) -> torch.Tensor:
        """x ``(B, C, H, W)`` of any size -> denoised mean image, same shape (padded internally)."""
        xp, (h, w) = pad_to_multiple(x, self.multiple)
        return self.forward(xp).x_hat[..., :h, :w]

"""``dae``: the deterministic denoising U-Net (a :class:`medvae.models.denoisers.interface.Denoiser`,
no latent): noisy in, the denoised image's likelihood parameters out.

With ``prior`` (n2v / n2s ``--posterior``, Laine et al. 2019) the output is a Gaussian prior over each clean
pixel: a mean and a log-variance (a second block of output channels). Trained blind-spot, it is scored as the
noisy pixel's marginal N(mean, prior variance + a·mean + b) under the likelihood's Poisson–Gaussian noise
model; :meth:`DAE.denoise` combines the prior with the noisy pixel itself: the posterior mean (and sd)."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from medvae.config import DAEConfig
from medvae.errors import ConfigError
from medvae.models.denoisers.interface import DenoiserOutput
from medvae.models.denoisers.unet import _IN_CLAMP, BORDER_MARGIN, UNetLayers, pad_to_multiple
from medvae.models.distributions import Likelihood, gaussian_posterior

PRIOR_LOGVAR_RANGE = (-20.0, 2.0)  # the prior's log-variance on the [0, 1] scale: sd from 5e-5 to 2.7


class DAE(UNetLayers, nn.Module):
    """The U-Net (:class:`medvae.models.denoisers.unet.UNetLayers`) with its skips and no latent.

    Args:
        config: DAEConfig: in_channels, channels (one entry per resolution), res_units, norm_groups,
            upsample, likelihood, top_skip, downsample, input_residual, prior.
    """

    def __init__(self, config: DAEConfig) -> None:
        super().__init__()
        self.config = config
        self.likelihood = Likelihood(config.likelihood, config.in_channels, config.fixed_scale,
                                     noise_model=(config.noise_a, config.noise_b))
        if config.prior and config.likelihood != "poisson-gaussian":
            raise ConfigError(f"model.prior needs likelihood poisson-gaussian (the noise model it is combined with), "
                              f"not {config.likelihood}")
        self._build_unet(config, variational=False)
        if config.prior:  # mean and log-variance: twice the channels
            c = config.in_channels
            self.out_conv = nn.Conv2d(self.out_conv.in_channels, 2 * c, 3, padding=1)
            nn.init.zeros_(self.out_conv.weight)
            nn.init.zeros_(self.out_conv.bias)
            # the prior starts narrow, a tenth of the noise variance at mid-grey: the posterior starts at the prior
            # mean (plain n2v), and the mean's gradient is not drowned by a wide prior's (variance 1 at bias 0:
            # 25 dB after 100 steps at 20 photons, where plain n2v reaches 31)
            a, b = self.likelihood.noise_model
            with torch.no_grad():
                self.out_conv.bias[c:] = math.log(0.1 * (0.5 * a + b))

    @contextlib.contextmanager
    def conditioned_on(self, ids: torch.Tensor | None):
        """Denoisers take no class / modality condition: ``ids`` must be None."""
        if ids is not None:
            raise ConfigError("the dae takes no class or modality condition")
        yield

    def forward(self, x: torch.Tensor) -> DenoiserOutput:
        """Noisy (or clean) x ``(B, C, H, W)`` (H, W multiples of ``multiple``) -> the denoised image."""
        h, feats = self._encode_features(x)
        if not self.config.prior:
            logits = self._decode(h, feats, x)
            return DenoiserOutput(self.likelihood.mean(logits), logits)
        c = self.config.in_channels
        out = self._decode(h, feats, None)  # the input residual goes to the mean's channels only
        logits, logvar = out[:, :c], out[:, c:].clamp(*PRIOR_LOGVAR_RANGE)
        if self.config.input_residual:  # as UNetLayers._decode does
            logits = logits + torch.logit(x.float().clamp(_IN_CLAMP, 1 - _IN_CLAMP)).to(logits.dtype)
        return DenoiserOutput(self.likelihood.mean(logits), logits, logvar)

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, samples: int = 0, generator: torch.Generator | None = None,
                return_sd: bool = False) -> torch.Tensor:
        """x ``(B, C, H, W)`` of any size -> the denoised image, same shape (padded internally). A prior network
        returns the posterior mean given the noisy pixel x (and its sd with ``return_sd``:
        :func:`medvae.models.distributions.gaussian_posterior`, noise variance a·mean + b at the prior mean).
        The dae is deterministic: ``samples`` are refused, and ``return_sd`` without a prior."""
        if samples > 0 or (return_sd and not self.config.prior):
            raise ConfigError("the dae model is deterministic: it has no posterior to sample; train unet-vae (or "
                              "n2v --posterior for a posterior sd)")
        xp, (rows, cols) = pad_to_multiple(x, self.multiple, BORDER_MARGIN)
        out = self.forward(xp)
        if not self.config.prior:
            return out.x_hat[..., rows, cols]
        mean, var = gaussian_posterior(out.x_hat, out.prior_logvar.float().exp(), xp,
                                       self.likelihood.variance(out.x_hat))
        mean, sd = mean[..., rows, cols].to(out.x_hat.dtype), var[..., rows, cols].sqrt().to(out.x_hat.dtype)
        return (mean, sd) if return_sd else mean

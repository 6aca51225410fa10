"""Pixel likelihoods of the decoder, the Gaussian posterior's KL to N(0, I) and the reparameterization.

Everything is computed in float32 (inputs are cast here), so densities are safe under
``torch.autocast`` with bf16 or fp16. Units are nats per image.
"""

from __future__ import annotations

import math
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn

from medvae.config import LikelihoodName
from medvae.errors import ConfigError

LIKELIHOODS = get_args(LikelihoodName)  # the names, written once as the config's Literal
_LOG_2PI = math.log(2.0 * math.pi)
_EPS = 1e-6


# --------------------------------------------------------------------------- likelihoods
def _cb_log_norm(logits: torch.Tensor) -> torch.Tensor:
    """log C(lambda) of the continuous Bernoulli, as a function of its logits eta.

    C = 2 artanh(1 - 2 lambda) / (1 - 2 lambda) = eta / tanh(eta / 2) = 2 u / tanh(u), u = eta / 2.
    Near u = 0 (lambda = 0.5) the ratio is 0/0, so a Taylor series is used there:
    u / tanh(u) = 1 + u^2/3 - u^4/45 + O(u^6).
    """
    u = logits / 2.0
    small = u.abs() < 1e-2
    u_safe = torch.where(small, torch.ones_like(u), u)
    exact = torch.log(u_safe / torch.tanh(u_safe))
    u2 = u * u
    taylor = torch.log1p(u2 / 3.0 - u2 * u2 / 45.0)
    return math.log(2.0) + torch.where(small, taylor, exact)


def _cb_mean(logits: torch.Tensor) -> torch.Tensor:
    """Mean of the continuous Bernoulli from its logits eta: 1 / (1 - e^-eta) - 1 / eta.

    Near eta = 0 the two terms cancel, so the series 1/2 + eta/12 - eta^3/720 is used there.
    """
    eta = logits.float()
    small = eta.abs() < 1e-2
    e = torch.where(small, torch.ones_like(eta), eta)
    exact = 1.0 / (-torch.expm1(-e)) - 1.0 / e
    taylor = 0.5 + eta / 12.0 - eta**3 / 720.0
    return torch.where(small, taylor, exact).clamp(0.0, 1.0)


def _cb_logits_from_mean(mean: torch.Tensor, iters: int = 40) -> torch.Tensor:
    """Invert :func:`_cb_mean` (monotonic in eta) by vectorised bisection on eta in [-60, 60]."""
    m = mean.float().clamp(1e-4, 1.0 - 1e-4)
    lo = torch.full_like(m, -60.0)
    hi = torch.full_like(m, 60.0)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = _cb_mean(mid) < m
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


class Likelihood(nn.Module):
    """Pixel likelihood p(x | decoder output), shared by every model.

    Args:
        kind: ``gaussian`` (learned per-channel scale), ``bernoulli``, ``cbernoulli``
            (continuous Bernoulli), ``l1`` (Laplace, fixed scale), ``l2`` (Gaussian, fixed sigma) or
            ``poisson-gaussian`` (the noisy pixel x given the decoder's clean estimate s:
            ``N(s, a·s + b)``, DivNoising's noise model of shot + read noise; s = sigmoid(logits)).
        channels: image channels (one learned scale per channel for ``gaussian``).
        fixed_scale: scale of ``l1`` / sigma of ``l2``.
        noise_model: ``(a, b)`` of ``poisson-gaussian`` on the [0, 1] scale (required there).
        init_log_sigma: initial log-sigma of the learned Gaussian scale.
        log_sigma_range: clamp of the learned log-sigma (sigma in [1e-3, 1] by default).
    """

    def __init__(
        self,
        kind: str = "gaussian",
        channels: int = 1,
        fixed_scale: float = 0.1,
        init_log_sigma: float = math.log(0.1),
        log_sigma_range: tuple[float, float] = (math.log(1e-3), 0.0),
        noise_model: tuple[float | None, float | None] | None = None,
    ) -> None:
        super().__init__()
        if kind not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {kind!r}; choose one of {LIKELIHOODS}")
        self.kind = kind
        self.noise_model = None
        if kind == "poisson-gaussian":
            if noise_model is None or None in noise_model:
                raise ConfigError("likelihood poisson-gaussian needs the noise variance a·s + b: set model.noise_a "
                                  "and model.noise_b (the [0, 1] scale of the store), or let divnoising calibrate "
                                  "them from the noisy store")
            a, b = (float(v) for v in noise_model)
            if a < 0 or b < 0 or a + b <= 0:
                raise ConfigError(f"model.noise_a = {a:g}, model.noise_b = {b:g}: the noise variance a·s + b "
                                  "must be positive")
            self.noise_model = (a, b)
        self.fixed_scale = float(fixed_scale)
        self.log_sigma_range = log_sigma_range
        if kind == "gaussian":
            self.log_sigma = nn.Parameter(torch.full((channels,), float(init_log_sigma)))
        else:
            self.register_parameter("log_sigma", None)

    def scale(self) -> torch.Tensor:
        """Per-channel sigma ``(C,)`` (Gaussian) or the fixed scale (others), float32."""
        if self.log_sigma is not None:
            return self.log_sigma.float().clamp(*self.log_sigma_range).exp()
        return torch.tensor(self.fixed_scale)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        """The mean image in [0, 1] from the decoder's logits: sigmoid(logits), except for the
        continuous Bernoulli, whose mean differs from its parameter lambda = sigmoid(logits)."""
        if self.kind == "cbernoulli":
            return _cb_mean(logits).to(logits.dtype)
        return torch.sigmoid(logits)

    def variance(self, mean: torch.Tensor) -> torch.Tensor:
        """``poisson-gaussian``: the noise variance ``a·s + b`` of clean values ``s`` (floored at 1e-8), float32."""
        a, b = self.noise_model
        return (a * mean.float().clamp_min(0.0) + b).clamp_min(1e-8)

    def log_prob(
        self, x: torch.Tensor, *, mean: torch.Tensor | None = None, logits: torch.Tensor | None = None,
        weight: torch.Tensor | None = None, prior_logvar: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log p(x | decoder output) summed over pixels, in nats (weighted by ``weight`` when given).

        Args:
            x: (B, C, H, W) in [0, 1].
            mean: (B, C, H, W) the mean image in [0, 1] (the probabilities for Bernoulli; for
                the continuous Bernoulli its mean, inverted to lambda by bisection). Give
                ``mean`` or ``logits``.
            logits: (B, C, H, W) the decoder's raw output; mean = sigmoid(logits). Preferred:
                Bernoulli-type likelihoods are exact and stable on logits.
            weight: (B, C, H, W) or broadcastable, >= 0: each pixel's term is multiplied by it before
                the sum (a blind-spot objective's loss on its masked pixels only); None: 1.
            prior_logvar: ``poisson-gaussian`` only: (B, C, H, W) log-variance of a Gaussian prior over the
                clean value whose mean is ``mean``; x is then scored by its marginal N(mean, prior variance +
                a·mean + b) (the prior convolved with the noise: n2v --posterior, Laine et al. 2019).

        Returns:
            (B,) float32 log-likelihoods.
        """
        x = x.float()
        if self.kind in ("bernoulli", "cbernoulli"):
            if logits is None and self.kind == "cbernoulli":
                logits = _cb_logits_from_mean(mean)
            elif logits is None:
                p = mean.float().clamp(_EPS, 1.0 - _EPS)
                logits = torch.log(p) - torch.log1p(-p)
            logits = logits.float()
            lp = -F.binary_cross_entropy_with_logits(logits, x, reduction="none")
            if self.kind == "cbernoulli":
                lp = lp + _cb_log_norm(logits)
        else:
            m = torch.sigmoid(logits.float()) if mean is None else mean.float()
            if self.kind == "l1":
                b = self.fixed_scale
                lp = -(x - m).abs() / b - math.log(2.0 * b)
            elif self.kind == "poisson-gaussian":
                var = self.variance(m)
                if prior_logvar is not None:
                    var = var + prior_logvar.float().exp()
                lp = -0.5 * (x - m) ** 2 / var - 0.5 * torch.log(var) - 0.5 * _LOG_2PI
            else:
                if self.kind == "gaussian":
                    log_sigma = self.log_sigma.float().clamp(*self.log_sigma_range).view(1, -1, 1, 1)
                else:
                    log_sigma = torch.tensor(math.log(self.fixed_scale), device=x.device)
                lp = -0.5 * ((x - m) * torch.exp(-log_sigma)) ** 2 - log_sigma - 0.5 * _LOG_2PI
        if prior_logvar is not None and self.kind != "poisson-gaussian":
            raise ValueError(f"a prior variance needs the poisson-gaussian likelihood, not {self.kind}")
        if weight is not None:
            lp = lp * weight.float()
        return lp.flatten(1).sum(1)


def gaussian_posterior(prior_mean: torch.Tensor, prior_var: torch.Tensor, y: torch.Tensor,
                       noise_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the clean value s given the noisy y, for the prior s ~ N(prior_mean, prior_var)
    and the noise y | s ~ N(s, noise_var) (the conjugate Gaussian pair; elementwise, float32):
    mean = (noise_var·prior_mean + prior_var·y) / (noise_var + prior_var), variance = noise_var·prior_var /
    (noise_var + prior_var). n2v --posterior evaluates noise_var = a·prior_mean + b (Laine et al. 2019)."""
    m, pv, y, nv = (t.float() for t in (prior_mean, prior_var, y, noise_var))
    total = (nv + pv).clamp_min(1e-12)
    return (nv * m + pv * y) / total, nv * pv / total


# --------------------------------------------------------------------------- KL
def kl_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per sample, nats.

    Args:
        mu: (B, D). logvar: (B, D).

    Returns:
        (B,) float32.
    """
    return kl_per_dim(mu, logvar).sum(-1)


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise KL terms ``(B, D)``, float32."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu * mu + torch.exp(logvar) - 1.0 - logvar)


def standard_normal(shape, device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 N(0, 1) noise of ``shape`` on ``device``.

    With a ``generator`` the noise is drawn on the generator's device and then moved, so a seeded
    CPU generator gives the same numbers whatever device the model is on.
    """
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def reparameterize(
    mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """z = mu + eps * sigma, eps ~ N(0, I) (from ``generator`` when given, else the global RNG).

    Float32 whatever the dtype of ``mu`` / ``logvar`` (e.g. bf16 under autocast); shape of ``mu``.
    The one reparameterization of medvae: models, losses and metrics draw z through it.
    """
    mu, logvar = mu.float(), logvar.float()
    return mu + standard_normal(mu.shape, mu.device, generator) * torch.exp(0.5 * logvar)

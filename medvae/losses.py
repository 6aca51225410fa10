"""Losses: pixel likelihoods, KL, the VAE / VAE–GAN generator loss and the discriminator loss.

Everything that is a density or a divergence is computed in float32 (inputs are cast here), so
the losses are safe under ``torch.autocast`` with bf16 or fp16. Units are nats per image.

The generator loss is ``-log p(x|z) + beta * KL`` (optionally with free bits); for a model with
a discriminator, once the critic has started (``train.disc_start``), it adds a feature-matching term on discriminator
features (Larsen et al. 2016) and an adversarial term on reconstructions and decoded prior
samples weighted adaptively as in latent-diffusion autoencoders (Esser et al. 2021).

The losses take tensors (the model's ``forward`` output) and the few modules / scalars they
need, never the model or a config: under DistributedDataParallel, gradients are synchronised only
for work done through the wrapper's forward, so the losses must not call ``encode`` / ``decode``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LIKELIHOODS = ("gaussian", "bernoulli", "cbernoulli", "l1", "l2")
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
            (continuous Bernoulli), ``l1`` (Laplace, fixed scale) or ``l2`` (Gaussian, fixed sigma).
        channels: image channels (one learned scale per channel for ``gaussian``).
        fixed_scale: scale of ``l1`` / sigma of ``l2``.
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
    ) -> None:
        super().__init__()
        if kind not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {kind!r}; choose one of {LIKELIHOODS}")
        self.kind = kind
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

    def log_prob(
        self, x: torch.Tensor, *, mean: torch.Tensor | None = None, logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log p(x | decoder output) summed over pixels, in nats.

        Args:
            x: (B, C, H, W) in [0, 1].
            mean: (B, C, H, W) the mean image in [0, 1] (the probabilities for Bernoulli; for
                the continuous Bernoulli its mean, inverted to lambda by bisection). Give
                ``mean`` or ``logits``.
            logits: (B, C, H, W) the decoder's raw output; mean = sigmoid(logits). Preferred:
                Bernoulli-type likelihoods are exact and stable on logits.

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
            else:
                if self.kind == "gaussian":
                    log_sigma = self.log_sigma.float().clamp(*self.log_sigma_range).view(1, -1, 1, 1)
                else:
                    log_sigma = torch.tensor(math.log(self.fixed_scale), device=x.device)
                lp = -0.5 * ((x - m) * torch.exp(-log_sigma)) ** 2 - log_sigma - 0.5 * _LOG_2PI
        return lp.flatten(1).sum(1)


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


def free_bits_kl(mu: torch.Tensor, logvar: torch.Tensor, free_bits: float) -> torch.Tensor:
    """KL term with free bits (Kingma et al. 2016): sum_d max(free_bits, mean_batch KL_d).

    With ``free_bits <= 0`` this is the batch-mean KL. Returns a float32 scalar.
    """
    per_dim = kl_per_dim(mu, logvar).mean(0)
    if free_bits > 0:
        per_dim = per_dim.clamp(min=free_bits)
    return per_dim.sum()


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


# --------------------------------------------------------------------------- GAN pieces
def gan_generator_term(logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """Adversarial generator loss on fake logits: hinge ``-D.mean()``, lsgan ``((D-1)^2).mean()``."""
    d = logits_fake.float()
    if kind == "hinge":
        return -d.mean()
    if kind == "lsgan":
        return ((d - 1.0) ** 2).mean()
    raise ValueError(f"unknown gan_loss {kind!r}")


def gan_discriminator_terms(
    logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(real, fake) discriminator losses. hinge: relu(1-D(real)), relu(1+D(fake));
    lsgan: (D(real)-1)^2, D(fake)^2 — each averaged."""
    r, f = logits_real.float(), logits_fake.float()
    if kind == "hinge":
        return F.relu(1.0 - r).mean(), F.relu(1.0 + f).mean()
    if kind == "lsgan":
        return ((r - 1.0) ** 2).mean(), (f**2).mean()
    raise ValueError(f"unknown gan_loss {kind!r}")


def feature_matching(feats_real: list[torch.Tensor], feats_fake: list[torch.Tensor], n_pixels: int):
    """L1 between discriminator features of real and fake images (Larsen et al. 2016).

    The per-layer mean absolute difference is averaged over layers and multiplied by the
    number of image pixels, so the term is per image on the scale of the summed pixel NLL.
    Real features are detached targets. Returns a float32 scalar.
    """
    per_layer = [(fr.detach().float() - ff.float()).abs().mean() for fr, ff in zip(feats_real, feats_fake)]
    return torch.stack(per_layer).mean() * n_pixels


def adaptive_weight(
    rec_loss: torch.Tensor, adv_loss: torch.Tensor, weight: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """lambda = ||d rec / d w|| / (||d adv / d w|| + 1e-4), clamped to [0, 1e4], detached, x scale.

    ``w`` is the decoder's last conv weight (Esser et al. 2021). Non-finite ratios become 0.
    """
    g_rec = torch.autograd.grad(rec_loss, weight, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, weight, retain_graph=True)[0]
    lam = g_rec.float().norm() / (g_adv.float().norm() + 1e-4)
    lam = torch.nan_to_num(lam, nan=0.0, posinf=0.0, neginf=0.0).clamp(0.0, 1e4)
    return lam.detach() * scale


# --------------------------------------------------------------------------- model losses
def generator_loss(
    x: torch.Tensor,
    out,
    likelihood: Likelihood,
    *,
    beta: float,
    free_bits: float = 0.0,
    discriminator: nn.Module | None = None,
    last_layer: torch.Tensor | None = None,
    gan_loss: str = "hinge",
    adv_weight: float = 1.0,
    fm_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss minimised over the generator's parameters, from the model's forward output.

    ``-log p(x|z) + beta * KL`` (free bits when ``free_bits > 0``); with a ``discriminator`` and
    decoded prior samples in ``out.x_prior`` it adds the feature-matching term and the adaptive
    adversarial term. ``elbo`` is a single-sample estimate in nats whatever ``beta`` is.

    Args:
        x: (B, C, H, W) real images in [0, 1].
        out: the model's ``forward`` output (:class:`medvae.models.VAEOutput`): ``logits`` (decoder
            output for z ~ q(z|x)), ``x_hat`` (their mean image), ``mu``, ``logvar`` and, when
            the critic is on, ``x_prior`` (decoded prior samples).
        likelihood: the model's pixel likelihood.
        beta: current KL weight (the trainer anneals it).
        free_bits: free bits per latent dimension (0: off).
        discriminator: the critic (VAE–GAN) or None. Its own gradients from this loss are of no
            use: the trainer freezes it while this loss runs.
        last_layer: the decoder's last conv weight, the anchor of the adaptive weight.
        gan_loss: ``hinge`` or ``lsgan``.
        adv_weight: scale of the adaptive adversarial weight.
        fm_weight: weight of the feature-matching term.

    Returns:
        ``(loss, terms)``: terms ``nll``, ``kl``, ``elbo`` (batch means, nats per image),
        ``kl_loss`` (the KL term after free bits), ``loss``, and with a discriminator ``adv``,
        ``fm``, ``adv_weight`` (zeros while ``out.x_prior`` is None: the critic has not started).
        Under ``torch.no_grad`` the adaptive weight is 0.
    """
    nll = -likelihood.log_prob(x, logits=out.logits).mean()
    kl = kl_normal(out.mu, out.logvar).mean()
    kl_term = free_bits_kl(out.mu, out.logvar, free_bits) if free_bits > 0 else kl
    loss = nll + beta * kl_term
    terms = {"nll": nll.detach(), "kl": kl.detach(), "elbo": -(nll + kl).detach(), "kl_loss": kl_term.detach()}
    if discriminator is not None:
        fm = adv = lam = torch.zeros((), device=x.device)
        if out.x_prior is not None:
            with torch.no_grad():
                _, feats_real = discriminator(x)
            logits_fake, feats_fake = discriminator(torch.cat([out.x_hat, out.x_prior], 0))
            b = x.shape[0]
            fm = feature_matching(feats_real, [f[:b] for f in feats_fake], x[0].numel())
            adv = gan_generator_term(logits_fake, gan_loss)
            if torch.is_grad_enabled() and adv.requires_grad and last_layer is not None:
                lam = adaptive_weight(nll, adv, last_layer, adv_weight)
            loss = loss + fm_weight * fm + lam * adv
        terms.update(adv=adv.detach(), fm=fm.detach(), adv_weight=lam.detach())
    terms["loss"] = loss.detach()
    return loss, terms


def discriminator_loss(
    discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor, *, gan_loss: str = "hinge",
    r1_gamma: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Discriminator loss on real patches vs. fakes (reconstructions and decoded prior samples).

    One forward of the critic on ``cat([real, fake])`` (what a DistributedDataParallel wrapper
    needs: one forward per backward). With ``r1_gamma > 0`` the R1 penalty
    ``gamma / 2 * E ||d D(real) / d real||^2`` (Mescheder et al. 2018) is added.

    Args:
        discriminator: the critic (or its DDP wrapper); returns ``(logits, features)``.
        real: (B, C, H, W) real patches in [0, 1].
        fake: (B', C, H, W) fakes; detached here, so only the critic gets gradients.
        gan_loss: ``hinge`` or ``lsgan``.
        r1_gamma: R1 weight (0: off).

    Returns:
        ``(loss, terms)``: terms ``d_loss``, ``d_real``, ``d_fake`` (mean logits), ``r1``.
    """
    real = real.detach()
    r1_on = r1_gamma > 0 and torch.is_grad_enabled()
    if r1_on:
        real = real.clone().requires_grad_(True)
    logits, _ = discriminator(torch.cat([real, fake.detach().to(real.dtype)], 0))
    b = real.shape[0]
    logits_real, logits_fake = logits[:b], logits[b:]
    l_real, l_fake = gan_discriminator_terms(logits_real, logits_fake, gan_loss)
    loss = l_real + l_fake
    r1 = torch.zeros((), device=real.device)
    if r1_on:
        (g,) = torch.autograd.grad(logits_real.float().sum(), real, create_graph=True)
        r1 = g.float().pow(2).flatten(1).sum(1).mean()
        loss = loss + 0.5 * r1_gamma * r1
    terms = {
        "d_loss": loss.detach(),
        "d_real": logits_real.detach().float().mean(),
        "d_fake": logits_fake.detach().float().mean(),
        "r1": r1.detach(),
    }
    return loss, terms

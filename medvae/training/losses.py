"""Training losses: the VAE / VAE–GAN generator loss (with free bits) and the discriminator loss.

The pixel likelihoods and the KL are the model's (:mod:`medvae.models.distributions`). Everything is
computed in float32, so the losses are safe under ``torch.autocast`` with bf16 or fp16. Units are
nats per image.

The generator loss is ``-log p(x|z) + beta * KL`` (optionally with free bits); for a model with
a discriminator, once the critic has started (``train.disc_start``), it adds a feature-matching term on discriminator
features (Larsen et al. 2016) and an adversarial term on reconstructions and decoded prior
samples weighted adaptively as in latent-diffusion autoencoders (Esser et al. 2021).

The losses take tensors (the model's ``forward`` output) and the few modules / scalars they
need, never the model or a config: under DistributedDataParallel, gradients are synchronised only
for work done through the wrapper's forward, so the losses must not call ``encode`` / ``decode``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medvae.models.distributions import Likelihood, kl_normal, kl_per_dim


def free_bits_kl(mu: torch.Tensor, logvar: torch.Tensor, free_bits: float) -> torch.Tensor:
    """KL term with free bits (Kingma et al. 2016): sum_d max(free_bits, mean_batch KL_d).

    With ``free_bits <= 0`` this is the batch-mean KL. Returns a float32 scalar.
    """
    per_dim = kl_per_dim(mu, logvar).mean(0)
    if free_bits > 0:
        per_dim = per_dim.clamp(min=free_bits)
    return per_dim.sum()



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
    weight: torch.Tensor | None = None,
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
        weight: per-pixel weights of the NLL ``(B, C, H, W)`` (a task's training pair: a blind-spot
            objective's masked pixels), or None (every pixel 1). The adversarial terms ignore it.

    Returns:
        ``(loss, terms)``: terms ``nll``, ``kl``, ``elbo`` (batch means, nats per image),
        ``kl_loss`` (the KL term after free bits), ``loss``, and with a discriminator ``adv``,
        ``fm``, ``adv_weight`` (zeros while ``out.x_prior`` is None: the critic has not started).
        Under ``torch.no_grad`` the adaptive weight is 0.
    """
    nll = -likelihood.log_prob(x, logits=out.logits, weight=weight).mean()
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

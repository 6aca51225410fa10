"""The VAE–GAN's adversarial training: its critic's step, schedule and losses.

:class:`AdversarialStep` is the base :class:`medvae.training.step.TrainStep` of the generator (the model
minus its critic) plus, from ``train.disc_start`` on, the critic: the generator's loss gains a
feature-matching term on critic features (Larsen et al. 2016) and an adversarial term on
reconstructions and decoded prior samples, weighted adaptively as in latent-diffusion autoencoders
(Esser et al. 2021); then the critic takes its own step on real vs. those fakes (hinge or LSGAN, an
optional R1 penalty, Mescheder et al. 2018), with its own optimizer and LR schedule.

The losses take tensors and the critic, never the model: under DistributedDataParallel gradients are
synchronised only for work done through a wrapper's forward.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from medvae.config import TrainConfig
from medvae.models import VAEGAN
from medvae.training.distributed import DistInfo, wrap_ddp
from medvae.training.runtime import autocast
from medvae.training.schedule import warmup_cosine
from medvae.training.step import Loss, TrainStep, detached


class AdversarialStep(TrainStep):
    """The VAE–GAN's step: the generator's (:class:`TrainStep`, its critic excluded) and the critic's.

    Under torchrun the critic has its own DistributedDataParallel wrapper; its loss is one forward of it.
    Args as :class:`TrainStep`'s; ``model`` is a :class:`medvae.models.VAEGAN`.
    """

    norm_names = {**TrainStep.norm_names, "discriminator": "d_grad_norm"}
    lr_names = {**TrainStep.lr_names, "discriminator": "disc_lr"}
    unlogged = ("d_grad_norm",)  # guarded, not logged (as before the families)
    loss_names = (*TrainStep.loss_names, "d_loss")

    def __init__(self, model: VAEGAN, loss: Loss, tc: TrainConfig, device: torch.device, info: DistInfo,
                 amp_dtype: torch.dtype | None, total_steps: int):
        super().__init__(model, loss, tc, device, info, amp_dtype, total_steps, exclude=model.discriminator)
        self.critic = model.discriminator
        self.critic_params = [p for p in self.critic.parameters() if p.requires_grad]
        self.optimizers["discriminator"] = self.adamw(self.critic_params, tc.disc_lr)
        self.schedulers["discriminator"] = warmup_cosine(self.optimizers["discriminator"], tc.warmup_steps,
                                                         total_steps)
        if tc.compile:
            # the adaptive weight runs autograd.grad(..., retain_graph=True) through the compiled decoder, and
            # AOTAutograd's donated buffers forbid a retained backward (RuntimeError at the first critic step)
            import torch._functorch.config

            torch._functorch.config.donated_buffer = False
            if tc.r1_gamma == 0:  # R1 needs a double backward, which compiled graphs do not support
                self.critic.compile()
        self.discriminator = wrap_ddp(self.critic, info, device)

    def backward(self, x: torch.Tensor, step: int, beta: float, target: torch.Tensor,
                 weight: torch.Tensor | None) -> tuple[dict, dict]:
        """The generator's gradients (with the adversarial terms once the critic is on), then the critic's.
        Before ``disc_start`` the adversarial terms are logged as zeros and the critic does not step."""
        t, critic_on = self.tc, step >= self.tc.disc_start
        self.zero_grad()
        with frozen(self.critic):  # its gradients from the generator's loss would be thrown away
            with autocast(self.device, self.amp_dtype):
                out = self.generator(x, n_prior=x.shape[0] if critic_on else 0)  # prior samples: fakes too
                loss, terms = self.loss(target, out, beta, weight)
                zero = torch.zeros((), device=x.device)
                adv_terms = {"adv": zero, "fm": zero, "adv_weight": zero}
                if critic_on:
                    loss, adv_terms = generator_adversarial_loss(
                        loss, terms["nll"], target, out, self.critic, last_layer=self.model.last_decoder_weight,
                        gan_loss=t.gan_loss, adv_weight=t.adv_weight, fm_weight=t.feature_matching_weight)
            norms = {"generator": self.clipped_backward(loss, self.params, "generator")}
        terms = detached(loss, {**terms, **adv_terms})
        if critic_on:
            fake = torch.cat([out.x_hat.detach(), out.x_prior.detach()], 0)
            with autocast(self.device, self.amp_dtype):
                d_loss, d_terms = discriminator_loss(self.discriminator, target, fake, gan_loss=t.gan_loss,
                                                     r1_gamma=t.r1_gamma)
            norms["discriminator"] = self.clipped_backward(d_loss, self.critic_params, "discriminator")
            terms.update({"d_loss": d_loss.detach(), **{k: v for k, v in d_terms.items() if k != "d_loss"}})
        return terms, norms

    def selectable(self, step: int) -> bool:
        """Whether the weights after ``step`` steps may become best.pt: only once the critic has trained.
        The adversarial phase trades likelihood for sharpness on purpose, so the best val ELBO of a VAE–GAN
        would otherwise be its last pre-critic step — the plain VAE's weights (docs/architecture.md,
        "Checkpoint selection")."""
        return step > self.tc.disc_start


@contextlib.contextmanager
def frozen(module: nn.Module):
    """``module``'s parameters get no gradients inside the block."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# --------------------------------------------------------------------------- the generator's terms
def gan_generator_term(logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """Adversarial generator loss on fake logits: hinge ``-D.mean()``, lsgan ``((D-1)^2).mean()``."""
    d = logits_fake.float()
    if kind == "hinge":
        return -d.mean()
    if kind == "lsgan":
        return ((d - 1.0) ** 2).mean()
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


def generator_adversarial_loss(
    loss: torch.Tensor, nll: torch.Tensor, x: torch.Tensor, out, critic: nn.Module, *,
    last_layer: torch.Tensor | None, gan_loss: str = "hinge", adv_weight: float = 1.0, fm_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``loss`` plus the feature-matching term and the adaptive adversarial term.

    Args:
        loss: the generator's VAE loss (:func:`medvae.training.losses.vae_loss`).
        nll: its batch-mean NLL with its graph (the adaptive weight's numerator).
        x: (B, C, H, W) real images in [0, 1].
        out: the model's ``forward`` output with ``x_prior`` (decoded prior samples).
        critic: the critic (frozen by the caller: its gradients from this loss are of no use).
        last_layer: the decoder's last conv weight, the anchor of the adaptive weight.
        gan_loss: ``hinge`` or ``lsgan``.
        adv_weight: scale of the adaptive adversarial weight.
        fm_weight: weight of the feature-matching term.

    Returns:
        ``(loss, terms)``: terms ``adv``, ``fm``, ``adv_weight`` (0 under ``torch.no_grad``).
    """
    with torch.no_grad():
        _, feats_real = critic(x)
    logits_fake, feats_fake = critic(torch.cat([out.x_hat, out.x_prior], 0))
    b = x.shape[0]
    fm = feature_matching(feats_real, [f[:b] for f in feats_fake], x[0].numel())
    adv = gan_generator_term(logits_fake, gan_loss)
    lam = torch.zeros((), device=x.device)
    if torch.is_grad_enabled() and adv.requires_grad and last_layer is not None:
        lam = adaptive_weight(nll, adv, last_layer, adv_weight)
    return loss + fm_weight * fm + lam * adv, {"adv": adv, "fm": fm, "adv_weight": lam}


# --------------------------------------------------------------------------- the critic's loss
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

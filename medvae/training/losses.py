"""Training losses of the model families: the VAE loss (with free bits) of every VAE-like model and the
likelihood loss of a deterministic denoiser. The VAE–GAN's adversarial terms and its critic's loss live
in :mod:`medvae.training.adversarial`.

The pixel likelihoods and the KL are the model's (:mod:`medvae.models.distributions`). Everything is
computed in float32, so the losses are safe under ``torch.autocast`` with bf16 or fp16. Units are
nats per image.

The losses take tensors (the model's ``forward`` output) and the model's likelihood, never the model or
a config: under DistributedDataParallel, gradients are synchronised only for work done through the
wrapper's forward, so the losses must not call ``encode`` / ``decode``. Their terms keep their graphs
(the adversarial weight differentiates the NLL); the step detaches them for the log.
"""

from __future__ import annotations

import torch

from medvae.models.distributions import Likelihood, kl_normal, kl_per_dim


def free_bits_kl(mu: torch.Tensor, logvar: torch.Tensor, free_bits: float) -> torch.Tensor:
    """KL term with free bits (Kingma et al. 2016): sum_d max(free_bits, mean_batch KL_d).

    With ``free_bits <= 0`` this is the batch-mean KL. Returns a float32 scalar.
    """
    per_dim = kl_per_dim(mu, logvar).mean(0)
    if free_bits > 0:
        per_dim = per_dim.clamp(min=free_bits)
    return per_dim.sum()


def vae_loss(x: torch.Tensor, out, likelihood: Likelihood, *, beta: float, free_bits: float = 0.0,
             weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``-log p(x|z) + beta * KL`` (free bits when ``free_bits > 0``), from the model's forward output.

    Args:
        x: (B, C, H, W) target images in [0, 1].
        out: the model's ``forward`` output (:class:`medvae.models.VAEOutput`): ``logits`` (decoder
            output for z ~ q(z|x)), ``mu``, ``logvar``.
        likelihood: the model's pixel likelihood.
        beta: current KL weight (the trainer anneals it).
        free_bits: free bits per latent dimension (0: off).
        weight: per-pixel weights of the NLL ``(B, C, H, W)`` (a task's training pair: a blind-spot
            objective's masked pixels), or None (every pixel 1).

    Returns:
        ``(loss, terms)``: terms ``nll``, ``kl``, ``elbo`` (a single-sample estimate whatever ``beta`` is),
        ``kl_loss`` (the KL term after free bits): batch means, nats per image, with their graphs.
    """
    nll = -likelihood.log_prob(x, logits=out.logits, weight=weight).mean()
    kl = kl_normal(out.mu, out.logvar).mean()
    kl_term = free_bits_kl(out.mu, out.logvar, free_bits) if free_bits > 0 else kl
    loss = nll + beta * kl_term
    return loss, {"nll": nll, "kl": kl, "elbo": -(nll + kl), "kl_loss": kl_term}


def denoiser_loss(x: torch.Tensor, out, likelihood: Likelihood, *,
                  weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``-log p(x | the denoiser's output)``: a deterministic denoiser's (the dae's) loss.

    Args:
        x: (B, C, H, W) target (clean, or the noisy batch of a blind-spot objective) in [0, 1].
        out: the denoiser's ``forward`` output (``logits``; ``prior_logvar`` of a prior network: x is scored
            under the prior convolved with the noise, :meth:`Likelihood.log_prob`).
        likelihood: its pixel likelihood.
        weight: per-pixel weights of the NLL, or None (every pixel 1).

    Returns:
        ``(loss, {"nll": loss})``: the batch-mean NLL, nats per image.
    """
    nll = -likelihood.log_prob(x, logits=out.logits, weight=weight,
                               prior_logvar=getattr(out, "prior_logvar", None)).mean()
    return nll, {"nll": nll}

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


def focal_frequency_loss(x_hat: torch.Tensor, x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """The focal frequency loss (Jiang et al. 2021) per image, batch mean: ``Σ_f w_f |F(x_hat)_f - F(x)_f|²`` over
    the orthonormal 2D DFT's frequencies of every channel, ``w_f = (|ΔF_f| / max_f |ΔF_f|)^alpha`` (detached, per
    image and channel): the frequencies the decoder gets most wrong — at a blurry decoder the high ones — weigh
    most. ``alpha = 0`` gives the squared error summed over pixels (Parseval). Float32 scalar."""
    d = torch.fft.fft2(x_hat.float(), norm="ortho") - torch.fft.fft2(x.float(), norm="ortho")
    power = d.real.square() + d.imag.square()
    w = power.detach().sqrt().pow(alpha)
    w = w / w.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return (w * power).sum((1, 2, 3)).mean()


def vae_loss(x: torch.Tensor, out, likelihood: Likelihood, *, beta: float, free_bits: float = 0.0,
             weight: torch.Tensor | None = None, frequency_weight: float = 0.0,
             frequency_alpha: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
        frequency_weight: weight of :func:`focal_frequency_loss` of the mean image (0: off).
        frequency_alpha: its focusing exponent.

    Returns:
        ``(loss, terms)``: terms ``nll``, ``kl``, ``elbo`` (a single-sample estimate whatever ``beta`` is),
        ``kl_loss`` (the KL term after free bits), and ``freq`` when that term is on: batch means, nats per image
        (``freq``: squared [0, 1] units), with their graphs.
    """
    nll = -likelihood.log_prob(x, logits=out.logits, weight=weight).mean()
    kl = kl_normal(out.mu, out.logvar).mean()
    kl_term = free_bits_kl(out.mu, out.logvar, free_bits) if free_bits > 0 else kl
    loss = nll + beta * kl_term
    terms = {"nll": nll, "kl": kl, "elbo": -(nll + kl), "kl_loss": kl_term}
    if frequency_weight > 0:
        terms["freq"] = focal_frequency_loss(out.x_hat, x, frequency_alpha)
        loss = loss + frequency_weight * terms["freq"]
    return loss, terms


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

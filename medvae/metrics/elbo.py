"""Likelihood metrics of a VAE: the ELBO, the importance-weighted bound (IWAE) and bits per dimension.

Likelihoods are in nats per image (summed over pixels and channels); higher is better.
"""

from __future__ import annotations

import math

import torch

from medvae.models.distributions import kl_normal, reparameterize, standard_normal

_LOG_2PI = math.log(2 * math.pi)


@torch.no_grad()
def elbo(model, x: torch.Tensor, generator: torch.Generator | None = None,
         return_terms: bool = False, posterior: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Evidence lower bound per image, nats: E_q[log p(x|z)] - KL(q(z|x) || p(z)).

    One-sample estimate of the reconstruction term (z = mu + sigma * eps, eps from
    ``generator`` when given, so the estimate is reproducible) and the analytic KL. Unbiased
    for the ELBO; its expectation is <= log p(x). Higher is better.

    Args:
        model: any model with ``encode``, ``decode`` and ``log_likelihood`` (docs/architecture.md).
        x: (B, C, H, W) in [0, 1].
        posterior: ``(mu, logvar)`` of ``model.encode(x)`` when the caller has it already.

    Returns:
        (B,) ELBO; with ``return_terms`` also a dict with ``nll`` (-log p(x|z)), ``kl`` and
        ``x_hat`` (the decoded *sample*; use ``decode(mu)`` for the deterministic recon).
    """
    mu, logvar = model.encode(x) if posterior is None else posterior
    z = reparameterize(mu, logvar, generator).to(mu.dtype)
    x_hat = model.decode(z)
    ll = model.log_likelihood(x, x_hat).float()
    kl = kl_normal(mu.float(), logvar.float())
    out = ll - kl
    if return_terms:
        return out, {"nll": -ll, "kl": kl, "x_hat": x_hat}
    return out


@torch.no_grad()
def iwae_log_likelihood(model, x: torch.Tensor, k: int = 64, batch_chunk: int = 1024,
                        generator: torch.Generator | None = None,
                        posterior: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Importance-weighted log-likelihood bound (Burda et al. 2016) per image, nats.

    log p(x) >= log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x), z_i ~ q(z|x) = N(mu, diag sigma^2),
    with p(z) = N(0, I). Computed with log-sum-exp; k = 1 is the one-sample ELBO (with the
    Monte-Carlo KL), and the bound tightens monotonically (in expectation) to log p(x) as k
    grows. Works for any likelihood: it only calls ``model.log_likelihood``.

    Args:
        model: encode / decode / log_likelihood as in docs/architecture.md.
        x: (B, C, H, W).
        k: importance samples per image.
        batch_chunk: at most this many decoded images per decoder call (bounds memory).
        generator: optional torch.Generator for reproducible samples.
        posterior: ``(mu, logvar)`` of ``model.encode(x)`` when the caller has it already.

    Returns:
        (B,) lower bound on log p(x) in nats; higher is better.
    """
    if k < 1:
        raise ValueError(f"iwae_log_likelihood: k must be >= 1, got {k}")
    mu, logvar = model.encode(x) if posterior is None else posterior
    dt = torch.promote_types(mu.dtype, torch.float32)  # at least float32 for the densities
    mu32, logvar32 = mu.to(dt), logvar.to(dt)
    std = (0.5 * logvar32).exp()
    b, d = mu.shape
    per_call = max(1, batch_chunk // b)  # samples of every image decoded per call
    log_w = []
    for start in range(0, k, per_call):
        kk = min(per_call, k - start)
        eps = standard_normal((kk, b, d), mu32.device, generator).to(mu32.dtype)
        z = mu32 + std * eps  # (kk, B, D)
        x_hat = model.decode(z.reshape(kk * b, d).to(mu.dtype))
        x_rep = x.unsqueeze(0).expand(kk, *x.shape).reshape(kk * b, *x.shape[1:])
        ll = model.log_likelihood(x_rep, x_hat).to(dt).view(kk, b)
        log_pz = -0.5 * (z.pow(2).sum(-1) + d * _LOG_2PI)
        log_qz = -0.5 * (eps.pow(2).sum(-1) + logvar32.sum(-1) + d * _LOG_2PI)
        log_w.append(ll + log_pz - log_qz)
    lw = torch.cat(log_w, 0)  # (k, B)
    return torch.logsumexp(lw, 0) - math.log(k)


def bits_per_dim(log_likelihood_nats, n_dims: int, levels: int | None = None):
    """Negative log-likelihood in bits per dimension: -LL / (n_dims ln 2). Lower is better.

    Our likelihoods are densities of continuous images on [0, 1] (no dequantization), so the
    raw value can be negative (a density may exceed 1). Given ``levels`` (e.g. 256 for 8-bit
    data), it is converted to the usual discrete convention for data uniformly dequantized on a
    grid of that many levels: bpd + log2(levels) (p of a bin of width 1/levels ~ density/levels).
    """
    bpd = -log_likelihood_nats / (n_dims * math.log(2))
    if levels is not None:
        bpd = bpd + math.log2(levels)
    return bpd

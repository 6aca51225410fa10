"""Prior latents and decoded samples, reproducible per sample.

Sample ``i``'s latent depends only on ``(seed, i)``: latents are drawn on the CPU in fixed chunks of
``CHUNK`` rows, chunk ``k`` from a ``torch.Generator`` seeded with ``SeedSequence([seed, k])``. So
the batch size, the device and ``n`` do not change which latent a sample gets (``n`` can be raised
later and the first samples stay the same). ``medvae generate``, evaluation and the utility study
all sample through here.
"""

from __future__ import annotations

import numpy as np
import torch

from medvae.models import require_latent
from medvae.synthesis.prior import SamplingPrior
from medvae.training.runtime import autocast

CHUNK = 256


def _chunk_seed(seed: int, chunk: int) -> int:
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1, np.uint64)[0])


def latents(seed: int, start: int, stop: int, dim: int, temperature: float = 1.0,
            prior: SamplingPrior | None = None, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Prior latents of samples ``start..stop-1``: ``(stop - start, dim)`` float32 on the CPU.

    Each chunk's generator draws the standard normals ``eps`` first, then the uniforms that pick a
    mixture component, so the N(0, I) latents are the same with or without a learned prior. ``ids``
    (``stop - start`` condition ids) picks each sample's mixture of a conditional prior.
    """
    first, last = start // CHUNK, (stop - 1) // CHUNK
    eps, u = [], []
    for k in range(first, last + 1):
        gen = torch.Generator().manual_seed(_chunk_seed(seed, k))
        eps.append(torch.randn(CHUNK, dim, generator=gen))
        u.append(torch.rand(CHUNK, generator=gen, dtype=torch.float64))
    keep = slice(start - first * CHUNK, stop - first * CHUNK)
    z = torch.cat(eps)[keep] * temperature
    return z if prior is None else prior.transform(z, torch.cat(u)[keep], ids)


def balanced_conditions(n: int, k: int) -> torch.Tensor:
    """``(n,)`` int64 condition ids ``0, 1, ..., k-1, 0, 1, ...``: as balanced as n allows."""
    return sample_conditions(0, n, np.ones(max(k, 1)), balanced=True)


def sample_conditions(start: int, stop: int, counts, balanced: bool = False) -> torch.Tensor:
    """Condition ids of samples ``start..stop-1``, each a function of the sample's index only.

    ``balanced``: ``i mod k``. Otherwise in proportion to ``counts`` (the training split's), by a
    low-discrepancy sequence (``frac((i + 1/2) / golden ratio)`` through the counts' CDF), so any run of
    samples is close to the training proportions and ``n`` can grow without changing earlier ids.
    """
    i = torch.arange(start, stop, dtype=torch.float64)
    if balanced:
        return (i % len(counts)).long()
    cdf = torch.cumsum(torch.as_tensor(counts, dtype=torch.float64), 0)
    u = torch.frac((i + 0.5) * 0.6180339887498949) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=len(cdf) - 1)


@torch.no_grad()
def decode_latents(model, z: torch.Tensor, ids: torch.Tensor | None = None,
                   amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Latents ``(B, D)`` on the model's device (condition ``ids``) -> images ``(B, C, H, W)`` float32 in [0, 1];
    the decoder runs under autocast to ``amp_dtype`` (None: float32), its output cast back to float32."""
    with model.conditioned_on(None if ids is None else ids.to(z.device)), autocast(z.device, amp_dtype):
        return model.decode(z).float().clamp_(0, 1)


@torch.no_grad()
def sample_images(model, n: int, *, seed: int = 0, prior: SamplingPrior | None = None,
                  conditions: torch.Tensor | None = None, temperature: float = 1.0,
                  batch_size: int = 256) -> torch.Tensor:
    """``n`` samples ``(n, C, H, W)`` float32 on the CPU in [0, 1]: latents from ``prior`` (None: N(0, I)),
    decoded with condition ids ``conditions (n,)`` (required by a class / modality model)."""
    require_latent(model)
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        ids = None if conditions is None else conditions[start:stop]
        z = latents(seed, start, stop, int(model.latent_dim), temperature, prior, ids)
        out.append(decode_latents(model, z.to(device), ids).cpu())
    return torch.cat(out) if out else torch.zeros(0)

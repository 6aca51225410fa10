"""Validation during training: the one scaffold every task validates with (:func:`over_batches`: the
val batches, eval mode, the reduction to means), the reconstruct task's metrics (the ELBO, SSIM and
PSNR of the reconstruction), and the one reconstruction pass (encode -> ELBO -> decode) that
validation and the evaluate stage share."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from medvae.data.conditions import model_inputs
from medvae.data.store import PatchStore
from medvae.metrics import images as metrics
from medvae.metrics.elbo import elbo
from medvae.models.vae import VariationalModel
from medvae.training.runtime import full_precision

log = logging.getLogger(__name__)
_WARNED: set[str] = set()


@torch.no_grad()
def reconstruct(model: VariationalModel, x: torch.Tensor, ids: torch.Tensor | None, generator: torch.Generator
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """One reconstruction pass of a VAE-like model over a batch, with condition ``ids`` (or None).

    Encodes once: the ELBO takes the posterior (one z from ``generator``), the reconstruction its mean.

    Args:
        model: a VAE-like model.
        x: (B, C, H, W) in [0, 1] on the model's device.

    Returns:
        ``(bounds, recon, mu, logvar)``: bounds ``elbo``, ``nll``, ``kl`` (B,) nats; ``recon`` the float32
        ``decode(mu)`` (B, C, H, W); the posterior ``mu``, ``logvar`` (B, D).
    """
    with model.conditioned_on(ids):
        mu, logvar = model.encode(x)
        elbo_, terms = elbo(model, x, generator=generator, return_terms=True, posterior=(mu, logvar))
        recon = model.decode(mu).float()
    return {"elbo": elbo_, "nll": terms["nll"], "kl": terms["kl"]}, recon, mu, logvar


@torch.no_grad()
def over_batches(model: torch.nn.Module, store: PatchStore, batch_size: int, max_batches: int,
                 batch_metrics: Callable[[int, np.ndarray], dict[str, torch.Tensor]],
                 sum_dtype: torch.dtype = torch.float32, rows: np.ndarray | None = None) -> dict[str, float]:
    """Every task's validation: mean per-image metrics over the first ``max_batches`` batches of the
    val split (store order), the model in eval mode and without gradients (the caller autocasts the
    model; each task computes its metrics, and makes its noise, in float32: ``full_precision``).

    Args:
        batch_metrics: ``(batch index, store rows) -> {name: (B,) per-image values}``; the task's own
            metrics of one batch (it loads the rows and seeds its noise from the batch index).
        sum_dtype: the dtype each batch's values are summed in before the float64 running total;
            the task's own (float32 for reconstruction, float64 for the denoisers), so best.pt and
            the logged values do not change with the scaffold.
        rows: the store rows to validate on instead of the val split (a task's held-out train patches,
            :attr:`medvae.training.tasks.Task.held_out`); None: the val split.

    Returns:
        ``{name: mean over the val patches}``; an empty dict when the store has no val split.
    """
    rows = (store.select("val") if rows is None else np.asarray(rows, np.int64))[: batch_size * max_batches]
    if len(rows) == 0:
        if str(store.path) not in _WARNED:  # once per store, not at every checkpoint
            _WARNED.add(str(store.path))
            log.warning("%s has no val split: no validation metrics and no best.pt", store.path)
        return {}
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    try:
        for i, start in enumerate(range(0, len(rows), batch_size)):
            per_image = batch_metrics(i, rows[start : start + batch_size])
            batch = torch.stack([v.to(sum_dtype).sum() for v in per_image.values()]).tolist()  # one host sync
            for k, v in zip(per_image, batch, strict=True):
                sums[k] = sums.get(k, 0.0) + v
    finally:
        model.train(was_training)
    return {k: v / len(rows) for k, v in sums.items()}


def validate(model: torch.nn.Module, store: PatchStore, batch_size: int, max_batches: int,
             device: torch.device, seed: int = 0, channels_last: bool = False) -> dict[str, float]:
    """The reconstruct task's validation (:func:`over_batches`): the reconstruction of the same val
    patches with the same posterior noise (a generator seeded with ``seed``) every time, so values
    are comparable across validations, and the global RNG the training draws from is untouched.

    Returns:
        ``elbo``, ``nll``, ``kl`` (nats per image), ``ssim`` and ``psnr`` (dB) of the reconstruction
        ``decode(mu)``, ``mse``; an empty dict when the store has no val split.
    """
    gen = torch.Generator().manual_seed(seed)

    def batch_metrics(_: int, rows: np.ndarray) -> dict[str, torch.Tensor]:
        x, ids = model_inputs(store, rows, model.config)
        x = torch.from_numpy(x).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        bounds, recon, _, _ = reconstruct(model, x, None if ids is None else torch.from_numpy(ids).to(device), gen)
        with full_precision(device):  # the model may run in bf16 / fp16; the distances are float32
            recon, x32 = recon.clamp(0.0, 1.0), x.float()
            return {**bounds, "ssim": metrics.ssim(recon, x32), "psnr": metrics.psnr(recon, x32),
                    "mse": metrics.mse(recon, x32)}

    return over_batches(model, store, batch_size, max_batches, batch_metrics)

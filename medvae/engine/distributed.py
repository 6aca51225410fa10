"""Data-parallel training under ``torchrun``: process group setup and gradient all-reduce.

The VAE–GAN calls its model through many methods (encode, decode_logits, discriminator, the
adaptive weight's ``autograd.grad``) and steps two optimizers per batch, which does not fit
``DistributedDataParallel``'s one-forward-one-backward hooks. So the trainer all-reduces the
gradients itself, once per optimizer and batch, as one flat buffer (the loss terms ride along, so
every rank logs the global mean and takes the same skip decision of the NaN guard).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (``world_size == 1`` when not under torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # we initialized the process group, so we destroy it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun described in the environment (no-op for one process).

    Uses NCCL for CUDA, gloo otherwise (CPU DDP). A group that is already initialized (e.g. by
    a test harness) is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return DistInfo(rank, int(os.environ.get("LOCAL_RANK", rank)), dist.get_world_size())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=30))
    log.debug("rank %d/%d joined the %s process group", rank, world, backend)
    return DistInfo(rank, local_rank, world, owns_group=True)


def shutdown(info: DistInfo) -> None:
    """Leave the process group if this module joined it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_module(module: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every rank (identical start)."""
    if not info.enabled:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def all_reduce_mean(params: list[torch.nn.Parameter], scalars: list[torch.Tensor],
                    info: DistInfo) -> list[torch.Tensor]:
    """Average the gradients of ``params`` and the ``scalars`` over all ranks, in place / returned.

    Parameters without a gradient are skipped (the graph is the same on every rank, so it is the
    same set everywhere). One all-reduce of one flat buffer.

    Returns:
        The averaged scalars (0-dim tensors), in the order given.
    """
    if not info.enabled:
        return scalars
    grads = [p.grad for p in params if p.grad is not None]
    ref = grads[0] if grads else scalars[0]
    stats = torch.stack([s.detach().float().reshape(()) for s in scalars]).to(ref.device)
    flat = _flatten_dense_tensors([g.float() for g in grads] + [stats]) if grads else stats.clone()
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    if grads:
        parts = _unflatten_dense_tensors(flat, [g.float() for g in grads] + [stats])
        for g, new in zip(grads, parts[:-1], strict=False):
            g.copy_(new)
        stats = parts[-1]
    else:
        stats = flat
    return list(stats.unbind(0))

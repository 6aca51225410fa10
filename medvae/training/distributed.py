"""Data-parallel training under ``torchrun``: the process group and DistributedDataParallel.

The trainer wraps the generator (the model without its discriminator) and the discriminator each
in ``torch.nn.parallel.DistributedDataParallel``, which averages gradients over ranks during
``backward`` (overlapped with it, bucket by bucket). DDP synchronises only work done through a
wrapper's ``forward``, so the model's ``forward`` returns everything the losses need. The few loss
scalars are averaged with :func:`all_reduce_mean`, so every rank logs the global mean and takes
the same skip decision of the NaN guard. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

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


def wrap_ddp(module: nn.Module, info: DistInfo, device: torch.device, ignore: nn.Module | None = None
             ) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` under torchrun, else ``module`` itself.

    DDP broadcasts rank 0's parameters and buffers at construction, so every rank starts equal.
    ``ignore``: a submodule whose parameters and buffers this wrapper leaves alone (the
    discriminator inside the model: it has its own wrapper and optimizer). Every other parameter
    must get a gradient in each backward (the models use all of theirs in every step), so
    ``find_unused_parameters`` stays off.
    """
    if not info.enabled:
        return module
    if ignore is not None:
        prefix = next(n for n, m in module.named_modules() if m is ignore)
        names = [f"{prefix}.{n}" for n, _ in ignore.named_parameters()]
        names += [f"{prefix}.{n}" for n, _ in ignore.named_buffers()]
        # the documented (if underscored) way to keep parameters out of a DDP wrapper
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
    device_ids = [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over ranks of a tensor of scalars (one all-reduce); ``values`` itself for one process."""
    if not info.enabled:
        return values
    out = values.detach().float().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / info.world_size

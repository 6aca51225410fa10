"""Training batches read straight from a patch store's memory map: :class:`PatchBatches`.

Nothing here copies the whole store into memory: each batch is one sorted fancy-index read of the
memory-mapped ``patches.npy``, put back in the epoch's order and converted to float32. Batches are
seeded, resumable (``state_dict``) and sharded over ranks under DDP.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch

from medvae.data.conditions import condition_ids, joint_channel
from medvae.data.store import PatchStore, open_store, read_rows


def _as_store(store: PatchStore | str | os.PathLike) -> PatchStore:
    return store if isinstance(store, PatchStore) else open_store(store)


def _to_tensor(raw: np.ndarray, scale: float) -> torch.Tensor:
    """Stored float16 / uint16 -> float32 tensor in [0, 1] (torch's conversion is vectorized)."""
    if raw.dtype == np.uint16:
        t = torch.from_numpy(raw.astype(np.int32, copy=False)).to(torch.float32)
    else:
        t = torch.from_numpy(raw).to(torch.float32)
    if scale != 1.0:
        t.mul_(1.0 / scale)
    return t


def _dist_info() -> tuple[int, int]:
    """(rank, world size) of torch.distributed when initialized, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class Batch(NamedTuple):
    """One batch of a model's inputs.

    x: (B, C, H, W) float32 in [0, 1] on the batch device (a joint image + mask model: the label
    channel appended); ids: (B,) int64 condition ids of a class / modality model, else None;
    rows: (B,) int64 store rows the batch was read from (numpy, host).
    """

    x: torch.Tensor
    ids: torch.Tensor | None
    rows: np.ndarray


class PatchBatches:
    """Seeded, resumable batches of one split, read straight from the memmap.

    Each epoch is a permutation of the split's row indices drawn from ``(seed, epoch)``; with
    several ranks, the permutation is cut to a multiple of ``world_size`` and rank ``r`` takes
    positions ``r, r + world, ...`` (disjoint, equal sizes). Each batch is one fancy-index read
    in ascending row order, put back in permutation order, converted to float32.

    Iterating yields the remaining batches of the current epoch, then moves to the next epoch, so
    ``for epoch in ...: for x in batches: ...`` works, and ``state_dict()`` taken between batches
    resumes exactly (same remaining batches) after ``load_state_dict``.

    Args:
        store: PatchStore or path.
        split, modality: row filters (None = all).
        batch_size: patches per batch.
        seed: permutation seed.
        drop_last: drop the last incomplete batch of an epoch.
        shuffle: False keeps the rows in store order (evaluation).
        rank, world_size: the shard to read; default from torch.distributed when initialized.
        device: move batches there (CUDA: float16 patches are copied from pinned memory, non-blocking,
            and converted to float32 on the GPU).
        condition: ``(kind, names)`` of the model (medvae.data.conditions): ``class`` / ``modality``
            fill ``Batch.ids``; ``mask`` appends the label channel to ``Batch.x``.
    """

    def __init__(self, store: PatchStore | str | os.PathLike, split: str | None = None, batch_size: int = 64,
                 seed: int = 0, modality: str | None = None, drop_last: bool = True, shuffle: bool = True,
                 rank: int | None = None, world_size: int | None = None,
                 device: str | torch.device | None = None, condition: tuple[str, tuple[str, ...]] = ("none", ())):
        self.store = _as_store(store)
        self.indices = self.store.select(split, modality)
        self.batch_size, self.seed, self.drop_last, self.shuffle = int(batch_size), int(seed), drop_last, shuffle
        self.condition = condition
        if rank is None or world_size is None:
            r, w = _dist_info()
            rank = r if rank is None else rank
            world_size = w if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.device = torch.device(device) if device is not None else None
        self.epoch, self.position = 0, 0  # position: batches already yielded in this epoch

    def epoch_rows(self, epoch: int | None = None) -> np.ndarray:
        """This rank's store rows for ``epoch``, in reading order."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))
        else:
            perm = np.arange(len(self.indices))
        if self.world_size > 1:
            perm = perm[: len(perm) - len(perm) % self.world_size][self.rank :: self.world_size]
        return self.indices[perm]

    def __len__(self) -> int:
        n = len(self.indices) // self.world_size if self.world_size > 1 else len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batch(self, rows: np.ndarray) -> Batch:
        """The :class:`Batch` of store ``rows`` (any order)."""
        patches = self.store.patches
        if self.device is not None and self.device.type == "cuda" and patches.dtype == np.float16:
            # gathered straight into page-locked memory (torch's caching host allocator: reused once the
            # copy that read it has finished); float16 crosses the bus at half the bytes and becomes
            # float32 on the GPU
            pinned = torch.empty((len(rows), *patches.shape[1:]), dtype=torch.float16, pin_memory=True)
            read_rows(patches, rows, out=pinned.numpy())
            x = pinned.to(self.device, non_blocking=True).to(torch.float32)
        elif self.device is not None and self.device.type == "cuda":
            x = _to_tensor(read_rows(patches, rows), self.store.scale)
            x = x.pin_memory().to(self.device, non_blocking=True)
        else:
            raw = read_rows(patches, rows)
            x = _to_tensor(raw, self.store.scale)
            if self.device is not None and self.device.type != "cpu":
                x = x.to(self.device)
        kind, names = self.condition
        if kind == "mask":
            mask = torch.from_numpy(joint_channel(read_rows(self.store.labels, rows), names)).to(x.device)
            return Batch(torch.cat([x, mask], 1), None, rows)
        ids = condition_ids(self.store, rows, kind, names)
        return Batch(x, None if ids is None else torch.from_numpy(ids).to(x.device), rows)

    def __iter__(self):
        rows = self.epoch_rows()
        n_batches = len(self)
        while self.position < n_batches:
            start = self.position * self.batch_size
            self.position += 1
            yield self.batch(rows[start : start + self.batch_size])
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "n_rows": int(len(self.indices)),
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("n_rows", len(self.indices))) != len(self.indices):
            raise ValueError(f"saved loader state covers {state['n_rows']} patches, this split has "
                             f"{len(self.indices)}: the store changed since the checkpoint")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.seed = int(state.get("seed", self.seed))
        self.batch_size = int(state.get("batch_size", self.batch_size))

"""Reading a patch store for training: a torch Dataset / DataLoader and a fast batch iterator.

Nothing here copies the whole store into memory: patches are read from the memory-mapped
``patches.npy`` batch by batch. Two paths:

- ``PatchDataset`` + ``make_loader``: a standard ``DataLoader`` (DistributedSampler when
  ``torch.distributed`` is initialized; call ``loader.sampler.set_epoch(epoch)`` each epoch then).
- ``PatchBatches``: a seeded, resumable iterator of ``(B, C, H, W)`` float32 batches, each gathered
  with one sorted fancy-index read of the memmap (the fast path for training).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

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


class PatchDataset(Dataset):
    """Patches of one split / modality as float32 tensors ``(C, H, W)`` in [0, 1].

    Args:
        store: a PatchStore or its path.
        split: ``train`` | ``val`` | ``test`` | None (all).
        modality: ``ct`` | ``microscopy`` | ... | None (all).
        with_labels: items are ``(image, label)`` with label ``(1, H, W)`` uint8 tensors
            (zeros where the store has no labels).
        with_classes: items are ``(image, class)`` with the class id an int64 scalar tensor (the
            position in ``store.classes``; -1 where none); with both, ``(image, label, class)``.

    Pickles without the memmaps (workers reopen the store), so ``num_workers > 0`` never copies it.
    """

    def __init__(self, store: PatchStore | str | os.PathLike, split: str | None = None,
                 modality: str | None = None, with_labels: bool = False, with_classes: bool = False):
        self.store = _as_store(store)
        self.split, self.modality, self.with_labels = split, modality, with_labels
        self.with_classes = with_classes
        self.indices = self.store.select(split, modality)

    def __len__(self) -> int:
        return int(len(self.indices))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["store"] = str(self.store.path)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.store = open_store(state["store"])

    def _labels(self, rows: np.ndarray) -> torch.Tensor:
        if self.store.labels is None:
            return torch.zeros((len(rows), 1, *self.store.patches.shape[2:]), dtype=torch.uint8)
        return torch.from_numpy(read_rows(self.store.labels, rows))

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, items: list[int]):
        """Batched fetch (used by DataLoader's fetcher): one sorted read for the whole batch."""
        rows = self.indices[np.asarray(items, dtype=np.int64)]
        x = _to_tensor(read_rows(self.store.patches, rows), self.store.scale)
        parts = [x.unbind(0)]
        if self.with_labels:
            parts.append(self._labels(rows).unbind(0))
        if self.with_classes:
            parts.append(torch.from_numpy(self.store.class_ids(rows)).unbind(0))
        return list(parts[0]) if len(parts) == 1 else list(zip(*parts))


def _dist_info(distributed: bool | None) -> tuple[bool, int, int]:
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    use = initialized if distributed is None else bool(distributed)
    if use and not initialized:
        raise RuntimeError("distributed=True but torch.distributed is not initialized")
    if not use:
        return False, 0, 1
    return True, torch.distributed.get_rank(), torch.distributed.get_world_size()


def make_loader(store: PatchStore | str | os.PathLike, split: str | None, batch_size: int, shuffle: bool,
                seed: int, num_workers: int = 0, drop_last: bool = True, distributed: bool | None = None,
                modality: str | None = None, with_labels: bool = False, with_classes: bool = False) -> DataLoader:
    """A DataLoader of ``(B, C, H, W)`` float32 batches in [0, 1] over one split.

    ``distributed=None`` uses a ``DistributedSampler`` exactly when ``torch.distributed`` is
    initialized (call ``loader.sampler.set_epoch(epoch)`` each epoch); otherwise a seeded
    RandomSampler (shuffle) or SequentialSampler.
    """
    ds = PatchDataset(store, split=split, modality=modality, with_labels=with_labels, with_classes=with_classes)
    use_dist, _, _ = _dist_info(distributed)
    if use_dist:
        sampler = DistributedSampler(ds, shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif shuffle:
        sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(ds)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last, persistent_workers=num_workers > 0)


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
        with_labels: yield ``(x, labels)``; labels ``(B, 1, H, W)`` uint8 masks.
        with_classes: yield ``(x, classes)``; classes ``(B,)`` int64 ids into ``store.classes``
            (-1 where none); with both, ``(x, labels, classes)``.
        rank, world_size: the shard to read; default from torch.distributed when initialized.
        device: move batches there (CUDA: float16 patches are copied from pinned memory, non-blocking,
            and converted to float32 on the GPU).
        condition: ``(kind, names)`` of a conditional model (medvae.data.conditions): batches are
            ``(x, ids)`` with ids ``(B,)`` int64 (None for ``mask``, whose x carries the mask channel).
    """

    def __init__(self, store: PatchStore | str | os.PathLike, split: str | None = None, batch_size: int = 64,
                 seed: int = 0, modality: str | None = None, drop_last: bool = True, shuffle: bool = True,
                 with_labels: bool = False, rank: int | None = None, world_size: int | None = None,
                 device: str | torch.device | None = None, with_classes: bool = False,
                 condition: tuple[str, tuple[str, ...]] | None = None):
        self.store = _as_store(store)
        self.indices = self.store.select(split, modality)
        self.batch_size, self.seed, self.drop_last, self.shuffle = int(batch_size), int(seed), drop_last, shuffle
        self.with_labels, self.with_classes, self.condition = with_labels, with_classes, condition
        if rank is None or world_size is None:
            _, r, w = _dist_info(None)
            rank = r if rank is None else rank
            world_size = w if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.device = torch.device(device) if device is not None else None
        self.epoch, self.position = 0, 0  # position: batches already yielded in this epoch
        if self.with_labels and self.store.labels is None:
            raise ValueError(f"{self.store.path}: store has no labels.npy")

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

    def batch(self, rows: np.ndarray):
        """Read ``rows`` (any order) -> ``(B, C, H, W)`` float32 tensor (and masks, classes)."""
        raw = read_rows(self.store.patches, rows)
        y = torch.from_numpy(read_rows(self.store.labels, rows)) if self.with_labels else None
        k = torch.from_numpy(self.store.class_ids(rows)) if self.with_classes else None
        if self.device is not None and self.device.type == "cuda":
            # float16 crosses the bus at half the bytes and becomes float32 on the GPU
            src = torch.from_numpy(raw) if raw.dtype == np.float16 else _to_tensor(raw, self.store.scale)
            x = src.pin_memory().to(self.device, non_blocking=True).to(torch.float32)
            y = y.pin_memory().to(self.device, non_blocking=True) if y is not None else None
        else:
            x = _to_tensor(raw, self.store.scale)
            if self.device is not None and self.device.type != "cpu":
                x = x.to(self.device)
                y = y.to(self.device) if y is not None else None
        if k is not None and self.device is not None:
            k = k.to(self.device)
        if self.condition is not None:
            return self._conditioned(x, rows)
        out = tuple(t for t in (x, y, k) if t is not None)
        return out if len(out) > 1 else x

    def _conditioned(self, x: torch.Tensor, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        kind, names = self.condition
        if kind == "mask":
            mask = torch.from_numpy(joint_channel(read_rows(self.store.labels, rows), names)).to(x.device)
            return torch.cat([x, mask], 1), None
        ids = condition_ids(self.store, rows, kind, names)
        return x, None if ids is None else torch.from_numpy(ids).to(x.device)

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

import functools
import json
import os
import pickle

import numpy as np
import pytest
import torch

from medvae.data.loader import PatchBatches, PatchDataset, make_loader
from medvae.data.store import write_store


def small_store(path, n=50, c=1, size=8, dtype="float16", labels=False, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, c, size, size)).astype(np.float32)
    x[:, 0, 0, 0] = np.arange(n) / 1000.0  # identifies the row
    splits = np.array(["train", "val", "test"])[np.arange(n) % 3]
    index = {
        "patient_id": [f"P{i % 5}" for i in range(n)],
        "modality": ["ct" if i % 2 == 0 else "microscopy" for i in range(n)],
        "split": list(splits),
        "slice_index": list(range(n)),
        "y": [0] * n,
        "x": [0] * n,
        "foreground_fraction": [1.0] * n,
        "source": ["mem"] * n,
    }
    lab = (x[:, :1] > 0.5).astype(np.uint8) if labels else None
    store = write_store(path, x, index, {"dtype": dtype}, labels=lab)
    return store, x


def test_dataset_items_and_filters(tmp_path):
    store, x = small_store(tmp_path / "s", labels=True)
    ds = PatchDataset(store, split="train", modality="ct", with_labels=True)
    rows = store.select("train", "ct")
    assert len(ds) == len(rows) > 0
    assert all(store.index["split"][r] == "train" and store.index["modality"][r] == "ct" for r in rows)
    img, lab = ds[1]
    assert img.dtype == torch.float32 and img.shape == (1, 8, 8)
    np.testing.assert_allclose(img.numpy(), x[rows[1]].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(lab.numpy(), (x[rows[1], :1] > 0.5))


def test_make_loader_covers_split(tmp_path):
    store, x = small_store(tmp_path / "s")
    loader = make_loader(store, "train", batch_size=4, shuffle=True, seed=3, drop_last=False)
    seen = torch.cat(list(loader))
    got = np.sort(np.rint(seen[:, 0, 0, 0].numpy() * 1000).astype(int))
    np.testing.assert_array_equal(got, store.select("train"))


def _record_worker_store(out_path, worker_id):
    """worker_init_fn: write down what the worker's dataset holds (runs in the worker process)."""
    info = torch.utils.data.get_worker_info()
    patches = info.dataset.store.patches
    out_path.write_text(json.dumps({
        "pid": os.getpid(), "memmap": isinstance(patches, np.memmap), "mode": patches.mode,
        "filename": str(patches.filename), "owns_data": bool(patches.flags.owndata),
    }))


def test_loader_workers_do_not_copy_store(tmp_path):
    n, size = 60, 32
    store, x = small_store(tmp_path / "s", n=n, size=size)
    loader = make_loader(tmp_path / "s", "val", batch_size=4, shuffle=False, seed=0, num_workers=1)
    # The dataset crosses to the worker without its arrays: its pickle is far smaller than the patches.
    assert len(pickle.dumps(loader.dataset)) < store.patches.nbytes / 20
    record = tmp_path / "worker.json"
    loader.worker_init_fn = functools.partial(_record_worker_store, record)
    got = torch.cat(list(loader)).numpy()
    # Independent reference: small_store puts row i in "val" when i % 3 == 1, written as float16.
    rows = np.flatnonzero(np.arange(n) % 3 == 1)
    rows = rows[: len(rows) // 4 * 4]  # drop_last
    np.testing.assert_array_equal(got, x[rows].astype(np.float16).astype(np.float32))
    worker = json.loads(record.read_text())
    assert worker["pid"] != os.getpid()  # it ran in a worker process
    # ... which reads the store's patches.npy through a read-only memory map, not a copy.
    assert worker["memmap"] and worker["mode"] == "r" and not worker["owns_data"]
    assert os.path.samefile(worker["filename"], tmp_path / "s" / "patches.npy")


def rows_of(batch):
    return np.rint(batch[:, 0, 0, 0].numpy() * 1000).astype(int)


@pytest.mark.parametrize("dtype", ["float16", "uint16"])
def test_patch_batches_epoch_coverage_and_values(tmp_path, dtype):
    store, x = small_store(tmp_path / "s", n=60, dtype=dtype)
    pb = PatchBatches(store, "train", batch_size=5, seed=1)
    batches = list(pb)
    assert len(batches) == len(pb) == 4
    rows = np.concatenate([rows_of(b) for b in batches])
    np.testing.assert_array_equal(np.sort(rows), store.select("train"))  # each exactly once
    tol = 1e-3 if dtype == "float16" else 1e-5
    np.testing.assert_allclose(batches[0].numpy(), x[rows[:5]], atol=tol)
    assert batches[0].dtype == torch.float32
    # next epoch: a different permutation of the same rows
    rows2 = np.concatenate([rows_of(b) for b in pb])
    assert sorted(rows2) == sorted(rows) and list(rows2) != list(rows)


def test_patch_batches_deterministic_and_resume(tmp_path):
    store, _ = small_store(tmp_path / "s", n=90)
    a = [rows_of(b) for _ in range(2) for b in PatchBatches(store, None, 7, seed=5)]
    b = [rows_of(b) for b in PatchBatches(store, None, 7, seed=5)]
    assert all((u == v).all() for u, v in zip(a, b))
    assert not all((u == v).all() for u, v in zip(b, [rows_of(t) for t in PatchBatches(store, None, 7, seed=6)]))

    pb = PatchBatches(store, None, 7, seed=5)
    full = [rows_of(t) for t in pb] + [rows_of(t) for t in pb]  # two epochs
    pb = PatchBatches(store, None, 7, seed=5)
    it = iter(pb)
    first = [rows_of(next(it)) for _ in range(4)]
    state = pb.state_dict()
    resumed = PatchBatches(store, None, 7, seed=0)
    resumed.load_state_dict(state)
    rest = [rows_of(t) for t in resumed] + [rows_of(t) for t in resumed]
    got = first + rest
    assert len(got) == len(full) and all((u == v).all() for u, v in zip(got, full))


def test_patch_batches_ranks_disjoint(tmp_path):
    store, _ = small_store(tmp_path / "s", n=101)
    world = 3
    parts = [np.concatenate([rows_of(b) for b in PatchBatches(store, None, 4, seed=2, rank=r,
                                                             world_size=world, drop_last=False)])
             for r in range(world)]
    assert len({len(p) for p in parts}) == 1
    union = np.concatenate(parts)
    assert len(np.unique(union)) == len(union) == 101 - 101 % world


def test_patch_batches_labels_follow_images(tmp_path):
    store, x = small_store(tmp_path / "s", labels=True)
    for xb, yb in PatchBatches(store, None, 8, seed=0, with_labels=True):
        np.testing.assert_array_equal(yb.numpy(), (x[rows_of(xb), :1] > 0.5))


def test_make_loader_uses_distributed_sampler_when_initialized(tmp_path):
    import torch.distributed as dist
    from torch.utils.data.distributed import DistributedSampler

    store, _ = small_store(tmp_path / "s", n=30)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        loader = make_loader(store, "train", batch_size=2, shuffle=True, seed=0)
        assert isinstance(loader.sampler, DistributedSampler)
        loader.sampler.set_epoch(1)
        assert sum(b.shape[0] for b in loader) == len(store.select("train")) // 2 * 2
        assert PatchBatches(store, "train", 2).world_size == 1
    finally:
        dist.destroy_process_group()
    assert not isinstance(make_loader(store, "train", 2, True, 0).sampler, DistributedSampler)


import numpy as np
import pytest
import torch

from medvae.data.loader import Batch, PatchBatches
from tests.factories import row_store


def rows_of(batch: Batch):
    """The rows row_store encoded in pixel (0, 0), checked against the rows the batch reports."""
    rows = np.rint(batch.x[:, 0, 0, 0].numpy() * 1000).astype(int)
    np.testing.assert_array_equal(rows, batch.rows)
    return rows


@pytest.mark.parametrize("dtype", ["float16", "uint16"])
def test_patch_batches_epoch_coverage_and_values(tmp_path, dtype):
    store, x = row_store(tmp_path / "s", n=60, dtype=dtype)
    pb = PatchBatches(store, "train", batch_size=5, seed=1)
    batches = list(pb)
    assert len(batches) == len(pb) == 4
    rows = np.concatenate([rows_of(b) for b in batches])
    np.testing.assert_array_equal(np.sort(rows), store.select("train"))  # each exactly once
    tol = 1e-3 if dtype == "float16" else 1e-5
    np.testing.assert_allclose(batches[0].x.numpy(), x[rows[:5]], atol=tol)
    assert batches[0].x.dtype == torch.float32 and batches[0].ids is None
    # next epoch: a different permutation of the same rows
    rows2 = np.concatenate([rows_of(b) for b in pb])
    assert sorted(rows2) == sorted(rows) and list(rows2) != list(rows)


def test_patch_batches_deterministic_and_resume(tmp_path):
    store, _ = row_store(tmp_path / "s", n=90)
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
    store, _ = row_store(tmp_path / "s", n=101)
    world = 3
    parts = [np.concatenate([rows_of(b) for b in PatchBatches(store, None, 4, seed=2, rank=r,
                                                             world_size=world, drop_last=False)])
             for r in range(world)]
    assert len({len(p) for p in parts}) == 1
    union = np.concatenate(parts)
    assert len(np.unique(union)) == len(union) == 101 - 101 % world


def test_patch_batches_mask_channel_follows_images(tmp_path):
    store, x = row_store(tmp_path / "s", labels=True)
    for b in PatchBatches(store, None, 8, seed=0, condition=("mask", ("background", "label 1"))):
        assert b.x.shape[1] == 2 and b.ids is None
        # the joint model's last channel is label / max label: here the 0/1 mask itself
        np.testing.assert_array_equal(b.x[:, 1:].numpy(), (x[rows_of(b), :1] > 0.5))


def test_patch_batches_condition_ids_follow_rows(tmp_path):
    store, _ = row_store(tmp_path / "s")
    names = ("ct", "microscopy")
    for b in PatchBatches(store, None, 8, seed=0, condition=("modality", names)):
        want = [names.index(m) for m in store.index["modality"][rows_of(b)]]
        np.testing.assert_array_equal(b.ids.numpy(), want)


def test_patch_batches_world_size_from_torch_distributed(tmp_path):
    import torch.distributed as dist

    store, _ = row_store(tmp_path / "s", n=30)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        assert PatchBatches(store, "train", 2).world_size == 1
    finally:
        dist.destroy_process_group()


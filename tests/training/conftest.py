"""A tiny patch store and tiny model configs for the training-engine tests."""

import numpy as np
import pytest
import torch

from medvae.config import TrainStageConfig
from medvae.data.store import write_store

N_TRAIN, N_VAL = 64, 16


def make_store(path, content_hash="tiny-store-v1", nan_rows=()):
    """Discs of random position/size on a dim background, 64², in a store with train/val splits."""
    rng = np.random.default_rng(0)
    n = N_TRAIN + N_VAL
    yy, xx = np.mgrid[:64, :64] / 64.0
    cy, cx = rng.uniform(0.3, 0.7, (2, n, 1, 1))
    r = rng.uniform(0.1, 0.3, (n, 1, 1))
    x = (((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) * 0.8 + 0.1)[:, None].astype(np.float32)
    x[list(nan_rows)] = np.nan
    index = {
        "patient_id": [f"P{i // 8:03d}" for i in range(n)], "modality": ["ct"] * n,
        "split": ["train"] * N_TRAIN + ["val"] * N_VAL, "slice_index": list(range(n)), "y": [0] * n,
        "x": [0] * n, "foreground_fraction": [1.0] * n, "source": ["phantom"] * n,
    }
    return write_store(path, x, index, {"content_hash": content_hash})


def tiny_config(name="vae", **train) -> TrainStageConfig:
    """channels (8, 16, 32), latent 16, 64² (the image size comes from the store)."""
    base = {"batch_size": 8, "max_steps": 12, "lr": 2e-3, "warmup_steps": 2, "beta_warmup_steps": 4,
            "checkpoint_every": 4, "log_every": 1, "val_batches": 1, "disc_start": 2}
    return TrainStageConfig.model_validate({
        "model": {"name": name, "channels": [8, 16, 32], "latent_dim": 16, "disc_channels": 8,
                  "disc_layers": 2},
        "train": {**base, **train},
    })


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store") / "store")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: bitwise-repeatable CPU runs (a subprocess is given OMP_NUM_THREADS=1
    too) and no oversubscription when tests run in parallel on a small machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""A tiny patch store and tiny model configs for the training-engine tests."""

import numpy as np
import pytest

from medvae.config import TrainStageConfig
from tests.factories import disc_images, patch_store

N_TRAIN, N_VAL = 64, 16


def make_store(path, content_hash="tiny-store-v1", nan_rows=()):
    """Discs of random position/size on a dim background, 64², in a store with train/val splits."""
    n = N_TRAIN + N_VAL
    x = disc_images(n, 64, seed=0)
    x[list(nan_rows)] = np.nan
    return patch_store(path, x, patient_id=[f"P{i // 8:03d}" for i in range(n)],
                       split=["train"] * N_TRAIN + ["val"] * N_VAL, source="phantom", content_hash=content_hash)


def tiny_config(name="vae", **train) -> TrainStageConfig:
    """channels (8, 16, 32), latent 16, 64² (the image size comes from the store)."""
    base = {"batch_size": 8, "max_steps": 12, "lr": 2e-3, "warmup_steps": 2, "beta_warmup_steps": 4,
            "checkpoint_every": 4, "log_every": 1, "val_batches": 1, "disc_start": 2}
    return TrainStageConfig.model_validate({
        "model": {"name": name, "channels": [8, 16, 32], "latent_dim": 16,
                  **({"disc_channels": 8, "disc_layers": 2} if name == "vaegan" else {})},
        "train": {**base, **train},
    })


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store") / "store")

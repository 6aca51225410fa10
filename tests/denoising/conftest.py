"""A tiny CT-like store (HU window -160..240) and a tiny trained denoise run."""

import numpy as np
import pytest
import torch

from medvae.config import TrainStageConfig
from medvae.data.store import write_store
from medvae.pipeline import train_stage


def make_hu_store(path, n_train=32, n_val=8, n_test=8):
    rng = np.random.default_rng(1)
    n = n_train + n_val + n_test
    yy, xx = np.mgrid[:64, :64] / 64.0
    cy, cx = rng.uniform(0.3, 0.7, (2, n, 1, 1))
    r = rng.uniform(0.15, 0.3, (n, 1, 1))
    x = (((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) * 0.5 + 0.3)[:, None].astype(np.float32)
    index = {"patient_id": [f"P{i % 4}" for i in range(n)], "modality": ["ct"] * n,
             "split": ["train"] * n_train + ["val"] * n_val + ["test"] * n_test, "slice_index": list(range(n)),
             "y": [0] * n, "x": [0] * n, "foreground_fraction": [1.0] * n, "source": ["phantom"] * n}
    meta = {"content_hash": "hu-store", "normalization": {"ct": {"low": -160.0, "high": 240.0, "unit": "HU"}},
            "spacing": {"ct": [2.0, 2.0]}}
    return write_store(path, x, index, meta)


def denoise_config(kind="gaussian", steps=4, **train) -> TrainStageConfig:
    return TrainStageConfig.model_validate({
        "task": "denoise", "noise": {"kind": kind, "crop": 32},
        "model": {"name": "dae", "channels": [8, 16], "norm_groups": 4, "likelihood": "l2"},
        "train": {"batch_size": 8, "max_steps": steps, "lr": 2e-3, "warmup_steps": 1, "checkpoint_every": 2,
                  "log_every": 1, "val_batches": 1, "amp": "off", **train}})


@pytest.fixture(scope="session")
def hu_store(tmp_path_factory):
    return make_hu_store(tmp_path_factory.mktemp("hu") / "store")


@pytest.fixture(scope="session")
def denoise_run(hu_store, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "dae"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_stage(hu_store, run, denoise_config("ct-lowdose"), device="cpu")
    finally:
        torch.set_num_threads(before)
    return run

"""A tiny CT-like store (HU window -160..240) and a tiny trained denoise run."""

import pytest

from medvae.config import TrainStageConfig
from medvae.pipeline import train_stage
from tests.factories import disc_store


def denoise_config(kind="gaussian", steps=4, **train) -> TrainStageConfig:
    return TrainStageConfig.model_validate({
        "task": "denoise", "noise": {"kind": kind, "crop": 32},
        "model": {"name": "dae", "channels": [8, 16], "norm_groups": 4, "likelihood": "l2"},
        "train": {"batch_size": 8, "max_steps": steps, "lr": 2e-3, "warmup_steps": 1, "checkpoint_every": 2,
                  "log_every": 1, "val_batches": 1, "amp": "off", **train}})


@pytest.fixture(scope="session")
def hu_store(tmp_path_factory):
    return disc_store(tmp_path_factory.mktemp("hu") / "store", {"train": 32, "val": 8, "test": 8}, seed=1,
                      radius=(0.15, 0.3), level=0.5, background=0.3, patient_id=[f"P{i % 4}" for i in range(48)],
                      content_hash="hu-store", normalization={"ct": {"low": -160.0, "high": 240.0, "unit": "HU"}},
                      spacing={"ct": [2.0, 2.0]})


@pytest.fixture(scope="session")
def denoise_run(hu_store, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "dae"
    train_stage(hu_store, run, denoise_config("ct-lowdose"), device="cpu")
    return run

"""Checkpoint contract: atomic, weights_only-loadable, tampered/truncated files refused."""

import random

import numpy as np
import pytest
import torch

from medvae.errors import CheckpointError
from medvae.training.checkpoint import (
    FORMAT_VERSION,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


class Payload:
    """Stands for arbitrary code a tampered checkpoint would smuggle in through pickle."""

    def __reduce__(self):
        return (print, ("payload executed",))


def _ckpt():
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3, betas=(0.5, 0.9))
    lin(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    return {
        "format_version": FORMAT_VERSION,
        "model_config": {"name": "vae", "channels": [8, 16], "image_size": 64},
        "train_config": {"lr": 1e-3, "betas": [0.5, 0.9]},
        "model_state": lin.state_dict(),
        "optimizer_states": {"generator": opt.state_dict()},
        "scheduler_states": {"generator": sched.state_dict()},
        "scaler_state": scaler.state_dict(),
        "step": 7,
        "epoch": 1,
        "rng": rng_state(),
        "data_state": {"epoch": 1, "position": 3},
        "store_hash": "abc",
        "metrics": {"val_elbo": -12.5},
    }


def test_round_trip_is_weights_only(tmp_path):
    ckpt = _ckpt()
    path = save_checkpoint(tmp_path / "checkpoints" / "last.pt", ckpt)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left
    torch.load(path, weights_only=True)  # the contract itself, not only our wrapper
    back = load_checkpoint(path)
    assert back["step"] == 7 and back["metrics"] == {"val_elbo": -12.5}
    for k, v in ckpt["model_state"].items():
        assert torch.equal(back["model_state"][k], v)
    assert back["optimizer_states"]["generator"]["param_groups"][0]["betas"] == (0.5, 0.9)


def test_pickled_object_is_refused(tmp_path):
    ckpt = _ckpt()
    ckpt["extra"] = {"hook": Payload()}
    path = tmp_path / "evil.pt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="evil.pt.*refused"):
        load_checkpoint(path)


def test_truncated_and_garbage_files_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "a.pt", _ckpt())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="a.pt.*corrupt or truncated"):
        load_checkpoint(path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(junk)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_not_a_checkpoint_and_future_version(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="missing format_version"):
        load_checkpoint(tmp_path / "plain.pt")
    ckpt = _ckpt()
    ckpt["format_version"] = FORMAT_VERSION + 1
    save_checkpoint(tmp_path / "new.pt", ckpt)
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(tmp_path / "new.pt")


def test_rng_states_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    np.random.normal()  # leaves a cached Gaussian in numpy's state
    path = save_checkpoint(tmp_path / "r.pt", {**_ckpt(), "rng": rng_state()})
    expected = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    set_rng_state(load_checkpoint(path)["rng"])
    got = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    assert torch.equal(expected[0], got[0])
    np.testing.assert_array_equal(expected[1], got[1])
    assert expected[2] == got[2] and expected[3] == got[3]

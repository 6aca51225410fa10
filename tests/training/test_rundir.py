"""RunDir: the one owner of a run directory's layout: checkpoint names, the choice of ``best``, caches."""

import pytest

from medvae.errors import CheckpointError
from medvae.training.checkpoint import save_checkpoint
from medvae.training.rundir import RunDir

CKPT = {"format_version": 1, "model_config": {}, "model_state": {}}


def test_checkpoint_resolves_best_last_steps_and_paths(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(CheckpointError, match="run directory not found"):
        run.checkpoint("best")
    last = save_checkpoint(run.checkpoint_path("last"), CKPT)
    assert last == tmp_path / "run" / "checkpoints" / "last.pt"
    assert run.checkpoint("best") == last  # falls back to last.pt
    best = save_checkpoint(run.checkpoint_path("best"), CKPT)
    step = save_checkpoint(run.checkpoint_path(7), CKPT)
    assert step.name == "step_00000007.pt"
    assert run.checkpoint("best") == best
    assert run.checkpoint("last") == last
    assert run.checkpoint("step_00000007") == step
    assert run.checkpoint(str(step)) == step
    assert RunDir(step).path == run.path  # a checkpoint file names its run
    with pytest.raises(CheckpointError, match="nope"):
        run.checkpoint("nope")


def test_caches_are_keyed_by_the_checkpoint_content(tmp_path):
    run = RunDir(tmp_path / "run")
    ckpt = save_checkpoint(run.checkpoint_path("best"), CKPT)
    prior, codes = run.prior_path(ckpt), run.pool_codes_path(ckpt)
    assert prior.parent == tmp_path / "run" / "priors" and prior.name.startswith("best-")
    assert codes.parent == run.path and codes.name.startswith("pool_codes-") and codes.suffix == ".npz"
    save_checkpoint(ckpt, {**CKPT, "step": 2})
    assert run.prior_path(ckpt) != prior and run.pool_codes_path(ckpt) != codes

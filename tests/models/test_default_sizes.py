"""Models sized to their patches (#20): default widths and depth follow the patch size; explicit channels win."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medvae.config import PACKAGED_PIPELINES, TrainStageConfig, flat_model_dump, parse_model_config
from medvae.errors import CheckpointError
from medvae.models import build_model
from medvae.models.vae import stage_channels
from medvae.pipeline import load_pipeline
from medvae.training.trainer import resolve_config
from tests.factories import patch_store


@pytest.mark.parametrize("size, widths", [
    (32, [32, 64, 128]),  # 3 levels down to 8x8
    (64, [32, 64, 128, 256]),  # 4 levels: the widths 64² had before
    (128, [32, 64, 128, 256, 256]),  # 5 levels
    (256, [32, 64, 128, 256, 256, 256]),  # 6 levels (8x8 bottleneck), as before
])
def test_default_widths_follow_the_patch_size(size, widths):
    """The documented default table (one width per level, 32 doubling to 256), not the code's own table."""
    cfg = parse_model_config(dict(image_size=size))
    assert cfg.channels is None
    assert cfg.resolved_channels() == tuple(widths)
    assert stage_channels(cfg) == widths


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_defaults_build_the_models_of_before(size):
    """No result changes: the default model at each size is the one the old default widths (32/64/128/256) gave."""
    new = build_model(parse_model_config(dict(image_size=size)))
    old = build_model(parse_model_config(dict(image_size=size, channels=(32, 64, 128, 256))))
    assert [p.shape for p in new.parameters()] == [p.shape for p in old.parameters()]


@pytest.mark.parametrize("name", ["vae", "vaegan", "monai-vae", "monai-kl"])
@pytest.mark.parametrize("size", [32, 64])
def test_every_patch_model_runs_at_every_default_size(name, size):
    """At its default widths each patch model encodes a patch to ``latent_dim`` and decodes to its shape."""
    torch.manual_seed(0)
    model = build_model(parse_model_config(dict(name=name, image_size=size, latent_dim=64))).eval()
    with torch.no_grad():
        mu, logvar = model.encode(torch.rand(2, 1, size, size))
        x = model.decode(mu)
    assert mu.shape == logvar.shape == (2, 64)
    assert x.shape == (2, 1, size, size)
    assert torch.all((x >= 0) & (x <= 1))  # a mean image of [0, 1] pixels


@pytest.mark.parametrize("size, widths", [
    (32, [8, 16, 24]),
    (64, [8, 16, 24, 24]),  # deeper levels repeat the last width given
    (128, [8, 16, 24, 24, 24]),
    (256, [8, 16, 24, 24, 24, 24]),
])
def test_explicit_channels_win(size, widths):
    cfg = parse_model_config(dict(image_size=size, channels=(8, 16, 24)))
    assert cfg.resolved_channels() == (8, 16, 24)
    assert stage_channels(cfg) == widths


@pytest.mark.parametrize("name", ["dae", "unet-vae"])
def test_denoisers_keep_their_levels_at_every_size(name):
    for size in (32, 128):
        assert parse_model_config(dict(name=name, image_size=size)).resolved_channels() == (32, 64, 128, 256)


def _store_32(path):
    """16 random 32² patches, 12 train and 4 val."""
    x = np.random.default_rng(0).random((16, 1, 32, 32), dtype=np.float32)
    return patch_store(path, x, patient_id=[f"P{i % 4}" for i in range(16)], split=["train"] * 12 + ["val"] * 4)


def test_resolve_config_names_the_widths_for_the_run(tmp_path):
    store = _store_32(tmp_path / "s")
    cfg = resolve_config(TrainStageConfig(), store)
    assert cfg.model.image_size == 32 and cfg.model.channels == (32, 64, 128)  # written into config.yaml / checkpoints
    mine = TrainStageConfig.model_validate({"model": {"channels": [16, 32, 64]}})
    assert resolve_config(mine, store).model.channels == (16, 32, 64)


@pytest.mark.parametrize("pipeline", ["demo", "fashion_mnist"])
def test_shipped_pipelines_name_their_widths(pipeline):
    """Their measured tables stay as they are: every model states its channels, so the new defaults do not apply."""
    config = load_pipeline(PACKAGED_PIPELINES / f"{pipeline}.yaml")
    assert config.models
    for stage in config.models.values():
        assert stage.model.channels is not None


def test_a_run_from_before_the_defaults_resumes_with_them(tmp_path):
    """A checkpoint that names the old default (32/64/128/256 at 32²: levels 32/64/128) is the same network as
    today's resolved default (32/64/128), so ``--resume`` without ``channels`` continues it."""
    from medvae.training.trainer import train

    store = _store_32(tmp_path / "s")
    train_keys = {"batch_size": 4, "checkpoint_every": 2, "val_batches": 1, "warmup_steps": 0}
    old = TrainStageConfig.model_validate({"model": {"latent_dim": 8, "channels": [32, 64, 128, 256]},
                                           "train": {**train_keys, "max_steps": 2}})
    train(store, tmp_path / "run", old, device="cpu")
    new = TrainStageConfig.model_validate({"model": {"latent_dim": 8}, "train": {**train_keys, "max_steps": 3}})
    assert train(store, tmp_path / "run", new, device="cpu", resume=True)["step"] == 3
    with pytest.raises(CheckpointError, match="model config differs"):
        other = TrainStageConfig.model_validate({"model": {"latent_dim": 8, "channels": [16, 32, 64]},
                                                 "train": {**train_keys, "max_steps": 4}})
        train(store, tmp_path / "run", other, device="cpu", resume=True)


def test_pipeline_training_keys_do_not_change_with_the_defaults():
    """A pipeline stage without channels keeps the key it had when the default was 32/64/128/256 (same networks)."""
    from medvae.files import sha256_json
    from medvae.pipeline import train_stage_key

    cfg = TrainStageConfig()
    before = {**cfg.stable_dump(), "model": flat_model_dump(cfg.model)}
    before["model"]["channels"] = [32, 64, 128, 256]
    assert train_stage_key("h", cfg) == sha256_json(["h", before])
    # the keys the code before the posterior correction wrote (2026-12-07, 233d7ac): unchanged but for the
    # blind-spot runs, whose training it changes
    before_posterior = {
        "{}": "c5dd358c6554b3adc86636cc88b8c0df5e215105de873953e3028d10a4588459",
        '{"model": {"channels": [8, 16]}}': "c8f422766769b113b955f046c5b44751e0022c5a6e05eb04866051fbd53f60c9",
        '{"task": "denoise", "objective": "supervised"}':
            "a84a4621e5997b3fe41ba020d824af7d995c36751634923a2178b89f402e6b22"}
    for given, key in before_posterior.items():
        assert train_stage_key("h", TrainStageConfig.model_validate(json.loads(given))) == key, given
    n2v = TrainStageConfig.model_validate({"task": "denoise", "objective": "n2v"})
    assert train_stage_key("h", n2v) != "1dec20ce539fe749d2485adc19405e1956cc189b910faea0f71e8032c88d4584"


def test_flat_model_dump_is_the_flat_config_of_before_the_families():
    """The train-stage key hashes the flat model config every family's keys used to share (medvae <= 0.3), so a
    pipeline's trained models stay up to date across the split into family configs."""
    old = {"name": "dae", "in_channels": 1, "image_size": 128, "latent_dim": 128, "channels": None, "res_units": 1,
           "norm_groups": 8, "upsample": "nearest", "likelihood": "l2", "fixed_scale": 0.1, "disc_channels": 64,
           "disc_layers": 3, "spectral_norm": False, "skip_connections": True, "latent_channels": 8,
           "top_skip": False, "downsample": "conv", "input_residual": True, "noise_a": None, "noise_b": None,
           "condition": "auto", "condition_names": [], "condition_dim": 32}
    assert flat_model_dump(parse_model_config({"name": "dae", "likelihood": "l2", "top_skip": False})) == old

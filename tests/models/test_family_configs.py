"""Model configs by family: a discriminated union by ``name``, and the flat configs of medvae <= 0.3."""

from __future__ import annotations

import pytest
import torch

from medvae.config import (
    DAEConfig,
    TrainStageConfig,
    UNetVAEConfig,
    VAEConfig,
    VAEGANConfig,
    flat_model_dump,
    parse_config,
    parse_model_config,
)
from medvae.errors import CheckpointError, ConfigError
from medvae.models import build_model
from medvae.training.checkpoint import load_model, save_checkpoint


def test_name_picks_the_family_and_defaults_to_vae():
    assert type(TrainStageConfig().model) is VAEConfig
    assert type(parse_model_config({})) is VAEConfig
    assert type(parse_model_config({"name": "vaegan"})) is VAEGANConfig
    assert type(parse_model_config({"name": "unet-vae"})) is UNetVAEConfig
    dae = parse_model_config({"name": "dae", "top_skip": False})
    assert type(dae) is DAEConfig and not dae.top_skip
    assert not {"latent_dim", "disc_channels", "latent_channels", "condition_dim"} & set(dae.model_dump())


def test_a_family_cannot_carry_another_familys_options():
    with pytest.raises(ConfigError, match="model.disc_channels is an option of vaegan, not of model vae"):
        parse_config({"model": {"disc_channels": 8}}, TrainStageConfig, "run.yaml")
    with pytest.raises(ConfigError, match="run.yaml.*latent_channels is an option of unet-vae, not of model dae"):
        parse_config({"model": {"name": "dae", "latent_channels": 2}}, TrainStageConfig, "run.yaml")
    with pytest.raises(ConfigError, match="run.yaml: unknown key 'model.latent_dimm'"):
        parse_config({"model": {"latent_dimm": 2}}, TrainStageConfig, "run.yaml")
    with pytest.raises(ConfigError, match="'model.latent_dim'"):
        parse_config({"model": {"name": "vaegan", "latent_dim": "x"}}, TrainStageConfig, "run.yaml")
    with pytest.raises(ConfigError, match="run.yaml"):
        parse_config({"model": {"name": "gan"}}, TrainStageConfig, "run.yaml")


def test_an_old_flat_config_drops_the_other_families_defaults():
    """The flat dict every model config used to be: another family's keys at their defaults are dropped."""
    flat = flat_model_dump(parse_model_config({"name": "vaegan", "disc_channels": 8, "latent_dim": 16}))
    assert {"top_skip", "latent_channels", "input_residual"} <= set(flat)
    cfg = parse_model_config(flat)
    assert type(cfg) is VAEGANConfig and cfg.disc_channels == 8 and cfg.latent_dim == 16
    assert flat_model_dump(cfg) == flat


@pytest.mark.parametrize("name", ["dae", "unet-vae", "vaegan"])
def test_an_old_flat_checkpoint_loads(tmp_path, name):
    """A checkpoint whose model config is the flat dict of medvae <= 0.3 rebuilds the same network."""
    cfg = parse_model_config({"name": name, "image_size": 32, "channels": [8, 16], "norm_groups": 4,
                              **({"latent_dim": 8, "disc_channels": 8, "disc_layers": 2} if name == "vaegan" else {})})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    save_checkpoint(tmp_path / "old.pt", {"model_config": flat_model_dump(cfg), "model_state": model.state_dict()})
    loaded, meta = load_model(tmp_path / "old.pt")
    assert loaded.config == cfg
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x).x_hat, model(x).x_hat)
    # a flat config whose other family's key is not at its default is not this model's
    bad = {**flat_model_dump(cfg), "spectral_norm": True} if name != "vaegan" else \
        {**flat_model_dump(cfg), "top_skip": False}
    save_checkpoint(tmp_path / "bad.pt", {"model_config": bad, "model_state": model.state_dict()})
    with pytest.raises(CheckpointError, match="not of model"):
        load_model(tmp_path / "bad.pt")

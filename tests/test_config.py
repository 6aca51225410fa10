import pytest

from medvae.config import DiscoverConfig, PrepareConfig, SplitConfig, TrainStageConfig, load_config, parse_config
from medvae.errors import ConfigError


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("model:\n  latent_dmi: 64\n")
    with pytest.raises(ConfigError, match=r"train\.yaml: unknown key 'model\.latent_dmi'"):
        load_config(path, TrainStageConfig)


def test_bad_value_names_key(tmp_path):
    path = tmp_path / "prep.yaml"
    path.write_text("patch_size: 100\n")
    with pytest.raises(ConfigError, match="bad value for 'patch_size'"):
        load_config(path, PrepareConfig)


def test_valid_yaml_overrides_defaults(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("model:\n  name: vaegan\n  latent_dim: 64\ntrain:\n  batch_size: 8\n")
    cfg = load_config(path, TrainStageConfig)
    assert (cfg.model.name, cfg.model.latent_dim, cfg.train.batch_size) == ("vaegan", 64, 8)
    assert cfg.train.lr == TrainStageConfig().train.lr


def test_split_fractions_must_sum_to_one():
    with pytest.raises(ValueError):
        SplitConfig(train=0.5, val=0.2, test=0.2)
    with pytest.raises(ValueError):  # only train given: 0.5 + 0.15 + 0.15 is not 1 either
        SplitConfig(train=0.5)
    with pytest.raises(ConfigError, match="discover.yaml: bad value for 'split'.*sum to 1, got 0.8"):
        parse_config({"split": {"train": 0.5}}, DiscoverConfig, "discover.yaml")
    assert SplitConfig(train=0.8, val=0.0, test=0.2).train == 0.8


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", PrepareConfig)
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, PrepareConfig)


def test_name_lists_are_written_once_as_the_configs_literals():
    from typer.testing import CliRunner

    from medvae.cli import app
    from medvae.cli.app import choices
    from medvae.config import GenerateConfig, ModelConfigBase, UtilityConfig
    from medvae.models import CONDITIONAL_MODELS, DENOISERS, MODEL_NAMES
    from medvae.models.distributions import LIKELIHOODS

    assert MODEL_NAMES == ("vae", "vaegan", "monai-vae", "monai-kl", "unet-vae", "dae")
    assert set(CONDITIONAL_MODELS) | set(DENOISERS) < set(MODEL_NAMES) and "cbernoulli" in LIKELIHOODS
    assert choices(ModelConfigBase, "name") == " | ".join(MODEL_NAMES)
    assert choices(UtilityConfig, "condition") == "class | mask | none"  # Optional[Literal]: the names only
    assert choices(UtilityConfig, "model") == " | ".join(CONDITIONAL_MODELS)
    listings = (("train", choices(ModelConfigBase, "name")), ("generate", choices(GenerateConfig, "format")))
    for command, listed in listings:
        help_text = " ".join(CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "300"}).output.split())
        assert listed in help_text, command


def test_train_config_has_no_num_workers():
    with pytest.raises(ConfigError, match="unknown key 'train.num_workers'"):
        parse_config({"train": {"num_workers": 4}}, TrainStageConfig, "x.yaml")

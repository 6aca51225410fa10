"""Every model build_model makes implements the one model interface."""

import pytest

from medvae.config import ModelConfig
from medvae.models import MODEL_NAMES, GenerativeModel, build_model


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_implements_the_interface(name):
    model = build_model(ModelConfig(name=name, image_size=32))
    assert isinstance(model, GenerativeModel)
    assert model.config.name == name and model.latent_dim > 0

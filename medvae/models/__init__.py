"""Models behind one interface (docs/architecture.md), built by name.

Checkpoints are turned back into models by ``medvae.training.checkpoint.load_model``.
"""

from __future__ import annotations

from typing import get_args

from torch import nn

from medvae.config import ConditionalModel, DenoiserModel, ModelConfig, ModelName
from medvae.errors import ConfigError
from medvae.models.denoisers import UNetDenoiser
from medvae.models.interface import GenerativeModel, VAEOutput
from medvae.models.vae import ConvVAE, VAEBase
from medvae.models.vaegan import VAEGAN, PatchDiscriminator

__all__ = [
    "ConvVAE", "VAEGAN", "VAEBase", "VAEOutput", "GenerativeModel", "PatchDiscriminator", "build_model", "MODEL_NAMES",
    "UNetDenoiser", "DENOISERS", "CONDITIONAL_MODELS",
]

# the names, written once as the config's Literal types
MODEL_NAMES = get_args(ModelName)
DENOISERS = get_args(DenoiserModel)  # fully convolutional (medvae.models.denoisers): whole slices at any size
CONDITIONAL_MODELS = get_args(ConditionalModel)  # take a class / modality id (medvae.data.conditions)


def build_model(cfg: ModelConfig) -> nn.Module:
    """Map ``cfg.name`` (one of ``MODEL_NAMES``) to a freshly initialised model."""
    if cfg.condition in ("class", "modality") and cfg.name not in CONDITIONAL_MODELS:
        raise ConfigError(f"model {cfg.name} takes no {cfg.condition} condition; use vae or vaegan, or condition "
                          "'none' / 'mask'")
    if cfg.name == "vae":
        return ConvVAE(cfg)
    if cfg.name == "vaegan":
        return VAEGAN(cfg)
    if cfg.name in DENOISERS:
        return UNetDenoiser(cfg, variational=cfg.name == "unet-vae")
    if cfg.name in ("monai-vae", "monai-kl"):
        from medvae.models.baselines import MonaiKL, MonaiVAE  # MONAI import is slow; only when asked

        return MonaiVAE(cfg) if cfg.name == "monai-vae" else MonaiKL(cfg)
    raise ValueError(f"unknown model {cfg.name!r}; choose one of {MODEL_NAMES}")

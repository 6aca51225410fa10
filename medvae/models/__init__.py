"""The model families, one folder each (config + network): ``vae`` (:mod:`medvae.models.vae`), ``vaegan``
(:mod:`medvae.models.vaegan`), the MONAI baselines ``monai-vae`` / ``monai-kl``
(:mod:`medvae.models.baselines`) and the denoisers ``dae`` / ``unet-vae`` (:mod:`medvae.models.denoisers`),
built by name from their config.

Checkpoints are turned back into models by ``medvae.training.checkpoint.load_model``.
"""

from __future__ import annotations

from typing import get_args

from torch import nn

from medvae.config import DENOISERS, AnyModelConfig, ConditionalModel, ModelName
from medvae.errors import ConfigError
from medvae.models.denoisers import DAE, Denoiser, UNetVAE
from medvae.models.vae import ConvVAE, VAEBase, VAEOutput, VariationalModel
from medvae.models.vaegan import VAEGAN, PatchDiscriminator

__all__ = [
    "ConvVAE", "VAEGAN", "VAEBase", "VAEOutput", "VariationalModel", "Denoiser", "PatchDiscriminator", "DAE",
    "UNetVAE", "build_model", "require_latent", "MODEL_NAMES", "DENOISERS", "CONDITIONAL_MODELS",
]

# the names, written once as the config's Literal types
MODEL_NAMES = get_args(ModelName)
CONDITIONAL_MODELS = get_args(ConditionalModel)  # take a class / modality id (medvae.data.conditions)


def build_model(cfg: AnyModelConfig) -> nn.Module:
    """Map ``cfg.name`` (one of ``MODEL_NAMES``) to a freshly initialised model of its family."""
    if cfg.condition in ("class", "modality") and cfg.name not in CONDITIONAL_MODELS:
        raise ConfigError(f"model {cfg.name} takes no {cfg.condition} condition; use vae or vaegan, or condition "
                          "'none' / 'mask'")
    if cfg.name == "vae":
        return ConvVAE(cfg)
    if cfg.name == "vaegan":
        return VAEGAN(cfg)
    if cfg.name == "dae":
        return DAE(cfg)
    if cfg.name == "unet-vae":
        return UNetVAE(cfg)
    if cfg.name in ("monai-vae", "monai-kl"):
        from medvae.models.baselines.networks import MonaiKL, MonaiVAE  # MONAI import is slow; only when asked

        return MonaiVAE(cfg) if cfg.name == "monai-vae" else MonaiKL(cfg)
    raise ValueError(f"unknown model {cfg.name!r}; choose one of {MODEL_NAMES}")


def require_latent(model: nn.Module) -> None:
    """ConfigError unless ``model`` has a latent to encode to, decode and sample from (the dae has none)."""
    if isinstance(model, DAE):
        raise ConfigError("the dae model is deterministic: it has no latent to decode or sample from; "
                          "train a vae, vaegan or unet-vae")

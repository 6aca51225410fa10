"""Models behind one interface (see ARCHITECTURE.md): build by name, load from a checkpoint."""

from __future__ import annotations

import os

from pydantic import ValidationError
from torch import nn

from medvae.config import ModelConfig
from medvae.errors import CheckpointError
from medvae.models.vae import ConvVAE, VAEBase, VAEOutput
from medvae.models.vaegan import VAEGAN, PatchDiscriminator

__all__ = [
    "ConvVAE", "VAEGAN", "VAEBase", "VAEOutput", "PatchDiscriminator", "build_model", "load_model",
    "MODEL_NAMES",
]

MODEL_NAMES = ("vae", "vaegan", "monai-vae", "monai-kl")

# Entries that are not metadata: weights and trainer states.
_BIG_KEYS = ("model_state", "ema_state", "optimizer_states", "scaler_state", "scheduler_states", "rng")


def build_model(cfg: ModelConfig) -> nn.Module:
    """Map ``cfg.name`` (vae | vaegan | monai-vae | monai-kl) to a freshly initialised model."""
    if cfg.name == "vae":
        return ConvVAE(cfg)
    if cfg.name == "vaegan":
        return VAEGAN(cfg)
    if cfg.name in ("monai-vae", "monai-kl"):
        from medvae.models.baselines import MonaiKL, MonaiVAE  # MONAI import is slow; only when asked

        return MonaiVAE(cfg) if cfg.name == "monai-vae" else MonaiKL(cfg)
    raise ValueError(f"unknown model {cfg.name!r}; choose one of {MODEL_NAMES}")


def _clean_state(state: dict) -> dict:
    """Strip wrapper prefixes (DDP ``module.``, torch.compile ``_orig_mod.``) and EMA counters."""
    out = {}
    for k, v in state.items():
        if k == "n_averaged":
            continue
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_model(path: str | os.PathLike, device="cpu", ema: bool = True) -> tuple[nn.Module, dict]:
    """Rebuild a model from a checkpoint's own ``model_config`` and load its weights.

    Args:
        path: a checkpoint file written by ``medvae.engine.checkpoint.save_checkpoint``.
        device: where to put the model.
        ema: load ``ema_state`` when the checkpoint has one (else ``model_state``).

    Returns:
        ``(model in eval mode, metadata)``: metadata is the checkpoint dict without weights,
        optimizer/scaler/scheduler states and RNG states.
    """
    from medvae.engine.checkpoint import load_checkpoint  # the engine imports models; avoid a cycle

    ckpt = load_checkpoint(path, map_location="cpu")
    try:
        cfg = ModelConfig.model_validate(ckpt["model_config"])
    except (KeyError, ValidationError) as err:
        raise CheckpointError(f"{path}: no usable model_config in checkpoint ({err}); re-train or re-save it") \
            from None
    model = build_model(cfg)
    state = _clean_state(ckpt.get("model_state") or {})
    if ema and ckpt.get("ema_state"):
        # EMA may cover only part of the model (e.g. not the discriminator): overlay it.
        state.update(_clean_state(ckpt["ema_state"]))
    if not state:
        raise CheckpointError(f"{path}: checkpoint holds no model_state; it cannot be loaded as a model")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match its model_config ({first})") from None
    model.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k not in _BIG_KEYS}
    return model, meta

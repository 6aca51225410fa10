"""Runtime setup of a training process: mixed precision (and the one autocast helper training and
``medvae denoise`` use), seeding, torch.compile."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``cfg.amp`` on ``device`` (None = full precision).

    ``auto``: bf16 on CUDA where supported, else fp16 (with a GradScaler); off on CPU and MPS. On a
    CPU with AMX, bf16 is about 2× float32's images/s for the ConvVAE (README "Speed"), but it changes
    every result, so it is opt-in there. ``bf16`` / ``fp16`` force it.
    """
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` on ``device`` with ``dtype``, or a no-op for None (full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's global RNG and python ``random``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


_COMPILED = ("encoder", "decoder", "encode", "decode")


def compile_model(model: torch.nn.Module) -> None:
    """``torch.compile`` the model's networks in place (attributes and state_dict keys unchanged).

    The heavy submodules named encoder / decoder (MONAI: encode / decode) are compiled, not the whole
    ``forward``: the decoder's last conv stays eager, because the VAE–GAN's adaptive weight differentiates
    through it twice (``retain_graph``; its critic: :class:`medvae.training.adversarial.AdversarialStep`).
    Compile before wrapping in DistributedDataParallel.
    """
    names = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in _COMPILED]
    names = [n for n in names if not any(n.startswith(o + ".") for o in names)]  # outermost only
    for n in names:
        model.get_submodule(n).compile()
    if not names:
        model.compile()

"""Runtime setup of a training process: mixed precision, seeding, torch.compile."""

from __future__ import annotations

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


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's global RNG and python ``random``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


_COMPILED = ("encoder", "decoder", "encode", "decode", "discriminator")


def compile_model(model: torch.nn.Module, discriminator: bool = True) -> None:
    """``torch.compile`` the model's networks in place (attributes and state_dict keys unchanged).

    The heavy submodules named encoder / decoder / discriminator (MONAI: encode / decode) are
    compiled, not the whole ``forward``: the decoder's last conv stays eager, because the adaptive
    GAN weight differentiates through it twice (``retain_graph``). Compile before wrapping in
    DistributedDataParallel. ``discriminator=False`` leaves the critic eager: R1 needs a double
    backward, which compiled graphs do not support.
    """
    if getattr(model, "discriminator", None) is not None:
        # The adaptive GAN weight runs autograd.grad(..., retain_graph=True) through the compiled decoder;
        # AOTAutograd's donated buffers forbid a retained backward (RuntimeError at the first critic step).
        import torch._functorch.config

        torch._functorch.config.donated_buffer = False
    names = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in _COMPILED]
    names = [n for n in names if not any(n.startswith(o + ".") for o in names)]  # outermost only
    if not discriminator:
        names = [n for n in names if not n.endswith("discriminator")]
    for n in names:
        model.get_submodule(n).compile()
    if not names:
        model.compile()

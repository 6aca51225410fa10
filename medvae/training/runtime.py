"""Runtime setup of a training process: mixed precision (the capability probe, and the autocast
helpers training, generation and ``medvae denoise`` use), seeding, torch.compile."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` has native bf16 arithmetic, where bf16 autocast is faster than float32.

    CUDA: ``torch.cuda.is_bf16_supported()`` (Ampere and newer). CPU: AMX tiles or AVX-512 BF16 (on
    an AVX2-only CPU bf16 runs, emulated, slower than float32). MPS and anything else: False.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return False


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for an ``amp`` setting on ``device`` (None = full precision).

    ``auto``: bf16 where the device has it (:func:`bf16_supported`), else fp16 on CUDA (training adds
    a GradScaler), else full precision. bf16 is about 2x float32's images/s on a CPU with AMX and its
    validation ELBO / SSIM stay within float32's seed-to-seed interval (tests/training/test_amp.py).
    ``bf16`` / ``fp16`` force it, ``off`` is float32.
    """
    if amp == "off":
        return None
    if amp == "auto":
        if bf16_supported(device):
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else None
    return torch.bfloat16 if amp == "bf16" else torch.float16


def precision_name(dtype: torch.dtype | None) -> str:
    """``bf16`` | ``fp16`` | ``fp32``: what run.json, generation.json and the logs call an autocast dtype."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` on ``device`` with ``dtype``, or a no-op for None (full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def full_precision(device: torch.device):
    """Autocast off on ``device`` inside an autocast region: for metrics and noise made in float32
    (likelihoods, distances, SSIM's window matmuls, the CT projector's sparse matmul)."""
    return torch.autocast(device.type, enabled=False)


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

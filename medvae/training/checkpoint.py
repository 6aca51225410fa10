"""Checkpoints: atomic save, safe load (tensors and primitives only), exact-resume RNG states.

A checkpoint is a dict (docs/architecture.md, "Checkpoint"):

    format_version    int (FORMAT_VERSION)
    model_config      dict, the family config's model_dump(mode="json") -> the model rebuilds from it
    train_config      dict, TrainStageConfig.train as JSON
    model_state       state_dict of the model (discriminator included for the VAE-GAN)
    ema_state         optional state_dict of the EMA generator weights
    optimizer_states  {name: optimizer.state_dict()}
    scaler_state      GradScaler.state_dict() or {}
    scheduler_states  {name: scheduler.state_dict()}
    step, epoch       ints: optimizer steps done, epochs started
    rng               rng_state(): torch / CUDA / numpy / python states as tensors and ints
    data_state        PatchBatches.state_dict()
    store_hash        content hash of the patch store trained on
    metrics           {name: float}

Everything in it loads with ``torch.load(weights_only=True)``, so opening a checkpoint never
runs code from the file; a file that needs more than that is refused. Where a run keeps its
checkpoints (and which one ``best`` means) is :class:`medvae.training.rundir.RunDir`'s business.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medvae.config import parse_model_config
from medvae.errors import CheckpointError, ConfigError
from medvae.files import atomic_open, atomic_path
from medvae.models import build_model

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model_config", "model_state")


def save_checkpoint(path: str | os.PathLike, ckpt: dict) -> Path:
    """Write ``ckpt`` to ``path`` atomically (temp file in the same directory + rename).

    Args:
        path: destination ``.pt`` file; parent directories are created.
        ckpt: the checkpoint dict (tensors and primitives only; ``format_version`` is filled in
            when missing).

    Returns:
        The path written.
    """
    path = Path(path)
    ckpt = dict(ckpt)
    ckpt.setdefault("format_version", FORMAT_VERSION)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: the file is missing, truncated/corrupt, holds anything but tensors and
            primitive types (e.g. a pickled object: a tampered file), lacks the checkpoint keys,
            or has a newer format version than this medvae reads.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; check the path or the run directory")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - anything torch.load raises is a problem of the file
        msg = str(err)
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
        if unsafe:
            raise CheckpointError(
                f"{path}: refused: the file holds a pickled object ({unsafe.group(1)}), not only tensors and "
                "primitive types; it was tampered with or is not a medvae checkpoint. Do not load it with "
                "weights_only=False unless you trust its origin"
            ) from None
        detail = msg.splitlines()[0] if msg else ""
        if not detail or detail.startswith("Weights only load failed"):
            detail = "unreadable data"
        raise CheckpointError(
            f"{path}: corrupt or truncated checkpoint ({type(err).__name__}: {detail}); "
            "use another checkpoint of the run (last.pt, best.pt or a step_*.pt)"
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a medvae checkpoint (holds a {type(ckpt).__name__}, not a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a medvae checkpoint (missing {', '.join(missing)})")
    version = ckpt["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is not supported by this medvae "
            f"(reads version {FORMAT_VERSION}); upgrade medvae or retrain"
        )
    return ckpt


def truncate_log(log_path: str | os.PathLike, step: int) -> None:
    """Keep the JSONL log entries of steps <= ``step`` (those after a resumed checkpoint are replayed).

    A last line cut short by a kill is dropped. Rewritten atomically.
    """
    log_path = Path(log_path)
    if not log_path.exists():
        return
    keep = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
            if json.loads(line)["step"] <= step:
                keep.append(line + "\n")
    with atomic_open(log_path, "w", encoding="utf-8") as f:
        f.writelines(keep)


# --------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """All random-number-generator states as tensors and ints (weights_only-loadable).

    torch CPU (ByteTensor), CUDA (one ByteTensor per device, if CUDA is initialized), numpy's
    global MT19937 (key as int64 tensor + position + cached Gaussian) and python ``random``'s.
    """
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_name),
            "key": torch.from_numpy(np.asarray(np_key, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss if py_gauss is None else float(py_gauss),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    npst = state["numpy"]
    np.random.set_state(
        (npst["name"], npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
         npst["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            log.warning("checkpoint has CUDA RNG states for %d devices, this machine has %d; not restored",
                        len(cuda_states), torch.cuda.device_count())


# Entries that are not metadata: weights and trainer states.
_BIG_KEYS = ("model_state", "ema_state", "optimizer_states", "scaler_state", "scheduler_states", "rng")


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
        path: a checkpoint file written by ``medvae.training.checkpoint.save_checkpoint``.
        device: where to put the model.
        ema: load ``ema_state`` when the checkpoint has one (else ``model_state``).

    Returns:
        ``(model in eval mode, metadata)``: metadata is the checkpoint dict without weights,
        optimizer/scaler/scheduler states and RNG states.
    """
    ckpt = load_checkpoint(path, map_location="cpu")
    try:
        cfg = parse_model_config(ckpt["model_config"], f"{path}: model_config")
    except (KeyError, ConfigError) as err:
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

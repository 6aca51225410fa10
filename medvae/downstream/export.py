"""The arms' trained networks as TorchScript files, and ``--export-model``: the study's winner for the user.

Each arm's network is traced (``torch.jit.trace`` on two test images, in eval mode) and saved atomically
next to its result, ``cells/<budget>_s<seed>/<arm>.pt`` (:meth:`medvae.downstream.studydir.CellDir.network`),
so any arm — whatever its architecture (a MONAI classifier, a generator's encoder with a head, an M2
classifier) — is reloaded with ``torch.jit.load`` alone, without the code that built it.

``export_model`` writes the verdict's winner (:mod:`medvae.downstream.verdict`): the best arm at the
largest label budget — the most labels the user has — of seed 0, the cell that ``medvae utility ...
--seeds 1`` trains again, as ``DIR/model.ts`` (TorchScript with MONAI's metadata,
``monai.data.save_net_with_metadata``) and ``DIR/model.json`` (the same metadata): the class names, the
input (channels, size, the store's normalization to [0, 1]), the arm, budget, seed and its test scores.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from medvae.data.store import PatchStore
from medvae.downstream.studydir import StudyDir
from medvae.errors import InputError
from medvae.files import atomic_path, write_json


def save_network(path: Path, net: torch.nn.Module, example: torch.Tensor) -> None:
    """Trace ``net`` on ``example`` ``(B, C, H, W)`` (moved to the net's device) and save it atomically."""
    device = next(net.parameters()).device
    with _quiet(), torch.no_grad(), atomic_path(path) as tmp:
        torch.jit.save(torch.jit.trace(net.eval(), example.to(device)), str(tmp))


def load_network(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """A saved (or exported) network, in eval mode on ``device``."""
    with _quiet():
        return torch.jit.load(str(path), map_location=device).eval()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """TorchScript without its warnings: shape checks traced as constants (the input size is fixed), and
    torch's deprecation of torch.jit (TorchScript is still what MONAI bundles and torch.jit.load read)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "`torch.jit", DeprecationWarning)
        yield


def export_model(study: StudyDir, store: PatchStore, dest: str | os.PathLike) -> Path:
    """Write the verdict's winner (best arm at the largest budget, seed 0) to ``dest/model.ts`` + ``model.json``.

    Args:
        study: a finished study (its utility.json holds the verdict).
        store: the study's real store (class names, normalization).
        dest: the directory to write.

    Returns:
        The path of ``model.ts``.

    Raises:
        InputError: the study has no verdict, or the winner's network was not saved (a study made before
            networks were saved: its arm is re-run once its result is removed).
    """
    summary = study.summary()
    budgets = (summary.get("verdict") or {}).get("budgets") or []
    if not budgets:
        raise InputError(f"{study.path}: no verdict in utility.json; re-run `medvae utility` into it first")
    win = budgets[-1]  # budgets run smallest first
    cell = study.cell(win["budget"], 0)
    source = cell.network(win["arm"])
    if not source.is_file():
        raise InputError(f"{source}: not saved (the study predates saved networks); remove "
                         f"{cell.result(win['arm'])} and re-run the same `medvae utility` command to retrain "
                         f"arm {win['arm']} (same seed, same scores) and export it")
    result = json.loads(cell.result(win["arm"]).read_text(encoding="utf-8"))
    net = load_network(source)
    channels, size = int(store.meta["channels"]), int(store.meta["patch_size"])
    modality = store.modalities[0]
    task = summary["task"]
    meta = {"task": task, "arm": win["arm"], "budget": win["budget"], "labels_per_class": win["labels_per_class"],
            "fraction": win["fraction"], "seed": 0, "test_metrics": result["metrics"], "n_test": summary["n_test"],
            "class_names": list(store.classes) if task == "classify" else None,
            "input": {"shape": [channels, size, size], "dtype": "float32", "range": [0.0, 1.0],
                      "modality": modality, "normalization": store.normalization(modality),
                      "note": "x01 = (value - low) / (high - low), clipped to [0, 1], as the store's patches"},
            "output": "logits (N, classes)" if task == "classify" else "logits (N, labels + background, H, W)",
            "store": str(store.path), "store_hash": store.content_hash, "study": str(study.path)}
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    from monai.data import save_net_with_metadata  # MONAI is slow to import

    path = dest / "model.ts"
    with _quiet(), atomic_path(path) as tmp:
        save_net_with_metadata(net, str(tmp), include_config_vals=True, meta_values=meta)
    write_json(dest / "model.json", meta)
    return path

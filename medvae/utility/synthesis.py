"""The synthetic set of a utility cell: a conditional generator trained on the cell's real subset
only, and a labelled sample of it written as a patch store.

Isolation: the generator's training store is the subset store of :mod:`medvae.utility.subsets`
and nothing else (no val split either: its masks or classes would be held-out labels choosing the
checkpoint), so a low-data arm never sees labels beyond its fraction through the generator.
Without a val split the trainer keeps ``last.pt`` only, which is what is sampled.

A synthetic store is an ordinary patch store: patient ``synthetic``, split ``train``, source
``synthetic``, a ``class`` per patch (classify) or a label map per patch in ``labels.npy``
(segment). ``medvae utility --synthetic STORE`` reads the same format (:func:`synthetic_rows`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from medvae.config import TrainStageConfig, UtilityConfig, parse_config
from medvae.data.conditions import split_joint
from medvae.data.store import PatchStore, write_derived_store
from medvae.errors import InputError
from medvae.files import sha256_file
from medvae.synthesis.prior import prior_for
from medvae.synthesis.sampling import balanced_conditions, sample_images
from medvae.training.checkpoint import load_model
from medvae.training.rundir import RunDir
from medvae.training.trainer import train

log = logging.getLogger(__name__)


def generator_config(cfg: UtilityConfig, n_rows: int, seed: int) -> TrainStageConfig:
    """``cfg.generator`` with the study's model, condition, step budget and seed; the batch is capped at
    the subset's size (a 5 % subset may hold fewer patches than a batch)."""
    data = cfg.generator.model_dump(mode="json")
    data["model"].update(name=cfg.model, condition=cfg.generator_condition)
    data["train"].update(max_steps=cfg.generator_steps, seed=seed,
                         batch_size=min(data["train"]["batch_size"], n_rows))
    return parse_config(data, TrainStageConfig, "utility generator settings")


def train_generator(subset: PatchStore, run: str | os.PathLike, cfg: UtilityConfig, seed: int,
                    device: str = "auto") -> Path:
    """Train (or finish, from ``last.pt``) the generator of a cell on ``subset``; its ``last.pt``."""
    run_dir = RunDir(run)
    if not run_dir.done:
        train(subset, run, generator_config(cfg, len(subset), seed), device=device, resume=True)
    return run_dir.checkpoint("last")


def write_synthetic_store(path: str | os.PathLike, images: np.ndarray, real: PatchStore, info: dict,
                          classes: list[str] | None = None, masks: np.ndarray | None = None) -> PatchStore:
    """A patch store of synthetic ``images (N, C, H, W)`` in [0, 1] with a class name per image or
    label maps ``masks (N, 1, H, W)`` uint8, derived from ``real`` (its normalization, spacing, classes)
    with none of its rows; ``slice_index`` is the sample's index."""
    columns = {"modality": real.modalities[0], "slice_index": np.arange(len(images)), "y": 0, "x": 0}
    if classes is not None:
        columns["class"] = classes
    return write_derived_store(path, real, rows=[], added=images, added_columns=columns, added_labels=masks,
                               meta={"synthetic": info})


def _prior(checkpoint, model, subset: PatchStore, cfg: UtilityConfig, seed: int):
    """The cell's mixture prior (a class with a single patch in the subset samples N(0, I)), or None
    (N(0, I)) when asked for."""
    return None if cfg.prior == "standard" else prior_for(checkpoint, model, subset, cfg.prior_components, seed)


@torch.no_grad()
def synthesize(checkpoint: str | os.PathLike, subset: PatchStore, cfg: UtilityConfig, n: int, seed: int,
               out: str | os.PathLike, device: str = "cpu") -> PatchStore:
    """Sample ``n`` labelled images from a cell's generator into the synthetic store ``out``.

    Classify: the conditions are balanced over the classes the model was trained with. Segment: the
    joint image + mask model's last channel is split back into a label map, scaled by the label names
    the model was trained with (those of its subset store, so its scale whatever labels the subset lacks).
    """
    model, meta = load_model(checkpoint, device=device)
    prior = _prior(checkpoint, model, subset, cfg, seed)
    names = list(meta["model_config"].get("condition_names") or subset.classes)
    conditions = balanced_conditions(n, len(names)) if cfg.generator_condition == "class" else None
    x = sample_images(model, n, seed=seed, prior=prior, conditions=conditions, temperature=cfg.temperature)
    info = {"checkpoint_sha256": sha256_file(checkpoint), "seed": seed, "n": n,
            "prior": "standard" if prior is None else "gmm",
            "temperature": cfg.temperature}
    if cfg.generator_condition == "class":
        return write_synthetic_store(out, x.numpy(), subset, info, classes=[names[i] for i in conditions.tolist()])
    images, masks = split_joint(x.numpy(), tuple(names))
    return write_synthetic_store(out, images, subset, info, masks=masks)


def synthetic_rows(store: PatchStore, real: PatchStore) -> np.ndarray:
    """The synthetic rows of a store given with ``--synthetic``: those with source ``synthetic`` (an
    augmented store), else every row; the patch shape must be the real store's."""
    if store.patches.shape[1:] != real.patches.shape[1:]:
        raise InputError(f"{store.path}: patches of shape {tuple(store.patches.shape[1:])}, the real store's are "
                         f"{tuple(real.patches.shape[1:])}; generate the synthetic set from a model of this store")
    marked = np.flatnonzero(store.index["source"] == "synthetic")
    return marked if len(marked) else np.arange(len(store), dtype=np.int64)

"""The synthetic set of a utility cell: a generator, labelled candidates, the filter, the store.

**Which images a generator learns from, and which labels it sees.** With ``unlabelled: all``
(classification) one unconditional generator learns from every image of the real train split
written without a single label (:func:`unlabelled_store`: no class column, no label maps), so no
label outside a cell's budget can reach it; one generator then serves every cell. Otherwise each
cell's generator trains on that cell's labelled subset store only (no val split either: its masks
or classes would be held-out labels choosing the checkpoint), and ``last.pt`` is sampled.

**Candidates** (:class:`Candidates`): anchored variants of the labelled images
(:mod:`medvae.synthesis.anchored`; each keeps its anchor's class, or a joint model decodes its
own mask) or prior samples (a class-conditional generator's, balanced over classes; an unconditional
one's labelled by the real arm's network).

**Filter** (classification): a candidate is kept when the real arm's network — trained on the same
labelled subset, so nothing leaks — gives its label probability ``>= filter_threshold``; and, with
``drop_flagged``, when the memorization audit does not flag it as a near-copy of a training image.
Label fidelity (that network's accuracy on all candidates) and the kept fraction are recorded.

A synthetic store is an ordinary patch store: patient ``synthetic``, split ``train``, source
``synthetic``, a ``class`` per patch (classify) or a label map per patch in ``labels.npy``
(segment), and ``source_row`` (the anchor's row in the real store, -1 for prior samples).
``medvae utility --synthetic STORE`` reads the same format (:func:`synthetic_rows`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medvae.config import TrainStageConfig, UtilityConfig, parse_config
from medvae.data.conditions import model_inputs, split_joint
from medvae.data.store import PatchStore, open_store, store_complete, write_derived_store, write_store
from medvae.downstream.networks import probabilities
from medvae.downstream.subsets import SOURCE_ROW
from medvae.errors import InputError
from medvae.synthesis import anchored, audit
from medvae.synthesis.prior import prior_for
from medvae.synthesis.sampling import balanced_conditions, decode_latents, sample_images
from medvae.training.checkpoint import load_model
from medvae.training.rundir import RunDir
from medvae.training.trainer import train

log = logging.getLogger(__name__)


def generator_config(cfg: UtilityConfig, n_rows: int, seed: int) -> TrainStageConfig:
    """``cfg.generator`` with the study's model, condition, step budget and seed; the batch is capped at
    the training store's size (a 5 % subset may hold fewer patches than a batch)."""
    data = cfg.generator.model_dump(mode="json")
    data["model"].update(name=cfg.model, condition=cfg.generator_condition)
    data["train"].update(max_steps=cfg.generator_steps, seed=seed,
                         batch_size=min(data["train"]["batch_size"], n_rows))
    return parse_config(data, TrainStageConfig, "utility generator settings")


def train_generator(store: PatchStore, run: str | os.PathLike, cfg: UtilityConfig, seed: int,
                    device: str = "auto") -> Path:
    """Train (or finish, from ``last.pt``) a generator on ``store``; its ``last.pt``."""
    run_dir = RunDir(run)
    if not run_dir.done:
        train(store, run, generator_config(cfg, len(store), seed), device=device, resume=True)
    return run_dir.checkpoint("last")


def given_generator(run: str | os.PathLike, store: PatchStore) -> Path:
    """The checkpoint of a user's run to serve as the unlabelled generator: trained on ``store`` (same
    content hash) without conditions, so it has seen the train images and no label; its ``best`` (or
    ``last``) checkpoint."""
    run_dir = RunDir(run)
    info = run_dir.info()
    if info.get("store_hash") != store.content_hash:
        raise InputError(f"{run}: not a run trained on {store.path} (its run.json names {info.get('store')}); "
                         "give a `medvae train` run of this store as generator_run")
    cfg = run_dir.config()
    if cfg.task != "reconstruct" or cfg.model.condition != "none" or cfg.model.name not in ("vae", "vaegan"):
        raise InputError(f"{run}: a {cfg.model.name} with condition {cfg.model.condition}; the unlabelled generator "
                         "must be an unconditional vae or vaegan (it may see no label)")
    return run_dir.checkpoint("best")


def unlabelled_store(store: PatchStore, path: str | os.PathLike) -> PatchStore:
    """The images of ``store``'s train split without their labels: no ``class`` column, no class list,
    no label maps; ``source_row`` maps each patch back to its row (reused once complete)."""
    if store_complete(path):
        return open_store(path)
    rows = store.select("train")
    keep = ("patient_id", "modality", "split", "slice_index", "y", "x", "foreground_fraction", "source")
    index = {k: np.asarray(store.index[k])[rows] for k in keep}
    index[SOURCE_ROW] = rows
    # not write_derived_store: that one keeps the source's classes and label maps, which this store must not hold
    meta = {k: store.meta[k] for k in ("normalization", "spacing") if k in store.meta}
    meta.update(dtype=store.meta.get("dtype", "float16"), unlabelled_of=str(store.path))
    return write_store(path, store.get(rows), index, meta)


@dataclass
class Candidates:
    """Labelled synthetic images before the filter.

    images: (N, C, H, W) float32 in [0, 1]; classes: (N,) int64 ids into the real store's classes
    (classify) or None; masks: (N, 1, H, W) uint8 label maps (segment) or None; source_rows: (N,)
    the anchor's row in the real store (-1: a prior sample).
    """

    images: np.ndarray
    classes: np.ndarray | None
    masks: np.ndarray | None
    source_rows: np.ndarray

    def take(self, keep: np.ndarray) -> Candidates:
        return Candidates(self.images[keep], None if self.classes is None else self.classes[keep],
                          None if self.masks is None else self.masks[keep], self.source_rows[keep])


def _decode(model, z: np.ndarray, batch_size: int = 512) -> np.ndarray:
    device = next(model.parameters()).device
    return np.concatenate([decode_latents(model, torch.from_numpy(z[i:i + batch_size]).to(device)).cpu().numpy()
                           for i in range(0, len(z), batch_size)]) if len(z) else np.zeros((0,))


def _pool_codes(model, checkpoint: Path, pool: PatchStore) -> tuple[np.ndarray, np.ndarray]:
    """Posterior means of every pool image and their real-store rows, cached in the checkpoint's run
    (:meth:`~medvae.training.rundir.RunDir.pool_codes_path`)."""
    cache = RunDir(checkpoint).pool_codes_path(checkpoint)
    if cache.is_file():
        d = np.load(cache)
        return d["mu"], d["rows"]
    rows = np.arange(len(pool))
    mu = np.concatenate([anchored.encode(model, model_inputs(pool, rows[i:i + 4096], model.config)[0])[0]
                         for i in range(0, len(rows), 4096)])
    source = np.asarray(pool.index[SOURCE_ROW], dtype=np.int64)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, mu=mu, rows=source)
    os.replace(tmp, cache)
    return mu, source


def anchored_candidates(checkpoint: str | os.PathLike, subset: PatchStore, pool: PatchStore | None,
                        cfg: UtilityConfig, seed: int) -> Candidates:
    """``cfg.per_image`` variants of every labelled image of ``subset`` (:mod:`medvae.synthesis.anchored`).

    ``neighbours`` come from ``pool`` (every train image, without labels) when given, else from the
    subset's images of the anchor's class (classify) or all of them (segment); ``interpolate`` always
    moves between same-class labelled images.
    """
    checkpoint = Path(checkpoint)
    model, _ = load_model(checkpoint)
    anchor_rows = np.asarray(subset.index[SOURCE_ROW], dtype=np.int64)
    codes, exclude = None, None
    if cfg.synthesis == "neighbours" and pool is not None:
        codes, pool_rows = _pool_codes(model, checkpoint, pool)
        where = {r: i for i, r in enumerate(pool_rows.tolist())}
        exclude = np.asarray([where.get(r, -1) for r in anchor_rows.tolist()])
    # without the unlabelled pool a classification anchor's neighbours are labelled images of its class
    same_class = cfg.synthesis == "interpolate" or cfg.task == "classify"
    anchors = anchored.Anchors.of(model, subset, np.arange(len(subset)), cfg.per_image, codes, exclude, same_class)
    z, _ = anchors.latents(0, len(anchors), cfg.synthesis, seed, tuple(cfg.neighbour_range), cfg.posterior_temperature)
    decoded = _decode(model, z.numpy())
    source = anchor_rows[np.arange(len(anchors)) // cfg.per_image]
    if cfg.task == "classify":
        return Candidates(decoded, subset.class_ids(np.arange(len(subset)))[np.arange(len(anchors)) // cfg.per_image],
                          None, source)
    images, masks = split_joint(decoded, tuple(model.config.condition_names))
    return Candidates(images, None, masks, source)


def prior_candidates(checkpoint: str | os.PathLike, subset: PatchStore, pool: PatchStore | None,
                     cfg: UtilityConfig, seed: int, teacher: torch.nn.Module | None) -> Candidates:
    """``ratio × |subset|`` prior samples: a class model's balanced over its classes, a joint model's with
    their decoded masks, an unconditional model's labelled by ``teacher``'s argmax."""
    model, meta = load_model(checkpoint)
    n = max(1, round(cfg.ratio * len(subset)))
    fit_on = pool if pool is not None else subset
    prior = prior_for(checkpoint, model, fit_on, cfg.prior_components, seed, kind=cfg.prior, diffusion=cfg.diffusion)
    kind = model.config.condition
    names = list(model.config.condition_names) if kind == "class" else subset.classes
    conditions = balanced_conditions(n, len(names)) if kind == "class" else None
    x = sample_images(model, n, seed=seed, prior=prior, conditions=conditions, temperature=cfg.temperature).numpy()
    source = np.full(n, -1, dtype=np.int64)
    if kind == "mask":
        images, masks = split_joint(x, tuple(model.config.condition_names))
        return Candidates(images, None, masks, source)
    if kind == "class":  # ids of the model's names -> ids of the real store's classes
        lut = np.asarray([subset.classes.index(c) for c in names])
        return Candidates(x, lut[conditions.numpy()], None, source)
    if teacher is None:
        raise InputError("prior samples of an unconditional generator need the real arm's network to label them")
    return Candidates(x, probabilities(teacher, torch.from_numpy(x)).argmax(1).numpy(), None, source)


def filter_candidates(cands: Candidates, cfg: UtilityConfig, teacher: torch.nn.Module | None,
                      reference: audit.TrainReference | None) -> tuple[Candidates, dict]:
    """The kept candidates and what the filter did: ``candidates``, ``kept``, ``fidelity`` (the teacher's
    accuracy on every candidate's label), ``below_threshold``, ``flagged``."""
    n = len(cands.images)
    keep = np.ones(n, dtype=bool)
    info: dict = {"candidates": n}
    if cands.classes is not None and teacher is not None:
        p = probabilities(teacher, torch.from_numpy(cands.images)).numpy()
        mine = p[np.arange(n), cands.classes]
        info["fidelity"] = float(np.mean(p.argmax(1) == cands.classes)) if n else None
        low = mine < cfg.filter_threshold
        info["below_threshold"] = int(low.sum())
        keep &= ~low
    if cfg.drop_flagged and reference is not None and n:
        device = reference.feats["pixel"].device
        flagged = np.concatenate([audit.audit_batch(reference, audit.features(
            torch.from_numpy(cands.images[i:i + 512]).to(device)))["flagged"] for i in range(0, n, 512)])
        info["flagged"] = int(flagged.sum())
        keep &= ~flagged
    info["kept"] = int(keep.sum())
    if n and not keep.any():  # the +synthetic arms then train on the real images alone; never on rejects
        log.warning("the filter kept none of %d synthetic candidates (%d flagged by the audit, %s below the "
                    "confidence threshold): the +synthetic arms get no synthetic image", n, info.get("flagged", 0),
                    info.get("below_threshold", 0))
    return cands.take(keep), info


def write_synthetic_store(path: str | os.PathLike, cands: Candidates, real: PatchStore, info: dict) -> PatchStore:
    """A patch store of the candidates with their labels, derived from ``real`` (its normalization, spacing,
    classes) with none of its rows; ``source_row`` is each candidate's anchor row."""
    columns = {"modality": real.modalities[0], "slice_index": np.arange(len(cands.images)), "y": 0, "x": 0,
               SOURCE_ROW: cands.source_rows}
    if cands.classes is not None:
        columns["class"] = [real.classes[i] for i in cands.classes.tolist()]
    return write_derived_store(path, real, rows=[], added=cands.images, added_columns=columns,
                               added_labels=cands.masks, meta={"synthetic": info})


def synthetic_rows(store: PatchStore, real: PatchStore) -> np.ndarray:
    """The synthetic rows of a store given with ``--synthetic``: those with source ``synthetic`` (an
    augmented store), else every row; the patch shape must be the real store's."""
    if store.patches.shape[1:] != real.patches.shape[1:]:
        raise InputError(f"{store.path}: patches of shape {tuple(store.patches.shape[1:])}, the real store's are "
                         f"{tuple(real.patches.shape[1:])}; generate the synthetic set from a model of this store")
    marked = np.flatnonzero(store.index["source"] == "synthetic")
    return marked if len(marked) else np.arange(len(store), dtype=np.int64)

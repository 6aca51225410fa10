"""Sample quality of one model per modality and prior: FID, KID, precision/recall, density/coverage.

Real held-out patches and model samples are embedded with the store's own feature network
(:mod:`medvae.evaluation.features`, shared by every model evaluated on the store) and compared with
:func:`medvae.metrics.samples.sample_metrics`, for samples from N(0, I) (``standard``), from the
Gaussian mixture fitted on the training codes (``gmm``, :mod:`medvae.synthesis.prior`) and, when asked, from a
latent diffusion model of them (``diffusion``, :mod:`medvae.synthesis.diffusion`). The same
metrics between two halves of the real patches (``real``) are the floor a perfect model reaches
with that many samples.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from medvae.config import EvaluateConfig
from medvae.data.conditions import condition_counts
from medvae.data.store import PatchStore
from medvae.evaluation.features import classifier_names, embed, feature_net
from medvae.metrics.samples import sample_metrics
from medvae.synthesis.prior import prior_for
from medvae.synthesis.sampling import sample_conditions, sample_images

log = logging.getLogger(__name__)
MIN_PER_HALF = 8  # density / coverage use 5-NN balls


def sampling_priors(checkpoint, model, store: PatchStore, cfg: EvaluateConfig, seed: int = 0) -> dict:
    """Prior name -> prior: ``standard`` (None: N(0, I)) and each of ``cfg.priors`` that applies (a learned prior
    needs a train split to fit on, a diffusion prior a spatial latent: the others are left out with a warning)."""
    priors = {"standard": None}
    for kind in cfg.priors:
        if store.select(split="train").size < 2:
            log.warning("%s has no train split to fit the %s prior on: it is left out", store.path, kind)
        elif kind == "diffusion" and getattr(model, "latent_shape", None) is None:
            log.warning("%s: a vector latent has no diffusion prior (model.latent: spatial has): it is left out",
                        checkpoint)
        else:
            priors[kind] = prior_for(checkpoint, model, store, cfg.prior_components, seed, kind=kind,
                                     diffusion=cfg.diffusion)
    return priors


@torch.no_grad()
def prior_samples(model, checkpoint, store: PatchStore, modalities: list[str], cfg: EvaluateConfig,
                  seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """``{modality: {"standard": (n, C, H, W), "gmm": ..., "diffusion": ...}}`` (:func:`sampling_priors`) float32
    CPU image samples (a joint model's mask channel dropped), n = ``cfg.mmd_samples``.

    A modality-conditioned model samples each modality under its own id; a class model samples classes
    in the training split's proportions; an unconditional model's samples are shared by every modality.
    """
    priors = sampling_priors(checkpoint, model, store, cfg, seed)
    kind, names = model.config.condition, tuple(model.config.condition_names)
    channels, n = int(store.meta["channels"]), cfg.mmd_samples
    ids = None
    if kind == "class":
        ids = sample_conditions(0, n, condition_counts(store, kind, names))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for mod in modalities:
        if kind != "modality" and out:  # the same samples for every modality
            out[mod] = next(iter(out.values()))
            continue
        if kind == "modality":
            ids = torch.full((n,), names.index(mod), dtype=torch.long)
        out[mod] = {name: sample_images(model, n, seed=seed, prior=prior, conditions=ids,
                                        batch_size=cfg.batch_size)[:, :channels] for name, prior in priors.items()}
    return out


@torch.no_grad()
def class_samples(model, checkpoint, store: PatchStore, cfg: EvaluateConfig, per_class: int = 8,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """A class model's samples for the report: ``per_class`` of each class (its ``condition_names`` order).

    Every class decodes the same latents (samples ``0..per_class-1`` of ``seed``; the mixture's per-class
    components transform the same noise), so a column holds the code fixed and shows what the class changes.

    Returns:
        ``{"standard": (K * per_class, C, H, W), "gmm": ...}`` float32 in [0, 1], class by class (no
        ``gmm`` without a train split to fit the mixture on).
    """
    priors = sampling_priors(checkpoint, model, store, cfg, seed)
    channels = int(store.meta["channels"])
    out = {}
    for name, prior in priors.items():
        out[name] = torch.cat([
            sample_images(model, per_class, seed=seed, prior=prior, batch_size=cfg.batch_size,
                          conditions=torch.full((per_class,), c, dtype=torch.long))[:, :channels]
            for c in range(len(model.config.condition_names))]).numpy()
    return out


@torch.no_grad()
def classified_samples(store: PatchStore, samples: dict[str, torch.Tensor], cfg: EvaluateConfig,
                       device: torch.device, per_class: int = 8, seed: int = 0) -> dict:
    """An unconditional model's samples a row per class, as the store's feature classifier labels them.

    A model without a class condition cannot be asked for a class; what it does generate of each class is
    what the classifier (:mod:`medvae.evaluation.features`, trained on the train split's labels, shared with
    the sample metrics) says of its samples. The counts show which classes the model favours or misses.

    Args:
        samples: prior name -> ``(N, C, H, W)`` samples in [0, 1] (:func:`prior_samples` of one modality).

    Returns:
        ``{"names": classes (the store's label order), "counts": {prior: [samples per class]},
        "n": {prior: N}, prior: (K * per_class, C, H, W) float32}``: each class's first ``per_class``
        samples, NaN (drawn blank) where it got fewer; ``{}`` when the feature network is no classifier
        (no classes, or a train split without them).
    """
    predicted = classifier_names(store)
    if not predicted or store.select(split="train").size < 2:
        return {}
    net = feature_net(store, steps=cfg.feature_steps, seed=seed, device=device)
    names = [c for c in store.classes if c in predicted] + [c for c in predicted if c not in store.classes]
    out: dict = {"names": names, "counts": {}, "n": {}}
    for prior, x in samples.items():
        label = torch.cat([net.classify(x[i:i + cfg.batch_size].to(device)).argmax(1).cpu()
                           for i in range(0, len(x), cfg.batch_size)]).numpy()
        label = np.asarray(predicted)[label]
        grid = np.full((len(names) * per_class, *x.shape[1:]), np.nan, np.float32)
        counts = []
        for k, name in enumerate(names):
            picked = np.flatnonzero(label == name)
            counts.append(int(picked.size))
            grid[k * per_class:k * per_class + min(picked.size, per_class)] = x[picked[:per_class]].numpy()
        out[prior], out["counts"][prior], out["n"][prior] = grid, counts, int(len(x))
    return out


def sample_quality(store: PatchStore, rows_by_modality: dict[str, np.ndarray],
                   samples: dict[str, dict[str, torch.Tensor]], cfg: EvaluateConfig, device: torch.device,
                   seed: int = 0) -> dict[str, dict[str, dict]]:
    """Per modality and prior (``real``, ``standard``, ``gmm``): the sample metrics and their n.

    ``samples``: :func:`prior_samples`, the model's samples per modality and prior.
    """
    if store.select(split="train").size < 2:
        log.warning("%s has no train split to train the feature network on: no sample metrics", store.path)
        return {}
    net = feature_net(store, steps=cfg.feature_steps, seed=seed, device=device)
    embedded: dict[int, np.ndarray] = {}  # shared samples (an unconditional model) are embedded once
    rng = np.random.default_rng(seed)
    out = {}
    for mod, rows in rows_by_modality.items():
        for x in samples[mod].values():
            if id(x) not in embedded:  # (setdefault would embed again before finding the cached one)
                embedded[id(x)] = embed(net, x).numpy()
        fake = {name: embedded[id(x)] for name, x in samples[mod].items()}
        pick = np.sort(rng.choice(rows, min(cfg.mmd_samples, len(rows)), replace=False))
        real = embed(net, torch.from_numpy(store.get(pick))).numpy()
        if len(real) < 2 * MIN_PER_HALF:
            log.warning("%s: %d patches are too few for sample metrics (k-NN balls need %d per half); skipped",
                        mod, len(real), MIN_PER_HALF)
            continue
        # Every comparison at the same n (FID and KID depend on it): half of the real patches are the
        # reference, the other half the floor, and as many samples. The halves are a random split, not
        # row order: rows are sorted by patient, and halves of different patients are no floor.
        real = real[rng.permutation(len(real))]
        half = len(real) // 2
        ref = real[:half]
        res = {"real": {**sample_metrics(ref, real[half:2 * half], seed), "n": half}}
        for name, f in fake.items():
            res[name] = {**sample_metrics(ref, f[:half], seed), "n": int(min(half, len(f)))}
        out[mod] = res
    return out

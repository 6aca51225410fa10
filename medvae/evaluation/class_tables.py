"""The evaluation's view of an image set (Fashion-MNIST, MedMNIST, a folder of PNGs): classes and splits,
not patients.

In an image set every image is its own "patient" with one patch, so per-patient tables repeat each
image's own numbers (sd 0, its one patch both best and worst) and grow with the split: 10,000 test
images were 10,000 report sections' worth of summary and 32 MB of metrics.csv. :func:`is_image_set`
is the one rule that decides; for such a store the evaluation reports instead

- per class (:func:`class_stats`; any store with classes): mean, sd, n and the Student-t 95 %
  interval of the mean of each per-patch metric over the class's patches;
- per split (:func:`split_rows`, :func:`grouped_stats`): the same for the evaluated split and, on
  up to ``split_patches`` evenly spaced images each, the store's other splits (train against test
  shows what the model memorised);
- the split's worst reconstructions by SSIM (:func:`worst_images`).

Patient cohorts (CT, microscopy: patients with many patches) keep their per-patient tables.
"""

from __future__ import annotations

import numpy as np

from medvae.data.store import PatchStore, even_positions
from medvae.metrics.stats import finite_stats

CI_LEVEL = 0.95  # of the intervals in the class and split tables


def is_image_set(store: PatchStore) -> bool:
    """True when every patient of ``store`` (all splits) has exactly one patch: an image set.

    A store of slices or tiles of volumes has patients with many patches; an image set whose
    ``labels.csv`` names a subject per image groups several images under one patient and is shown as
    a patient cohort, which it then is.
    """
    ids = store.index["patient_id"].astype(str)
    return ids.size > 0 and np.unique(ids).size == ids.size


def grouped_stats(per: dict[str, np.ndarray], labels: np.ndarray, modalities: np.ndarray,
                  order: list[str] = ()) -> dict[str, dict]:
    """:func:`~medvae.metrics.stats.finite_stats` with the ``CI_LEVEL`` interval of every metric within each
    group of patches.

    Args:
        per: metric name -> (N,) per-patch values.
        labels: (N,) group name per patch; "" (no group) is left out.
        modalities: (N,) modality per patch.
        order: names listed first, in this order (e.g. the store's classes in label order); the
            other names follow sorted. Names without patches are left out.

    Returns:
        ``{name: {"modality": the group's modality ("ALL" when it has several), "n_patches": int,
        "metrics": {metric: {"mean", "sd", "n", "ci_low", "ci_high"}}}}``.
    """
    labels = np.asarray(labels).astype(str)
    uniq, inverse = np.unique(labels, return_inverse=True)  # one pass, however many patches
    position = {u: i for i, u in enumerate(uniq.tolist()) if u}
    names = [c for c in order if c in position] + sorted(set(position) - set(order))
    out = {}
    for name in names:
        m = inverse == position[name]
        mods = sorted(set(np.asarray(modalities)[m].astype(str).tolist()))
        out[name] = {"modality": mods[0] if len(mods) == 1 else "ALL", "n_patches": int(m.sum()),
                     "metrics": {k: finite_stats(v[m], level=CI_LEVEL) for k, v in per.items()}}
    return out


def class_stats(store: PatchStore, rows: np.ndarray, per: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per-class :func:`grouped_stats` of store rows ``rows`` (their per-patch metrics ``per``), classes in
    the store's label order; empty when the store has no classes."""
    if not store.classes or "class" not in store.index:
        return {}
    return grouped_stats(per, store.index["class"][rows], store.index["modality"][rows], store.classes)


def split_rows(store: PatchStore, split: str, cap: int) -> tuple[np.ndarray, int]:
    """Up to ``cap`` evenly spaced rows of ``split`` (deterministic) and the split's size."""
    rows = store.select(split=split)
    return rows[even_positions(len(rows), cap)], int(rows.size)


def worst_images(store: PatchStore, rows: np.ndarray, ssim: np.ndarray, n: int) -> list[dict]:
    """The ``n`` rows with the lowest SSIM (NaN last; ties by row), lowest first.

    Returns:
        ``[{"row", "patient_id", "class", "ssim"}]`` (class "" in a store without classes).
    """
    finite = np.isfinite(ssim)
    # one vectorized sort (60,000 images): finite first, then SSIM, then row
    order = np.lexsort((rows, np.where(finite, ssim, np.inf), ~finite))[:n].tolist()
    classes = store.index["class"] if "class" in store.index else None
    return [{"row": int(rows[i]), "patient_id": str(store.index["patient_id"][rows[i]]),
             "class": "" if classes is None else str(classes[rows[i]]), "ssim": float(ssim[i])} for i in order]


"""Which real rows a utility cell may use: labelled rows of a split, and seeded fractions of the train split.

Classification subsets are stratified by class (every class keeps ``max(1, round(f * n_c))`` of its
``n_c`` rows, or a fixed number of labels per class), so a 5 % subset still holds every class;
segmentation subsets are drawn by patient (``max(1, round(f * n_p))`` whole patients), because a
patient's neighbouring slices are nearly copies of each other and a subset of slices would
overstate how much real data an arm had.

Subsets are nested: with the same seed, a smaller budget's rows are a subset of a larger one's
(each class's rows, or the patients, are permuted once per seed and the first ones taken). The
curve over fractions then adds data to the same draw instead of comparing unrelated draws.

The subset is written as its own small store (:func:`write_subset_store`) holding only those rows,
all in split ``train``: the generator of a cell trains on exactly that store, so no held-out label
can leak into a low-data arm through the generator.
"""

from __future__ import annotations

import os
import zlib

import numpy as np

from medvae.data.store import PatchStore, write_derived_store
from medvae.errors import InputError
from medvae.files import sha256_json

SOURCE_ROW = "source_row"  # extra index column of a subset store: the row in the store it came from


def labelled_rows(store: PatchStore, split: str, task: str) -> np.ndarray:
    """Rows of ``split`` that carry the task's label: a class (classify) or a label map (segment)."""
    rows = store.select(split)
    if task == "classify":
        return rows[store.class_ids(rows) >= 0]
    if "has_label" in store.index:
        return rows[store.index["has_label"][rows] > 0]
    return rows


def check_task(store: PatchStore, task: str) -> None:
    """Raise InputError when the store cannot serve ``task`` (no classes, no label maps, empty splits)."""
    if task == "classify" and not store.classes:
        raise InputError(f"{store.path}: the store has no classes; --task classify needs an image set with classes "
                         "(ImageFolder, labels.csv, IDX or npz labels)")
    if task == "segment" and store.labels is None:
        raise InputError(f"{store.path}: the store has no labels.npy; --task segment needs label maps "
                         "(`medvae discover --labels DIR`)")
    for split in ("train", "test"):
        if not len(labelled_rows(store, split, task)):
            raise InputError(f"{store.path}: no labelled patches in the {split} split; the utility study trains "
                             "on train and scores on test")


def _take(n: int, fraction: float) -> int:
    return min(n, max(1, round(fraction * n)))


def _permutation(n: int, seed: int, key: str) -> np.ndarray:
    # crc32, not hash(): str hashes change between Python processes
    return np.random.default_rng([seed, zlib.crc32(key.encode())]).permutation(n)


def stratified_rows(class_ids: np.ndarray, fraction: float | None, seed: int, per_class: int | None = None
                    ) -> np.ndarray:
    """Positions (ascending) of a class-stratified subset: ``max(1, round(f * n_c))`` of each class's
    ``n_c`` rows, or ``min(per_class, n_c)`` of each when ``per_class`` is given."""
    class_ids = np.asarray(class_ids)
    picked = []
    for c in np.unique(class_ids):
        members = np.flatnonzero(class_ids == c)
        n = min(per_class, len(members)) if per_class is not None else _take(len(members), fraction)
        picked.append(members[_permutation(len(members), seed, f"class {c}")[:n]])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def patient_rows(patients: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Positions (ascending) of every row of ``max(1, round(f * n_p))`` patients drawn at random."""
    patients = np.asarray(patients).astype(str)
    names = np.unique(patients)
    chosen = names[_permutation(len(names), seed, "patients")[: _take(len(names), fraction)]]
    return np.flatnonzero(np.isin(patients, chosen))


def subset_rows(store: PatchStore, task: str, fraction: float | None, seed: int, per_class: int | None = None
                ) -> np.ndarray:
    """Store rows (ascending) of the cell ``(budget, seed)``: a fraction of the labelled train rows, or
    ``per_class`` labelled rows of each class."""
    rows = labelled_rows(store, "train", task)
    if task == "classify":
        return rows[stratified_rows(store.class_ids(rows), fraction, seed, per_class)]
    return rows[patient_rows(store.index["patient_id"][rows], fraction, seed)]


def write_subset_store(store: PatchStore, rows: np.ndarray, path: str | os.PathLike) -> PatchStore:
    """A store of exactly ``rows`` of ``store`` (patches, label maps, index), all in split ``train``.

    The index keeps every column and adds ``source_row`` (the row in ``store``); normalization,
    spacing and the class list are the source's, so class ids mean the same in both stores.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        raise InputError(f"{store.path}: empty subset; nothing to train on")
    return write_derived_store(path, store, rows, columns={"split": "train", SOURCE_ROW: rows},
                               meta={"subset_of": str(store.path), "content_hash": sha256_json(
                                   {"source": store.content_hash, "rows": rows.tolist()})})

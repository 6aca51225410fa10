"""Real subsets of a utility cell: stratified by class or drawn by patient, nested, and written as a
store of exactly those rows (what the cell's generator trains on)."""

import numpy as np
import pytest

from medvae.downstream.subsets import (
    SOURCE_ROW,
    check_task,
    labelled_rows,
    patient_rows,
    stratified_rows,
    subset_rows,
    write_subset_store,
)
from medvae.errors import InputError


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.1, 0.33, 0.5, 1.0])
def test_stratified_rows_keep_every_class_in_proportion(fraction):
    counts = {0: 120, 1: 37, 2: 9, 3: 1}
    ids = np.random.default_rng(3).permutation(np.repeat(list(counts), list(counts.values())))
    picked = stratified_rows(ids, fraction, seed=4)
    assert np.all(np.diff(picked) > 0)  # ascending positions, no repeats
    for c, n in counts.items():
        k = int(np.sum(ids[picked] == c))
        assert k >= 1 and abs(k - fraction * n) <= 1, (c, k, fraction * n)
    assert np.array_equal(picked, stratified_rows(ids, fraction, seed=4))  # seeded


def test_stratified_rows_are_nested_over_fractions_and_differ_by_seed():
    ids = np.repeat([0, 1, 2], [50, 30, 20])
    small, large = stratified_rows(ids, 0.1, seed=1), stratified_rows(ids, 0.5, seed=1)
    assert set(small) <= set(large)
    assert not np.array_equal(small, stratified_rows(ids, 0.1, seed=2))
    assert len(stratified_rows(ids, 1.0, seed=0)) == 100


def test_patient_rows_take_whole_patients():
    patients = np.repeat([f"P{i}" for i in range(10)], 4)
    picked = patient_rows(patients, 0.3, seed=0)
    chosen = set(patients[picked])
    assert len(chosen) == 3 and len(picked) == 12  # every slice of 3 patients
    assert len(set(patients[patient_rows(patients, 0.01, seed=0)])) == 1  # at least one patient


def test_subset_store_holds_exactly_the_subset_rows(class_store, tmp_path):
    rows = subset_rows(class_store, "classify", 0.34, seed=0)
    train = set(labelled_rows(class_store, "train", "classify"))
    assert set(rows) <= train
    sub = write_subset_store(class_store, rows, tmp_path / "sub")
    assert np.array_equal(sub.index[SOURCE_ROW].astype(int), rows)
    assert np.array_equal(sub.get(slice(None)), class_store.get(rows))
    assert np.array_equal(sub.class_ids(), class_store.class_ids(rows)) and sub.classes == class_store.classes
    assert sub.splits == ["train"]
    held_out = set(class_store.select("test")) | set(class_store.select("val"))
    assert not held_out & set(sub.index[SOURCE_ROW].astype(int).tolist())
    assert sorted(np.bincount(sub.class_ids()).tolist()) == [2, 3, 5]  # round(0.34 * (6, 9, 15))


def test_subset_store_by_patient_keeps_label_maps(mask_store, tmp_path):
    rows = subset_rows(mask_store, "segment", 0.5, seed=1)
    sub = write_subset_store(mask_store, rows, tmp_path / "sub")
    assert len(set(sub.index["patient_id"])) == 3 and len(sub) == 9
    assert np.array_equal(np.asarray(sub.labels), np.asarray(mask_store.labels)[rows])
    assert set(mask_store.index["split"][rows]) == {"train"}


def test_check_task_names_what_is_missing(class_store, mask_store):
    with pytest.raises(InputError, match="no labels.npy"):
        check_task(class_store, "segment")
    with pytest.raises(InputError, match="no classes"):
        check_task(mask_store, "classify")

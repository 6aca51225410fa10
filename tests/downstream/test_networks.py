"""The downstream networks and their metrics (accuracy, macro F1, Dice and HD95 by hand)."""

import math

import numpy as np
import pytest
import torch

from medvae.downstream.networks import (
    LabelledSet,
    classification_metrics,
    from_store,
    score_downstream,
    segmentation_metrics,
    train_downstream,
)


def test_classification_metrics_by_hand():
    y_true = [0, 0, 0, 1, 1, 2, 2, 3]
    y_pred = [0, 0, 1, 1, 1, 1, 4, 3]  # class 2 is never predicted, class 4 never true
    got = classification_metrics(y_true, y_pred)
    assert got["accuracy"] == pytest.approx(5 / 8)
    # F1 = 2TP / (2TP + FP + FN) per class present in either array: 0: 4/5, 1: 4/6, 2: 0, 3: 1, 4: 0
    assert got["macro_f1"] == pytest.approx((4 / 5 + 4 / 6 + 0 + 1 + 0) / 5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_match_their_definition(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 4, 60)
    y_pred = np.where(rng.random(60) < 0.6, y_true, rng.integers(0, 5, 60))  # class 4 is never true
    y_pred[y_pred == 2] = 1  # class 2 is never predicted
    f1 = []
    for c in np.union1d(y_true, y_pred):
        tp, fp, fn = np.sum((y_pred == c) & (y_true == c)), np.sum((y_pred == c) & (y_true != c)), \
            np.sum((y_pred != c) & (y_true == c))
        f1.append(2 * tp / (2 * tp + fp + fn))
    got = classification_metrics(y_true, y_pred)
    assert got["accuracy"] == pytest.approx(np.mean(y_true == y_pred))
    assert got["macro_f1"] == pytest.approx(np.mean(f1))


def test_segmentation_metrics_by_hand():
    truth = torch.zeros(2, 1, 32, 32, dtype=torch.long)
    truth[0, 0, 4:12, 4:12] = 1
    truth[1, 0, 10:20, 10:20] = 2
    perfect = segmentation_metrics(truth, truth, n_out=3)
    assert perfect == {"dice": pytest.approx(1.0), "hd95": pytest.approx(0.0)}
    missed = truth.clone()
    missed[1] = 0  # label 2 missed entirely: Dice 0, HD95 the patch diagonal
    got = segmentation_metrics(missed, truth, n_out=3)
    assert got["dice"] == pytest.approx(0.5) and got["hd95"] == pytest.approx(math.hypot(32, 32) / 2)
    assert math.isnan(segmentation_metrics(truth * 0, truth * 0, n_out=3)["dice"])


def test_same_data_same_seed_same_network(class_store):
    rows = class_store.select("train")
    data = from_store(class_store, rows, "classify", class_store.classes)
    copy = LabelledSet(data.images.clone(), data.targets.clone())
    test = from_store(class_store, class_store.select("test"), "classify", class_store.classes)
    a = score_downstream("classify", train_downstream("classify", data, 3, 60, 8, 3e-3, seed=5), test, 3)
    b = score_downstream("classify", train_downstream("classify", copy, 3, 60, 8, 3e-3, seed=5), test, 3)
    assert a == b
    assert a["accuracy"] > 1 / 3  # better than chance after 60 steps on 30 patches
    other = score_downstream("classify", train_downstream("classify", data, 3, 3, 8, 3e-3, seed=6), test, 3)
    assert other != a


def test_from_store_maps_classes_by_name(class_store):
    rows = class_store.select("test")[:4]
    reordered = ["vbar", "disc", "hbar"]
    got = from_store(class_store, rows, "classify", reordered)
    names = class_store.index["class"][rows]
    assert [reordered[i] for i in got.targets.tolist()] == names.tolist()


def test_real_batches_do_not_depend_on_the_synthetic_set(class_store):
    """real and real+synthetic arms see the same real images, in the same order, with the same flips;
    the synthetic images ride along (share x batch of them per step)."""
    data = from_store(class_store, class_store.select("train"), "classify", class_store.classes)
    syn = LabelledSet(torch.rand(40, 1, 32, 32), torch.zeros(40, dtype=torch.long))
    batches = {}
    for name, extra in (("real", None), ("mixed", syn)):
        seen = []
        orig = torch.nn.Module.__call__

        def spy(module, x, *a, _orig=orig, _seen=seen, **k):
            if isinstance(x, torch.Tensor) and x.dim() == 4 and module.__class__.__name__ == "Classifier":
                _seen.append(x.clone())
            return _orig(module, x, *a, **k)

        torch.nn.Module.__call__ = spy
        try:
            train_downstream("classify", data, 3, 5, 8, 1e-3, seed=3, synthetic=extra, share=2.0)
        finally:
            torch.nn.Module.__call__ = orig
        batches[name] = seen
    assert len(batches["real"]) == len(batches["mixed"]) == 5  # equal optimizer steps
    for real, mixed in zip(batches["real"], batches["mixed"]):
        assert real.shape[0] == 8 and mixed.shape[0] == 8 + 16
        assert torch.equal(mixed[:8], real)

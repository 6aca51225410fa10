"""Tiny 32² stores for the utility study: three shape classes (classify) and label maps by patient (segment)."""

import numpy as np
import pytest

from tests.factories import patch_store

YY, XX = np.mgrid[:32, :32] / 32.0


def make_class_store(path, counts=(("train", (15, 9, 6)), ("val", (2, 2, 2)), ("test", (6, 6, 6)))):
    """Class 0 discs, 1 horizontal bars, 2 vertical bars at random places and sizes, with a little noise."""
    rng = np.random.default_rng(0)
    images, splits, classes = [], [], []
    for split, per_class in counts:
        for c, k in enumerate(per_class):
            for _ in range(k):
                cy, cx, r = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.15, 0.25)
                d = np.hypot(YY - cy, XX - cx)
                bar = (abs(YY - cy) < r / 3) & (abs(XX - cx) < r)
                shape = [d < r, bar, bar.T][c]
                images.append(shape * 0.7 + 0.1 + rng.normal(0, 0.03, YY.shape))
                splits.append(split)
                classes.append(["disc", "hbar", "vbar"][c])
    x = np.clip(np.asarray(images, dtype=np.float32)[:, None], 0, 1)
    return patch_store(path, x, patient_id=[f"img{i}" for i in range(len(x))], modality="image", split=splits,
                       has_label=0, classes=classes, class_names=["disc", "hbar", "vbar"],
                       content_hash="utility-classes")


def make_mask_store(path, patients=(("train", 6), ("test", 2)), slices=3):
    """Bright discs (label 1) with a small square (label 2) inside, ``slices`` patches per patient."""
    rng = np.random.default_rng(1)
    images, masks, splits, pids = [], [], [], []
    p = 0
    for split, n in patients:
        for _ in range(n):
            for _ in range(slices):
                cy, cx, r = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.15, 0.25)
                m = (np.hypot(YY - cy, XX - cx) < r).astype(np.uint8)
                m[np.maximum(abs(YY - cy), abs(XX - cx)) < r / 3] = 2
                images.append(0.1 + 0.4 * m + rng.normal(0, 0.03, YY.shape))
                masks.append(m)
                splits.append(split)
                pids.append(f"P{p}")
            p += 1
    x = np.clip(np.asarray(images, dtype=np.float32)[:, None], 0, 1)
    return patch_store(path, x, labels=np.asarray(masks)[:, None], patient_id=pids, modality="image", split=splits,
                       has_label=1, content_hash="utility-masks")


@pytest.fixture(scope="session")
def class_store(tmp_path_factory):
    return make_class_store(tmp_path_factory.mktemp("classes") / "store")


@pytest.fixture(scope="session")
def mask_store(tmp_path_factory):
    return make_mask_store(tmp_path_factory.mktemp("masks") / "store")

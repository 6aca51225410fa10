"""The semi-supervised arms: FixMatch's mask and loss, pseudo-labels' selection, the strong view's new
transforms, and the arms in a study (no label outside the budget, resumption, segmentation)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import medvae.downstream.study as study
from medvae.config import AugmentConfig, UtilityConfig
from medvae.downstream.augment import augment
from medvae.downstream.semisupervised import ARMS, _Consistency, balanced_confident, confident_maps, fixmatch_loss
from medvae.downstream.subsets import labelled_rows, subset_rows
from medvae.downstream.synthetic_sets import Candidates, write_synthetic_store
from tests.factories import relabelled_store

FAST = {"seeds": 1, "downstream_steps": 6, "batch_size": 4, "lr": 3e-3, "unlabelled_ratio": 2,
        "pseudo_threshold": 0.4, "fixmatch_threshold": 0.4}


def test_fixmatch_mask_excludes_low_confidence_images():
    # softmax max of each weak row: e^5/(e^5+2) = 0.987, e^1/(e^1+2) = 0.576, e^4/(e^4+2) = 0.965,
    # e^2.9/(e^2.9+2) = 0.901
    weak = torch.tensor([[5.0, 0, 0], [1.0, 0, 0], [0, 4.0, 0], [0, 0, 2.9]])
    strong = torch.tensor([[0.2, 1.0, -0.5], [3.0, 0, 0], [1.0, 0.5, 2.0], [0, 0, 9.0]])
    seen = []
    loss = fixmatch_loss(weak, lambda keep, t: (seen.append(keep) or strong[keep], t), 0.95)
    assert seen[0].tolist() == [True, False, True, False]
    # the kept images' cross-entropy against the weak argmax (0 and 1), divided by all four images
    expected = F.cross_entropy(strong[[0, 2]], torch.tensor([0, 1]), reduction="sum") / 4
    by_hand = ((math.log(math.exp(0.2) + math.exp(1.0) + math.exp(-0.5)) - 0.2)
               + (math.log(math.exp(1.0) + math.exp(0.5) + math.exp(2.0)) - 0.5)) / 4
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6) == pytest.approx(by_hand, abs=1e-6)


def test_fixmatch_loss_is_zero_without_a_confident_image():
    calls = []
    loss = fixmatch_loss(torch.zeros(3, 4), lambda keep, t: calls.append(keep), 0.95)  # uniform: 0.25 each
    assert loss.item() == 0.0 and not calls  # no strong view goes through the network


def test_segmentation_fixmatch_is_the_masked_pixel_cross_entropy_on_a_label_map_that_follows_the_view():
    """A pixel-wise network (a 1×1 conv) and a strong view of flips only: the strong view's targets must be
    its own pixels' weak predictions, so ℓ_u = Σ over confident pixels of −log max softmax / all pixels —
    whatever the flips drew. A target map that did not follow the flips would add the cost of wrong pixels."""
    net = torch.nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        net.weight[:] = torch.tensor([[[[0.0]]], [[[12.0]]]])
        net.bias[:] = torch.tensor([0.0, -6.0])  # logit of class 1: 12 (x − 0.5)
    pool = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    still = AugmentConfig(flip_lr=False, flip_ud=False, rotate_deg=0, scale=0, translate=0, elastic_prob=0,
                          noise_prob=0)
    flips = still.model_copy(update={"flip_lr": True, "flip_ud": True})
    term = _Consistency("segment", pool, 6, 3, still, flips, threshold=0.9, weight=1.0)
    logp = torch.log_softmax(net(pool), 1).max(1).values  # every pool image once, in any order
    confident = logp >= math.log(0.9)
    assert 0 < confident.sum() < confident.numel()  # the mask excludes some pixels
    expected = -(logp * confident).sum() / logp.numel()
    assert term(net).item() == pytest.approx(expected.item(), rel=1e-5)


def test_pseudo_labels_are_the_most_confident_and_class_balanced():
    probs = torch.tensor([[0.95, 0.03, 0.02], [0.92, 0.05, 0.03], [0.97, 0.02, 0.01],  # class 0: 3 above 0.9
                          [0.05, 0.91, 0.04], [0.02, 0.96, 0.02],  # class 1: 2
                          [0.1, 0.1, 0.8], [0.01, 0.01, 0.98], [0.03, 0.03, 0.94],  # class 2: 2 (0.8 is below)
                          [0.5, 0.4, 0.1]])  # class 0, below
    idx, labels = balanced_confident(probs, 0.9)
    assert idx.tolist() == [2, 0, 4, 3, 6, 7] and labels.tolist() == [0, 0, 1, 1, 2, 2]  # k = 2 per class
    idx, labels = balanced_confident(probs, 0.96)  # 0.97, 0.96, 0.98: one per class
    assert idx.tolist() == [2, 4, 6] and labels.tolist() == [0, 1, 2]
    idx, _ = balanced_confident(probs, 0.975)  # class 0 and 1 have none: nothing is kept
    assert len(idx) == 0


def test_pseudo_label_maps_kept_where_the_foreground_is_confident():
    # (N=3, labels=2, 1x2): foreground probabilities per pixel -> max-probability and argmax by hand
    fg = torch.tensor([[[0.9, 0.99]], [[0.2, 0.1]], [[0.7, 0.3]]])  # (3, 1, 2)
    probs = torch.stack([1 - fg, fg], 1)  # (3, 2, 1, 2)
    idx, maps = confident_maps(probs, 0.9)
    # slice 0: both pixels foreground, mean (0.9 + 0.99) / 2 = 0.945; slice 1: no foreground;
    # slice 2: one foreground pixel at 0.7
    assert idx.tolist() == [0] and maps.tolist() == [[[[1, 1]]]]
    assert confident_maps(probs, 0.6)[0].tolist() == [0, 2]


def test_contrast_is_monai_adjust_contrast():
    from monai.transforms import AdjustContrast

    x = torch.rand(3, 1, 8, 8) * 0.8 + 0.1
    cfg = AugmentConfig(flip_lr=False, flip_ud=False, rotate_deg=0, scale=0, translate=0, elastic_prob=0,
                        noise_prob=0, contrast_prob=1.0, contrast_gamma=(1.7, 1.7))
    out, _ = augment(x, cfg, torch.Generator().manual_seed(0))
    for i in range(3):
        ref = torch.as_tensor(AdjustContrast(gamma=1.7)(x[i]))
        assert torch.allclose(out[i], ref, atol=1e-5)


def test_coarse_dropout_zeroes_one_square_per_image():
    x = torch.ones(5, 1, 8, 8)
    cfg = AugmentConfig(flip_lr=False, flip_ud=False, rotate_deg=0, scale=0, translate=0, elastic_prob=0,
                        noise_prob=0, dropout_prob=1.0, dropout_holes=1, dropout_size=0.25)
    out, _ = augment(x, cfg, torch.Generator().manual_seed(0))
    for img in out[:, 0]:
        rows, cols = torch.nonzero(img == 0, as_tuple=True)
        assert len(rows) == 4 and rows.max() - rows.min() == 1 and cols.max() - cols.min() == 1  # a 2x2 square
        assert torch.all(img[img != 0] == 1)


def test_the_new_fields_leave_the_classical_draw_unchanged():
    """Contrast and dropout off (their default) draw nothing: the classical arms' augmentation is as before."""
    x = torch.rand(6, 1, 16, 16)
    cfg = AugmentConfig(flip_lr=True, flip_ud=False, rotate_deg=10, scale=0.1, translate=0.06)
    gen = torch.Generator().manual_seed(3)
    augment(x, cfg, gen)
    # the draws of before: 7 uniforms per image, 2 for the shift, the elastic control points, the noise
    ref = torch.Generator().manual_seed(3)
    torch.rand(6, 7, generator=ref), torch.rand(6, 2, generator=ref), torch.rand(6, 2, 3, 3, generator=ref)
    torch.randn(x.shape, generator=ref)
    assert torch.equal(torch.rand(5, generator=gen), torch.rand(5, generator=ref))


def _given(store, path, rows):
    """A user's 'synthetic' store: a copy of the labelled rows (the same in both studies)."""
    return write_synthetic_store(path, Candidates(store.get(rows), store.class_ids(rows), None, rows), store, {})


def test_no_label_outside_the_budget_reaches_the_semi_supervised_arms(class_store, tmp_path, monkeypatch):
    rows = subset_rows(class_store, "classify", None, seed=0, per_class=3)
    other = relabelled_store(class_store, tmp_path / "relabelled", rows)
    train = labelled_rows(class_store, "train", "classify")
    outside = np.setdiff1d(train, rows)
    assert (class_store.class_ids(outside) != other.class_ids(outside)).all()  # every label outside changed
    monkeypatch.setattr(study, "subset_rows", lambda *a, **k: rows)
    cfg = UtilityConfig(labels_per_class=[3], arms=list(ARMS), **FAST)
    syn = _given(class_store, tmp_path / "syn", rows)
    a = study.run_utility(class_store, tmp_path / "a", cfg, device="cpu", synthetic=syn.path)
    b = study.run_utility(other, tmp_path / "b", cfg, device="cpu", synthetic=syn.path)
    assert a["arms"] == b["arms"]
    pseudo = json.loads((tmp_path / "a/cells/3pc_s0/pseudo.json").read_text())
    assert pseudo["n_pseudo"][0] > 0  # the pool was labelled and used


@pytest.fixture(scope="module")
def semi_study(class_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("semi")
    syn = _given(class_store, root / "syn", labelled_rows(class_store, "train", "classify"))
    cfg = UtilityConfig(labels_per_class=[4], arms=["real", "real+classical", *ARMS], pseudo_rounds=2, **FAST)
    return root, syn, cfg, study.run_utility(class_store, root / "out", cfg, device="cpu", synthetic=syn.path)


def test_a_study_with_the_semi_supervised_arms_runs_and_resumes(semi_study, class_store, monkeypatch):
    root, syn, cfg, summary = semi_study
    cell = root / "out/cells/4pc_s0"
    results = {a: json.loads((cell / f"{a}.json").read_text()) for a in cfg.arms}
    assert len({r["real_images_seen"] for r in results.values()}) == 1  # the same real batches in every arm
    assert len(results["pseudo"]["n_pseudo"]) == 2  # two rounds
    assert results["fixmatch"]["n_unlabelled"] == len(class_store.select("train"))
    assert results["pseudo+synthetic"]["n_synthetic"] == len(labelled_rows(class_store, "train", "classify"))
    calls = []
    monkeypatch.setattr(study.semisupervised, "train_downstream", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(study, "train_downstream", lambda *a, **k: calls.append(1))
    again = study.run_utility(class_store, root / "out", cfg, device="cpu", synthetic=syn.path)
    assert not calls and again["arms"] == summary["arms"]


def test_fixmatch_without_its_unlabelled_term_is_the_classical_arm(semi_study, class_store):
    """λ_u = 0: the unlabelled stream draws from its own generators, so the network is real+classical's
    (same initial weights, real batches and augmentation) and scores exactly as it."""
    root, syn, cfg, _ = semi_study
    zero = cfg.model_copy(update={"unlabelled_weight": 0.0, "arms": ["fixmatch"]})
    summary = study.run_utility(class_store, root / "zero", zero, device="cpu", synthetic=syn.path)
    classical = json.loads((root / "out/cells/4pc_s0/real+classical.json").read_text())["metrics"]
    assert json.loads((root / "zero/cells/4pc_s0/fixmatch.json").read_text())["metrics"] == classical
    assert summary["arms"]["fixmatch"]


def test_segmentation_pseudo_and_fixmatch_arms(mask_store, tmp_path):
    rows = labelled_rows(mask_store, "train", "segment")
    syn = write_synthetic_store(tmp_path / "syn", Candidates(mask_store.get(rows), None,
                                                             np.asarray(mask_store.labels)[rows], rows), mask_store, {})
    cfg = UtilityConfig(task="segment", fractions=[0.5], arms=["real", "pseudo", "pseudo+synthetic", "fixmatch"],
                        **{**FAST, "pseudo_threshold": 0.0})
    study.run_utility(mask_store, tmp_path / "out", cfg, device="cpu", synthetic=syn.path)
    pseudo = json.loads((tmp_path / "out/cells/0.5_s0/pseudo.json").read_text())
    assert 0.0 <= pseudo["metrics"]["dice"] <= 1.0 and pseudo["n_pseudo"][0] >= 0
    fixmatch = json.loads((tmp_path / "out/cells/0.5_s0/fixmatch.json").read_text())
    assert 0.0 <= fixmatch["metrics"]["dice"] <= 1.0


def test_the_semi_supervised_settings_stay_out_of_the_hash_at_their_defaults():
    dump = UtilityConfig().stable_dump()
    assert "pseudo_threshold" not in dump and "strong" not in dump and "contrast_prob" not in dump["classical"]
    changed = UtilityConfig(pseudo_threshold=0.8, classical={"contrast_prob": 0.5}).stable_dump()
    assert changed["pseudo_threshold"] == 0.8 and changed["classical"]["contrast_prob"] == 0.5


def test_a_partial_strong_view_keeps_the_strong_defaults_of_the_fields_it_leaves_out():
    strong = UtilityConfig(strong={"rotate_deg": 5.0}).strong
    assert strong.rotate_deg == 5.0 and strong.dropout_prob == 1.0 and strong.contrast_prob == 0.5
    assert strong.elastic_magnitude == 2.0 and UtilityConfig(strong={}).strong == UtilityConfig().strong

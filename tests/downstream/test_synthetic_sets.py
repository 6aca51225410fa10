"""The generators of the study: what they learn from, which labels reach them and the filter, and
what anchored synthesis makes of a labelled image."""

import json

import numpy as np
import pytest
import torch

import medvae.downstream.study as study
import medvae.downstream.synthetic_sets as synthetic_sets
from medvae.config import UtilityConfig
from medvae.data.store import open_store
from medvae.downstream.networks import LabelledSet, from_store, train_downstream
from medvae.downstream.study import run_utility
from medvae.downstream.subsets import SOURCE_ROW, subset_rows
from medvae.synthesis import anchored, audit
from medvae.synthesis.sampling import decode_latents
from medvae.training.checkpoint import load_model
from tests.factories import FAST_STUDY as FAST
from tests.factories import TINY_GENERATOR, relabelled_store


class _Stop(Exception):
    pass


def _capture_training(monkeypatch):
    seen = []

    def fake_train(store, run, cfg, device, resume):
        seen.append((store, cfg, resume))
        raise _Stop

    monkeypatch.setattr(synthetic_sets, "train", fake_train)
    return seen


@pytest.mark.parametrize("task", ["classify", "segment"])
def test_a_cell_generator_trains_on_its_labelled_subset_only(task, class_store, mask_store, tmp_path, monkeypatch):
    store = class_store if task == "classify" else mask_store
    seen = _capture_training(monkeypatch)
    cfg = UtilityConfig(task=task, fractions=[0.34], seeds=1, unlabelled="none", generator_steps=7,
                        downstream_steps=2, batch_size=4)
    with pytest.raises(_Stop):
        run_utility(store, tmp_path / "out", cfg, device="cpu")
    (subset, gen, resume), = seen
    assert resume  # a half-trained generator continues from its last.pt
    rows = subset_rows(store, task, 0.34, seed=0)
    assert np.array_equal(subset.index[SOURCE_ROW].astype(int), rows)
    assert np.array_equal(subset.get(slice(None)), store.get(rows))
    assert subset.splits == ["train"]  # no val split: its labels would choose the checkpoint
    assert gen.model.condition == cfg.generator_condition and gen.train.max_steps == 7 and gen.train.seed == 0
    assert gen.train.batch_size <= len(rows)
    assert (tmp_path / "out/cells/0.34_s0/real.json").is_file()  # the real arm needs no generator


def test_the_unlabelled_generator_sees_every_train_image_and_no_label(class_store, tmp_path, monkeypatch):
    seen = _capture_training(monkeypatch)
    cfg = UtilityConfig(labels_per_class=[2], seeds=1, downstream_steps=2, batch_size=4)
    with pytest.raises(_Stop):
        run_utility(class_store, tmp_path / "out", cfg, device="cpu")
    (pool, gen, _), = seen
    train = class_store.select("train")
    assert np.array_equal(pool.index[SOURCE_ROW].astype(int), train)
    assert np.array_equal(pool.get(slice(None)), class_store.get(train))
    assert "class" not in pool.index and pool.labels is None and not pool.classes
    assert gen.model.condition == "none"
    assert (tmp_path / "out/generator").name == "generator"  # one generator for the whole study


@pytest.mark.parametrize("synthesis_kind", ["neighbours", "prior"])
def test_no_label_outside_the_budget_reaches_generator_or_filter(synthesis_kind, class_store, tmp_path,
                                                                monkeypatch):
    """Two stores that differ only in the labels of train images outside the budget give the same
    generator, the same filtered synthetic set and the same scores."""
    rows = subset_rows(class_store, "classify", None, seed=0, per_class=3)
    other = relabelled_store(class_store, tmp_path / "relabelled", rows)
    monkeypatch.setattr(study, "subset_rows", lambda *a, **k: rows)  # the same labelled rows in both stores
    cfg = UtilityConfig(labels_per_class=[3], synthesis=synthesis_kind, arms=["real", "real+synthetic"], **FAST)
    a = run_utility(class_store, tmp_path / "a", cfg, device="cpu")
    b = run_utility(other, tmp_path / "b", cfg, device="cpu")
    syn_a, syn_b = (open_store(tmp_path / d / "cells/3pc_s0/synthetic_store") for d in "ab")
    assert np.array_equal(syn_a.get(slice(None)), syn_b.get(slice(None)))
    assert syn_a.index["class"].tolist() == syn_b.index["class"].tolist()
    assert a["arms"] == b["arms"]


def test_neighbour_variants_decode_near_their_image_and_keep_its_label(class_store, tmp_path):
    cfg = UtilityConfig(labels_per_class=[4], neighbour_range=(0.2, 0.2), arms=["real", "real+synthetic"],
                        drop_flagged=False, filter_threshold=0.0, **FAST)
    run_utility(class_store, tmp_path / "out", cfg, device="cpu")
    cell = tmp_path / "out/cells/4pc_s0"
    real, syn = open_store(cell / "real_store"), open_store(cell / "synthetic_store")
    assert len(syn) == 3 * len(real)  # per_image variants of every labelled image, none filtered
    model, _ = load_model(tmp_path / "out/generator/checkpoints/last.pt")
    mu, _ = anchored.encode(model, real.get(slice(None)))
    recon = decode_latents(model, torch.from_numpy(mu)).numpy()
    anchor = {r: i for i, r in enumerate(real.index[SOURCE_ROW].astype(int).tolist())}
    pool = open_store(tmp_path / "out/unlabelled_store")
    pool_mu, _ = anchored.encode(model, pool.get(slice(None)))
    for j in range(len(syn)):
        i = anchor[int(syn.index[SOURCE_ROW][j])]
        assert syn.index["class"][j] == real.index["class"][i]  # the anchor's label
        # a fifth of the way to a neighbour: closer to the anchor's reconstruction than the farthest
        # pool image's reconstruction is
        d = np.abs(syn.get(j) - recon[i]).mean()
        far = decode_latents(model, torch.from_numpy(pool_mu[np.argmax(((pool_mu - mu[i]) ** 2).sum(1))][None]))
        assert d < np.abs(far.numpy()[0] - recon[i]).mean()
    info = syn.meta["synthetic"]
    assert info["candidates"] == info["kept"] == len(syn) and 0 <= info["fidelity"] <= 1


def test_variant_latents_closed_form():
    mu = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    pool = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    near = anchored.nearest(mu, pool, 2)
    want = np.argsort(((mu[:, None] - pool[None]) ** 2).sum(-1), 1)[:, :2]
    assert np.array_equal(near, want)
    z = anchored.variant_latents(mu, np.zeros_like(mu), pool, near, "neighbours", seed=0, lam_range=(0.3, 0.3))
    np.testing.assert_allclose(z.reshape(3, 2, 4), mu[:, None] + 0.3 * (pool[near] - mu[:, None]), atol=1e-6)
    # same-class neighbours only, never the anchor itself
    groups = np.array([0, 1, 0])
    near = anchored.nearest(mu, mu, 1, exclude=np.arange(3), anchor_groups=groups, pool_groups=groups)
    assert near[:, 0].tolist() == [2, -1, 0]


def test_generated_cell_end_to_end_and_resumed(class_store, tmp_path, monkeypatch):
    cfg = UtilityConfig(fractions=[0.5], **FAST)
    summary = run_utility(class_store, tmp_path / "out", cfg, device="cpu")
    cell = tmp_path / "out/cells/0.5_s0"
    syn = open_store(cell / "synthetic_store")
    info = syn.meta["synthetic"]
    assert info["candidates"] == 3 * 15 and len(syn) == info["kept"] and set(syn.index["source"]) == {"synthetic"}
    assert json.loads((tmp_path / "out/generator/run.json").read_text())["step"] == 4
    assert summary["arms"]["real+classical+synthetic"]["0.5"]["accuracy"]["n"] == 1
    assert summary["filter"]["0.5"]["kept_fraction"]["mean"] == pytest.approx(len(syn) / 45)
    # resumed: a lost arm is retrained from the stored synthetic set, the generator is not touched
    (cell / "synthetic.json").unlink()
    monkeypatch.setattr(synthetic_sets, "train", lambda *a, **k: pytest.fail("generator retrained"))
    again = run_utility(class_store, tmp_path / "out", cfg, device="cpu")
    assert again["arms"] == summary["arms"]


def test_joint_mask_generator_makes_label_maps(mask_store, tmp_path):
    cfg = UtilityConfig(task="segment", fractions=[0.5], synthesis="prior", ratio=2.0, arms=["real", "synthetic"],
                        **FAST)
    summary = run_utility(mask_store, tmp_path / "out", cfg, device="cpu")
    syn = open_store(tmp_path / "out/cells/0.5_s0/synthetic_store")
    assert syn.labels is not None and syn.patches.shape[1:] == mask_store.patches.shape[1:]
    assert int(np.max(syn.labels)) <= 2  # label values of the real store
    assert summary["metrics"] == ["dice", "hd95"] and summary["arms"]["synthetic"]["0.5"]["dice"]["n"] == 1


def test_a_trained_run_can_serve_as_the_unlabelled_generator(class_store, mask_store, tmp_path, monkeypatch):
    from medvae.config import TrainStageConfig
    from medvae.errors import InputError
    from medvae.training.trainer import train

    gen_cfg = TrainStageConfig.model_validate({**TINY_GENERATOR, "model": {**TINY_GENERATOR["model"], "name": "vae"},
                                               "train": {**TINY_GENERATOR["train"], "max_steps": 2}})
    train(class_store, tmp_path / "run", gen_cfg, device="cpu")
    monkeypatch.setattr(synthetic_sets, "train", lambda *a, **k: pytest.fail("a generator was trained"))
    cfg = UtilityConfig(labels_per_class=[2], arms=["real", "real+synthetic"], generator_run=str(tmp_path / "run"),
                        **{k: v for k, v in FAST.items() if k != "generator"})
    summary = run_utility(class_store, tmp_path / "out", cfg, device="cpu")
    assert summary["arms"]["real+synthetic"]["2pc"]["accuracy"]["n"] == 1
    info = open_store(tmp_path / "out/cells/2pc_s0/synthetic_store").meta["synthetic"]
    assert info["checkpoint"].startswith(str(tmp_path / "run"))
    with pytest.raises(InputError, match="not a run trained on"):
        synthetic_sets.given_generator(tmp_path / "run", mask_store)
    conditional = gen_cfg.model_copy(deep=True)
    conditional.model.condition = "class"
    train(class_store, tmp_path / "class_run", conditional, device="cpu")
    with pytest.raises(InputError, match="may see no label"):
        synthetic_sets.given_generator(tmp_path / "class_run", class_store)


def test_a_filter_that_keeps_nothing_adds_nothing(class_store):
    """Candidates the audit flags all (exact copies of training images) are never trained on: the kept set is
    empty and a +synthetic arm trains as its base arm, weight for weight."""
    rows = class_store.select("train")
    images = class_store.get(rows)
    copies = synthetic_sets.Candidates(images, np.zeros(len(rows), dtype=np.int64), None, rows)
    reference = audit.build_reference(class_store, torch.device("cpu"))
    kept, info = synthetic_sets.filter_candidates(copies, UtilityConfig(drop_flagged=True), None, reference)
    assert info["flagged"] == info["candidates"] == len(rows) and info["kept"] == len(kept.images) == 0
    data = from_store(class_store, rows, "classify", class_store.classes)
    empty = LabelledSet(torch.from_numpy(kept.images), torch.from_numpy(kept.classes))
    base = train_downstream("classify", data, 3, 5, 8, 1e-3, seed=2)
    with_none = train_downstream("classify", data, 3, 5, 8, 1e-3, seed=2, synthetic=empty)
    for a, b in zip(base.state_dict().values(), with_none.state_dict().values()):
        assert torch.equal(a, b)


def test_an_empty_synthetic_set_of_label_maps_reads_back_empty(mask_store, tmp_path):
    """A segmentation cell whose filter kept nothing: its store has no rows (and so no labels.npy); the arms get
    an empty set of the real images' and maps' shapes."""
    h = mask_store.patches.shape[-1]
    none = synthetic_sets.Candidates(np.zeros((0, 1, h, h), np.float32), None, np.zeros((0, 1, h, h), np.uint8),
                                     np.zeros(0, np.int64))
    syn = synthetic_sets.write_synthetic_store(tmp_path / "syn", none, mask_store, {"kept": 0})
    got = study.synthetic_set(syn, mask_store, "segment", mask_store.classes)
    assert got.images.shape == (0, 1, h, h) and got.targets.shape == (0, 1, h, h)

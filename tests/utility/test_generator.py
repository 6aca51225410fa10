"""The per-cell generator: trained on the cell's real subset only, sampled into a labelled synthetic
store, resumed rather than retrained."""

import json

import numpy as np
import pytest

import medvae.utility.synthesis as synthesis
from medvae.config import UtilityConfig
from medvae.data.store import open_store
from medvae.utility.study import run_utility
from medvae.utility.subsets import SOURCE_ROW, subset_rows

TINY_GENERATOR = {"model": {"channels": [8, 16], "latent_dim": 8, "disc_channels": 8, "disc_layers": 2},
                  "train": {"batch_size": 8, "lr": 2e-3, "warmup_steps": 1, "beta_warmup_steps": 2,
                            "checkpoint_every": 2, "log_every": 1, "disc_start": 1, "amp": "off"}}


class _Stop(Exception):
    pass


@pytest.mark.parametrize("task", ["classify", "segment"])
def test_generator_trains_on_the_subset_only(task, class_store, mask_store, tmp_path, monkeypatch):
    store = class_store if task == "classify" else mask_store
    seen = []

    def fake_train(subset, run, cfg, device, resume):
        seen.append((subset, cfg, resume))
        raise _Stop

    monkeypatch.setattr(synthesis, "train", fake_train)
    cfg = UtilityConfig(task=task, fractions=[0.34], seeds=1, generator_steps=7, downstream_steps=2, batch_size=4)
    with pytest.raises(_Stop):
        run_utility(store, tmp_path / "out", cfg, device="cpu")
    (subset, gen, resume), = seen
    assert resume  # a half-trained generator continues from its last.pt
    rows = subset_rows(store, task, 0.34, seed=0)
    assert np.array_equal(subset.index[SOURCE_ROW].astype(int), rows)
    assert np.array_equal(subset.get(slice(None)), store.get(rows))
    assert subset.splits == ["train"]  # no val split: its labels would choose the checkpoint
    assert set(store.index["split"][rows]) == {"train"}
    assert gen.model.condition == cfg.generator_condition and gen.train.max_steps == 7 and gen.train.seed == 0
    assert gen.train.batch_size <= len(rows)
    assert (tmp_path / "out/cells/f0.34_s0/real.json").is_file()  # the real arm needs no generator


def test_generated_cell_end_to_end_and_resumed(class_store, tmp_path, monkeypatch):
    cfg = UtilityConfig(fractions=[0.5], seeds=1, generator_steps=4, downstream_steps=4, batch_size=8,
                        generator=TINY_GENERATOR)
    summary = run_utility(class_store, tmp_path / "out", cfg, device="cpu")
    cell = tmp_path / "out/cells/f0.5_s0"
    syn = open_store(cell / "synthetic_store")
    assert len(syn) == 15 and set(syn.index["source"]) == {"synthetic"}
    assert np.bincount(syn.class_ids()).tolist() == [5, 5, 5]  # balanced over the classes
    run = json.loads((cell / "generator/run.json").read_text())
    assert run["status"] == "done" and run["step"] == 4
    assert json.loads((cell / "synthetic.json").read_text())["n_train"] == 15
    assert summary["arms"]["real+synthetic"]["0.5"]["accuracy"]["n"] == 1
    # resumed: a lost arm is retrained from the stored synthetic set, the generator is not touched
    (cell / "synthetic.json").unlink()
    monkeypatch.setattr(synthesis, "train", lambda *a, **k: pytest.fail("generator retrained"))
    again = run_utility(class_store, tmp_path / "out", cfg, device="cpu")
    assert again["arms"] == summary["arms"]


def test_joint_mask_generator_makes_label_maps(mask_store, tmp_path):
    cfg = UtilityConfig(task="segment", fractions=[0.5], seeds=1, generator_steps=4, downstream_steps=2,
                        batch_size=4, ratio=2.0, generator=TINY_GENERATOR)
    summary = run_utility(mask_store, tmp_path / "out", cfg, device="cpu")
    syn = open_store(tmp_path / "out/cells/f0.5_s0/synthetic_store")
    assert len(syn) == 18 and syn.labels is not None and syn.patches.shape[1:] == mask_store.patches.shape[1:]
    assert int(np.max(syn.labels)) <= 2  # label values of the real store
    assert summary["metrics"] == ["dice", "hd95"] and summary["arms"]["synthetic"]["0.5"]["dice"]["n"] == 1

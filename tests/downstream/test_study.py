"""The study end to end with a given synthetic store (no generator): outputs, arms treated alike,
resumption per (budget, seed, arm), the verdict, and the command line's errors and export."""

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

import medvae.downstream.study as study
from medvae.cli import app
from medvae.config import DEFAULT_ARMS as ARMS
from medvae.config import UtilityConfig, parse_config
from medvae.downstream.subsets import labelled_rows
from medvae.downstream.synthetic_sets import Candidates, generator_config, write_synthetic_store
from medvae.errors import ConfigError, InputError

SMALL = {"fractions": [0.5, 1.0], "seeds": 2, "downstream_steps": 12, "batch_size": 8, "lr": 3e-3}


def copy_of_train(store, path, task):
    """A 'synthetic' store that is the real train split itself, in store order."""
    rows = labelled_rows(store, "train", task)
    classes = store.class_ids(rows) if task == "classify" else None
    masks = np.asarray(store.labels)[rows] if task == "segment" else None
    return write_synthetic_store(path, Candidates(store.get(rows), classes, masks, rows), store, {"copy": True})


@pytest.fixture(scope="module")
def classify_study(class_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    syn = copy_of_train(class_store, root / "syn", "classify")
    summary = study.run_utility(class_store, root / "out", UtilityConfig(**SMALL), device="cpu", synthetic=syn.path)
    return root / "out", syn, summary


def test_outputs(classify_study):
    out, _, summary = classify_study
    with open(out / "utility.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["arm", "budget", "fraction", "labels_per_class", "seed", "metric", "value"]
    assert len(rows) == 2 * 2 * 6 * 2  # budgets x seeds x (5 arms + label fidelity) x metrics
    assert {r["arm"] for r in rows} == {*ARMS, "fidelity"}
    saved = json.loads((out / "utility.json").read_text())
    assert saved["metrics"] == ["accuracy", "macro_f1"] and saved["arms"]["real"]["0.5"]["accuracy"]["n"] == 2
    # label fidelity is the synthetic set's, not an arm: no interval among the arms, no paired difference
    assert set(saved["paired_differences"]) == {f"{a} - real" for a in ARMS[1:]} | {
        "real+classical+synthetic - real+classical"}
    assert set(saved["arms"]) == set(ARMS) and set(saved["label_fidelity"]) == {"0.5", "1"}
    assert [v["budget"] for v in saved["verdict"]["budgets"]] == ["0.5", "1"]
    assert (out / "utility.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "real+classical+synthetic" in page and "http" not in page
    assert saved["verdict"]["budgets"][0]["sentence"] in page  # the verdict per budget
    assert summary["arms"] == saved["arms"]
    for cell in (out / "cells").iterdir():  # every arm's network, saved for --export-model
        assert sorted(p.stem for p in cell.glob("*.pt")) == sorted(ARMS)


def test_synthetic_copy_of_the_subset_scores_as_the_real_arm(classify_study):
    """At fraction 1 the 'synthetic' set is the real subset: same data, seed and steps -> same scores."""
    out, _, _ = classify_study
    for seed in range(2):
        real = json.loads((out / f"cells/1_s{seed}/real.json").read_text())
        syn = json.loads((out / f"cells/1_s{seed}/synthetic.json").read_text())
        assert syn["metrics"] == pytest.approx(real["metrics"], abs=1e-9)
        assert syn["n_synthetic"] == real["n_real"] == 30


def test_every_arm_gets_the_same_steps_and_real_images(classify_study):
    out, _, _ = classify_study
    for cell in (out / "cells").iterdir():
        arms = {a: json.loads((cell / f"{a}.json").read_text()) for a in ARMS}
        assert {r["steps"] for r in arms.values()} == {SMALL["downstream_steps"]}
        seen = {a: r["real_images_seen"] for a, r in arms.items() if a != "synthetic"}
        assert len(set(seen.values())) == 1 and next(iter(seen.values())) > 0


def test_rerun_skips_finished_arms(classify_study, class_store, monkeypatch):
    out, syn, summary = classify_study
    calls = []
    train = study.train_downstream
    monkeypatch.setattr(study, "train_downstream", lambda *a, **k: calls.append((a, k)) or train(*a, **k))
    again = study.run_utility(class_store, out, UtilityConfig(**SMALL), device="cpu", synthetic=syn.path)
    assert calls == [] and again["arms"] == summary["arms"]
    (out / "cells/0.5_s1/real+synthetic.json").unlink()
    again = study.run_utility(class_store, out, UtilityConfig(**SMALL), device="cpu", synthetic=syn.path)
    (args, kwargs), = calls  # the one missing arm: half the real set, the copy in every batch
    assert len(args[1]) == 15 and len(kwargs["synthetic"]) == 30
    assert again["arms"] == summary["arms"]  # retrained to the same scores
    with pytest.raises(InputError, match="config.downstream_steps"):
        study.run_utility(class_store, out, UtilityConfig(**{**SMALL, "downstream_steps": 3}), device="cpu",
                          synthetic=syn.path)
    # a study grows by an arm: the new arm trains, the finished ones are read (their results not rewritten)
    finished = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/*.json")}
    grown = study.run_utility(class_store, out, UtilityConfig(**SMALL, arms=[*UtilityConfig(**SMALL).arms, "pseudo"]),
                              device="cpu", synthetic=syn.path)
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert sorted(p.name for p in out.glob("cells/*/pseudo.json")) == ["pseudo.json"] * len(list(out.glob("cells/*")))
    assert {a: grown["arms"][a] for a in summary["arms"]} == summary["arms"] and "pseudo" in grown["arms"]


def test_labels_per_class_budgets(class_store, tmp_path):
    syn = copy_of_train(class_store, tmp_path / "syn", "classify")
    cfg = UtilityConfig(labels_per_class=[2, 4], seeds=1, arms=["real"], downstream_steps=2, batch_size=4)
    summary = study.run_utility(class_store, tmp_path / "out", cfg, device="cpu", synthetic=syn.path)
    assert [b["key"] for b in summary["budgets"]] == ["2pc", "4pc"]
    real = json.loads((tmp_path / "out/cells/4pc_s0/real.json").read_text())
    assert real["n_real"] == 12  # 4 of each of 3 classes
    with open(tmp_path / "out/utility.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert row["labels_per_class"] == "2" and float(row["fraction"]) == pytest.approx(6 / 30)


def test_segment_study(mask_store, tmp_path):
    syn = copy_of_train(mask_store, tmp_path / "syn", "segment")
    cfg = UtilityConfig(task="segment", fractions=[0.5], seeds=1, downstream_steps=3, batch_size=4)
    summary = study.run_utility(mask_store, tmp_path / "out", cfg, device="cpu", synthetic=syn.path)
    assert summary["metrics"] == ["dice", "hd95"]
    real = json.loads((tmp_path / "out/cells/0.5_s0/real.json").read_text())
    assert real["n_real"] == 9  # 3 of 6 patients, 3 slices each
    assert 0.0 <= real["metrics"]["dice"] <= 1.0 and real["metrics"]["hd95"] >= 0.0


def _cli(*args):
    return CliRunner().invoke(app, ["utility", *map(str, args)])


@pytest.mark.parametrize("options, message", [
    (["--task", "count"], "'task'"), (["--fractions", "0.1,lots"], "--fractions"), (["--fractions", "0,1"], "(0, 1]"),
    (["--labels-per-class", "10,x"], "--labels-per-class"), (["--arms", "real,real+magic"], "arms"),
    (["--task", "segment"], "no labels.npy")])
def test_cli_errors(class_store, tmp_path, options, message):
    res = _cli(class_store.path, "--out", tmp_path / "o", *options)
    assert res.exit_code == 2 and res.output.count("error:") == 1 and message in res.output


def test_cli_missing_store(tmp_path):
    res = _cli(tmp_path / "nowhere", "--out", tmp_path / "o")
    assert res.exit_code == 2 and res.output.count("error:") == 1 and "no patch store" in res.output


def test_generator_condition_follows_task_and_synthesis():
    assert UtilityConfig(task="segment").generator_condition == "mask"
    assert UtilityConfig().generator_condition == "none"  # neighbours of an unlabelled generator
    assert UtilityConfig(synthesis="prior", unlabelled="none").generator_condition == "class"
    assert UtilityConfig(synthesis="prior").generator_condition == "none"  # labelled by the real network
    with pytest.raises(ValueError, match="condition mask, not class"):
        UtilityConfig(task="segment", condition="class")
    with pytest.raises(ValueError, match="labels_per_class needs task classify"):
        UtilityConfig(task="segment", labels_per_class=[10])


def test_the_generator_settings_are_read_as_the_studys_model():
    vaegan = parse_config({"model": "vaegan", "generator": {"model": {"disc_channels": 16, "latent_dim": 8}}},
                          UtilityConfig)
    assert (vaegan.generator.model.name, vaegan.generator.model.disc_channels) == ("vaegan", 16)
    assert generator_config(vaegan, 100, seed=1).model.disc_channels == 16  # what the generators train
    assert UtilityConfig(model="vaegan").generator.model.name == "vaegan"
    with pytest.raises(ConfigError, match="disc_channels is an option of vaegan, not of model vae"):
        parse_config({"model": "vae", "generator": {"model": {"disc_channels": 16}}}, UtilityConfig)
    named = parse_config({"model": "vaegan", "generator": {"model": {"name": "vae", "latent_dim": 8}}}, UtilityConfig)
    assert named.generator.model.name == "vae"  # a name given is kept (generator_config sets the study's)


def test_the_evaluation_report_embeds_the_study(classify_study):
    from medvae.report.downstream import utility_tables
    from medvae.report.html import build_figures

    _, _, summary = classify_study
    tables = utility_tables(summary)
    assert list(tables) == ["accuracy (unitless, higher is better)", "macro F1 (unitless, higher is better)"]
    assert all("<table>" in t and "real+synthetic" in t for t in tables.values())
    figs = build_figures({"utility": summary, "per_patient": {}},
                         {"triptychs": {}, "modalities": [], "normalization": {}, "distributions": {},
                          "samples": {}, "samples_gmm": {}, "traversal": {}, "histograms": {}})
    assert figs["utility"] and figs["utility_tables"] == tables


def test_label_fidelity_is_the_real_network_scored_on_the_synthetic_labels(classify_study, class_store):
    """At fraction 1 the 'synthetic' set is the real subset: fidelity = the real arm's net on its own training data."""
    from medvae.downstream.networks import from_store, score_downstream, train_downstream

    out, syn, _ = classify_study
    cfg = UtilityConfig(**SMALL)
    real = from_store(class_store, labelled_rows(class_store, "train", "classify"), "classify", class_store.classes)
    net = train_downstream("classify", real, len(class_store.classes), cfg.downstream_steps, cfg.batch_size, cfg.lr,
                           0, "cpu")
    want = score_downstream("classify", net, from_store(syn, syn.select(), "classify", class_store.classes),
                    len(class_store.classes))
    got = json.loads((out / "cells/1_s0/fidelity.json").read_text())["metrics"]
    assert got == pytest.approx(want, abs=1e-9)


def test_cli_prints_the_verdict_and_exports_the_model(class_store, tmp_path):
    res = _cli(class_store.path, "--out", tmp_path / "o", "--fractions", "1.0", "--seeds", 1, "--downstream-steps", 3,
               "--arms", "real,real+classical", "--export-model", tmp_path / "model")
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "o/utility.json").read_text())
    (v,) = saved["verdict"]["budgets"]
    assert v["sentence"] in res.output and v["command"] in res.output
    assert v["command"].startswith(f"medvae utility {class_store.path} --fractions 1 --arms {v['arm']} --seeds 1 "
                                   "--downstream-steps 3 --out STUDY_DIR --export-model MODEL_DIR")
    assert json.loads((tmp_path / "model/model.json").read_text())["arm"] == v["arm"]
    assert (tmp_path / "model/model.ts").is_file()


def test_a_default_study_keeps_the_settings_of_before_the_model_families():
    """study.json's settings and the pipeline's utility key hash the flat model config of medvae <= 0.3, so a
    study made before the families resumes. The reference: the hash the pre-family code (ae502c0) wrote."""
    from medvae.files import sha256_json

    settings = UtilityConfig().stable_dump(exclude={"fractions", "labels_per_class", "seeds"})
    assert sha256_json(settings) == "ffb46cfe1e99e981672356ce49a9e5c4dd5f6575fc8e85001e3c9c9424bd9357"

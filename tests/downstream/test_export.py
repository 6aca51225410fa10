"""Each arm's network is saved with its result; --export-model writes the verdict's winner as TorchScript with its
metadata, and the reloaded file scores the test split as the study did (scikit-learn's accuracy of its argmax)."""

import json
import re

import pytest
import torch
from sklearn.metrics import accuracy_score

import medvae.downstream.study as study
from medvae.config import UtilityConfig
from medvae.downstream.export import export_model
from medvae.downstream.studydir import StudyDir
from medvae.downstream.subsets import labelled_rows
from medvae.errors import InputError

CFG = {"fractions": [0.5, 1.0], "seeds": 1, "arms": ["real", "real+classical"], "downstream_steps": 12,
       "batch_size": 8, "lr": 3e-3}


@pytest.fixture(scope="module")
def finished(class_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "out"
    summary = study.run_utility(class_store, out, UtilityConfig(**CFG), device="cpu")
    return StudyDir(out), summary


def test_no_synthetic_arm_makes_no_synthetic_set(finished):
    out, summary = finished
    assert sorted(p.name for p in out.cell("1", 0).path.glob("*.json")) == ["real+classical.json", "real.json"]
    assert not out.cell("1", 0).synthetic_store.exists() and summary["label_fidelity"] == {}


def test_the_exported_model_reloads_and_scores_as_in_the_study(finished, class_store, tmp_path):
    from monai.data import load_net_with_metadata

    out, summary = finished
    path = export_model(out, class_store, tmp_path / "model")
    results = {a: json.loads(out.cell("1", 0).result(a).read_text()) for a in CFG["arms"]}
    best = max(results, key=lambda a: results[a]["metrics"]["accuracy"])  # one seed: the mean is seed 0's value
    net, meta, _ = load_net_with_metadata(str(path))
    assert meta["arm"] == best == summary["verdict"]["budgets"][-1]["arm"] and meta["budget"] == "1"
    assert meta["class_names"] == ["disc", "hbar", "vbar"] and meta["input"]["shape"] == [1, 32, 32]
    assert meta["input"]["normalization"] == class_store.normalization("image")
    assert meta["test_metrics"] == results[best]["metrics"]
    assert json.loads((tmp_path / "model/model.json").read_text())["arm"] == best
    rows = labelled_rows(class_store, "test", "classify")
    with torch.no_grad():
        pred = torch.jit.load(str(path))(torch.from_numpy(class_store.get(rows))).argmax(1).numpy()
    want = results[best]["metrics"]["accuracy"]
    assert accuracy_score(class_store.class_ids(rows), pred) == pytest.approx(want, abs=1e-12)


def test_a_study_made_before_saved_networks_says_to_rerun_the_arm(finished, class_store, tmp_path):
    out, summary = finished
    arm = summary["verdict"]["budgets"][-1]["arm"]
    saved = out.cell("1", 0).network(arm)
    kept = saved.read_bytes()
    saved.unlink()
    try:
        again = study.run_utility(class_store, out.path, UtilityConfig(**CFG), device="cpu")  # resumes, reports
        assert again["arms"] == summary["arms"] and not saved.exists()
        with pytest.raises(InputError, match=f"remove .*{re.escape(arm)}.json and re-run"):
            export_model(out, class_store, tmp_path / "model")
    finally:
        saved.write_bytes(kept)

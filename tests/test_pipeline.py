"""End to end: a tiny pipeline on a tiny phantom cohort, a no-op re-run, and a kill + resume."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from medvae.errors import ConfigError
from medvae.pipeline import load_pipeline, run_pipeline
from tests.factories import phantom_cohort

TINY = {
    "device": "cpu",
    "discover": {"split": {"train": 0.34, "val": 0.33, "test": 0.33, "seed": 4}},
    "prepare": {"patch_size": 128, "mode": "resize", "foreground_threshold": 0.05, "workers": 1},
    "models": {
        name: {
            "model": {"name": name, "latent_dim": 8, "channels": [8, 8, 16, 16], "res_units": 1,
                      "norm_groups": 4, **({"disc_channels": 8, "disc_layers": 2} if name == "vaegan" else {})},
            "train": {"batch_size": 4, "max_steps": steps, "warmup_steps": 1, "beta_warmup_steps": 2,
                      "checkpoint_every": 2, "log_every": 1, "disc_start": 2, "val_batches": 1},
        }
        for name, steps in (("vae", 6), ("vaegan", 4))
    },
    "evaluate": {"split": "test", "iwae_k": 2, "mmd_samples": 16, "mmd_permutations": 10, "batch_size": 16,
                 "feature_steps": 3},
    "generate": {"model": "vaegan", "n": 4, "format": "nifti", "batch_size": 4},
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    scans = tmp_path_factory.mktemp("scans")
    phantom_cohort(scans, ct_patients=3, microscopy_stacks=1, seed=1, ct_size=64, ct_slices=6)
    return scans


def _pipeline(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, **overrides}))
    return path


def _mtimes(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and p.name != "state.json"}


def test_pipeline_end_to_end_then_noop(cohort, tmp_path):
    out = tmp_path / "run"
    state = run_pipeline(_pipeline(tmp_path), cohort, out)
    stages = ["discover", "prepare", "train:vae", "train:vaegan", "evaluate", "generate"]
    assert all(state[s]["status"] == "done" for s in stages)

    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert {r["patient_id"] for r in rows} >= {"PANCREAS_0001", "PANCREAS_0002", "PANCREAS_0003"}
    assert {r["modality"] for r in rows} == {"ct", "microscopy"}
    store = json.loads((out / "store" / "store.json").read_text())
    assert store["n_patches"] > 0 and store["patch_size"] == 128
    for name, steps in (("vae", 6), ("vaegan", 4)):
        assert (out / "models" / name / "checkpoints" / "best.pt").is_file()
        log = [json.loads(line) for line in open(out / "models" / name / "train_log.jsonl")]
        assert log[-1]["step"] == steps
    metrics = list(csv.DictReader(open(out / "report" / "metrics.csv")))
    assert {"run", "patient_id", "modality", "split", "metric", "value", "n"} <= set(metrics[0])
    assert {m["run"] for m in metrics} == {"vae", "vaegan"}  # the compare table has both runs
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert {"per_patient", "per_modality", "cohort"} <= set(summary)
    html = (out / "report" / "report.html").read_text()
    assert "<img" in html and "PHANTOM^" not in html  # pictures inline; no DICOM identity
    synth = list(csv.DictReader(open(out / "synthetic" / "manifest.csv")))
    assert len(synth) == 4 and all((out / "synthetic" / r["path"]).is_file() or Path(r["path"]).is_file()
                                   for r in synth)

    recorded = json.loads((out / "state.json").read_text())
    assert state["timings"] == [{"stage": s, "seconds": recorded[s]["seconds"], "ran": True} for s in stages]
    assert "timings" not in recorded  # this invocation's, not state

    before = _mtimes(out)
    again = run_pipeline(_pipeline(tmp_path), cohort, out)
    assert all(again[s]["seconds"] == state[s]["seconds"] for s in stages)  # nothing re-ran
    assert again["timings"] == [{**t, "ran": False} for t in state["timings"]]
    assert _mtimes(out) == before


def test_run_and_demo_print_each_stage_wall_time(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import medvae.pipeline
    from medvae.cli import app

    state = {"paths": {"report": "R/report.html", "synthetic": "R/synthetic"},
             "timings": [{"stage": "phantom", "seconds": None, "ran": False},
                         {"stage": "discover", "seconds": 1.25, "ran": False},
                         {"stage": "train:vae", "seconds": 75.0, "ran": True},
                         {"stage": "generate", "seconds": 3.0, "ran": True}]}
    monkeypatch.setattr(medvae.pipeline, "run_pipeline", lambda *a, **k: state)
    monkeypatch.setattr(medvae.pipeline, "demo", lambda *a, **k: state)
    for args in (["run", "demo", "--scans", str(tmp_path), "--out", str(tmp_path / "o")], ["demo"]):
        res = CliRunner().invoke(app, args, terminal_width=120)
        assert res.exit_code == 0, res.output
        lines = res.output.splitlines()
        row = {name: next(line for line in lines if line.strip("│ ").startswith(name))
               for name in ("phantom", "discover", "train:vae", "generate", "total")}
        assert "?" in row["phantom"] and "up to date, skipped" in row["discover"]
        assert "1 min 15 s" in row["train:vae"] and "skipped" not in row["train:vae"]
        assert "1 min 18 s" in row["total"]  # 75 + 3: only the stages that ran now
        assert "R/report.html" in res.output and "R/synthetic" in res.output


def test_changed_config_reruns_only_downstream(cohort, tmp_path):
    out = tmp_path / "run"
    first = run_pipeline(_pipeline(tmp_path), cohort, out)
    changed = {**TINY["generate"], "n": 3}
    second = run_pipeline(_pipeline(tmp_path, generate=changed), cohort, out)
    for stage in ("discover", "prepare", "train:vae", "train:vaegan", "evaluate"):
        assert second[stage]["seconds"] == first[stage]["seconds"]
    assert len(list(csv.DictReader(open(out / "synthetic" / "manifest.csv")))) == 3


def test_killed_during_training_then_rerun_finishes(cohort, tmp_path):
    steps = 40
    models = {"vae": {**TINY["models"]["vae"], "train": {**TINY["models"]["vae"]["train"], "max_steps": steps}}}
    pipeline = _pipeline(tmp_path, models=models, generate={**TINY["generate"], "model": "vae"})
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "medvae", "run", str(pipeline), "--scans", str(cohort),
                             "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / "models" / "vae" / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists(), "training never wrote a checkpoint before the kill"
    state = json.loads((out / "state.json").read_text())
    assert state["train:vae"]["status"] == "running"

    done = run_pipeline(pipeline, cohort, out)
    assert done["train:vae"]["status"] == done["generate"]["status"] == "done"
    log = [json.loads(line) for line in open(out / "models" / "vae" / "train_log.jsonl")]
    assert [e["step"] for e in log] == sorted({e["step"] for e in log})  # resumed, not restarted twice
    assert log[-1]["step"] == steps


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  vae:\n    train: {max_stepz: 3}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'models\.vae\.train\.max_stepz'"):
        load_pipeline(path)


def test_every_shipped_pipeline_validates():
    for path in (Path(__file__).parents[1] / "pipelines").glob("*.yaml"):
        assert load_pipeline(path).models


def test_sweep_expands_every_model_into_named_variants(tmp_path):
    import yaml

    from medvae.errors import ConfigError
    from medvae.pipeline import load_pipeline

    data = {"models": {"vae": {"model": {"name": "vae", "latent_dim": 8}}, "gan": {"model": {"name": "vaegan"}}},
            "sweep": {"model.latent_dim": [4, 16], "model.upsample": ["nearest", "transpose"]},
            "generate": {"model": "gan"}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    config = load_pipeline(path)
    assert list(config.models) == [f"{m}[latent_dim={d},upsample={u}]" for m in ("vae", "gan")
                                   for d in (4, 16) for u in ("nearest", "transpose")]
    v = config.models["gan[latent_dim=16,upsample=transpose]"]
    assert (v.model.name, v.model.latent_dim, v.model.upsample) == ("vaegan", 16, "transpose")
    assert config.generate.model == "gan[latent_dim=4,upsample=nearest]" and config.sweep == {}
    path.write_text(yaml.safe_dump({**data, "sweep": {"model.latent_dmi": [4]}}))
    with pytest.raises(ConfigError, match="unknown sweep key 'model.latent_dmi'"):
        load_pipeline(path)
    path.write_text(yaml.safe_dump({**data, "sweep": {"model.upsample": ["bilinear"]}}))
    with pytest.raises(ConfigError, match="sweep upsample=bilinear: bad value for 'model.upsample'"):
        load_pipeline(path)

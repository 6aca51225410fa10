"""The wheel carries what `medvae demo` and `medvae run NAME` need outside a checkout."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from medvae.config import PACKAGED_PIPELINES
from medvae.errors import ConfigError
from medvae.pipeline import pipeline_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from this checkout (no build isolation: offline, about a second)."""
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (path,) = out.glob("medvae-*.whl")
    return path


def test_wheel_contains_pipelines_manifests_and_template(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"medvae/pipelines/{p.name}" for p in (REPO / "medvae" / "pipelines").glob("*.yaml")}
    assert "medvae/pipelines/demo.yaml" in expected  # the glob found the pipelines folder
    expected |= {"medvae/data_manifests/tcia_pancreas_ct.csv", "medvae/data_manifests/msd_task07_pancreas.csv",
                 "medvae/cli/__init__.py"}
    expected |= {f"medvae/report/templates/{p.name}" for p in (REPO / "medvae" / "report" / "templates").iterdir()}
    assert expected <= names


def test_packaged_pipelines_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout
    assert pipeline_path("demo") == PACKAGED_PIPELINES / "demo.yaml"
    assert pipeline_path("pancreas_ct.yaml") == PACKAGED_PIPELINES / "pancreas_ct.yaml"
    own = tmp_path / "demo.yaml"
    own.write_text("models: {}\n")
    assert pipeline_path("demo.yaml") == Path("demo.yaml")  # a file of that name here wins
    packaged = "ct_lowdose, demo, fashion_mnist, fashion_mnist_sweep, latent_diffusion128, microscopy"
    with pytest.raises(ConfigError, match=f"nope: pipeline YAML not found.*{packaged}"):
        pipeline_path("nope")


def test_a_folder_never_hides_a_packaged_pipeline(tmp_path, monkeypatch):
    """`medvae demo --out demo` creates ./demo; the name still means the packaged pipeline."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    (tmp_path / "pancreas_ct.yaml").mkdir()
    assert pipeline_path("demo") == PACKAGED_PIPELINES / "demo.yaml"
    assert pipeline_path("pancreas_ct.yaml") == PACKAGED_PIPELINES / "pancreas_ct.yaml"
    (tmp_path / "sub" / "mine").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"sub/mine: is a directory, not a pipeline YAML"):
        pipeline_path("sub/mine")


@pytest.mark.slow
def test_installed_wheel_runs_the_demo_in_a_folder_named_demo(wheel, tmp_path):
    """The wheel installed apart from the checkout (pip --target, offline, dependencies from this
    interpreter) runs `medvae demo --out demo --quick` in an empty folder."""
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                           "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    work = tmp_path / "work"
    work.mkdir()
    # PYTHONPATH puts the installed copy before the editable install's finder (which sys.meta_path
    # appends), so the checkout's files are not what runs.
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import medvae; print(medvae.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=120)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr
    proc = subprocess.run([str(site / "bin" / "medvae"), "demo", "--out", "demo", "--quick"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = json.loads((work / "demo" / "run" / "state.json").read_text())
    assert state["generate"]["status"] == "done"
    assert (work / "demo" / "run" / "report" / "report.html").is_file()
    table = proc.stdout[proc.stdout.index("wall time"):]
    assert all(stage in table for stage in ("phantom", "discover", "prepare", "evaluate", "generate", "total"))

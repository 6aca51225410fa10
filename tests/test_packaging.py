"""The wheel carries what `medvae demo` and `medvae run NAME` need outside a checkout."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from medvae.config import PACKAGED_PIPELINES
from medvae.errors import ConfigError
from medvae.pipeline import pipeline_path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_contains_pipelines_manifests_and_templates(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("medvae-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"medvae/pipelines/{p.name}" for p in (REPO / "medvae" / "pipelines").glob("*.yaml")}
    expected |= {"medvae/data_manifests/tcia_pancreas_ct.csv", "medvae/data_manifests/msd_task07_pancreas.csv",
                 "medvae/cli/__init__.py"}
    expected |= {f"medvae/report/templates/{p.name}" for p in (REPO / "medvae" / "report" / "templates").iterdir()}
    assert len(expected) >= 7 and expected <= names


def test_packaged_pipelines_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout
    assert pipeline_path("demo") == PACKAGED_PIPELINES / "demo.yaml"
    assert pipeline_path("pancreas_ct.yaml") == PACKAGED_PIPELINES / "pancreas_ct.yaml"
    own = tmp_path / "demo.yaml"
    own.write_text("models: {}\n")
    assert pipeline_path("demo.yaml") == Path("demo.yaml")  # a file of that name here wins
    packaged = "ct_lowdose, demo, fashion_mnist, fashion_mnist_sweep, microscopy"
    with pytest.raises(ConfigError, match=f"nope: pipeline YAML not found.*{packaged}"):
        pipeline_path("nope")

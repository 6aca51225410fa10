"""The packaged denoising pipelines load, and one runs end to end in its quick form."""

import json

import pytest

from medvae.pipeline import load_pipeline, pipeline_path, run_pipeline
from tests.factories import phantom_cohort


@pytest.mark.parametrize("name,kind", [("microscopy_denoise", "poisson-gaussian"), ("ct_lowdose", "ct-lowdose")])
def test_denoise_pipelines_load(name, kind):
    config = load_pipeline(pipeline_path(name))
    assert all(m.task == "denoise" and m.noise.kind == kind for m in config.models.values())


@pytest.mark.slow
def test_microscopy_denoise_quick_run(tmp_path):
    scans = tmp_path / "scans"
    phantom_cohort(scans, ct_patients=0, microscopy_stacks=3, seed=0, ct_slices=None)
    state = run_pipeline("microscopy_denoise", scans, tmp_path / "run", quick=True)
    assert "generate" not in state and state["evaluate"]["status"] == "done"
    summary = json.loads((tmp_path / "run" / "report" / "summary.json").read_text())
    assert summary["noise"]["kind"] == "poisson-gaussian" and "medvae" in summary["methods"]

"""An image set end to end from the command line: IDX files -> 32² store -> train (no config) -> evaluate.

Every test image is its own "patient": evaluate must group them in one pass and the report must
show only ``report_patients`` patient sections.
"""

import json

from typer.testing import CliRunner

from medvae.cli import app
from medvae.evaluation.evaluate import report_patients
from tests.factories import random_idx_set


def test_idx_set_discover_prepare_train_evaluate(tmp_path):
    scans = tmp_path / "fashion-mnist"
    random_idx_set(scans, {"train": 96, "t10k": 40})
    cli = CliRunner()

    def ok(*args):
        res = cli.invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, res.output
        return res.output

    ok("discover", scans, "--out", tmp_path / "m.csv")
    out = ok("prepare", tmp_path / "m.csv", "--out", tmp_path / "store", "--patch-size", 32)
    assert "patches per class and split" in out and "Ankle boot" in out
    for model in ("vae", "monai-kl"):  # no --config: image size and channels from the store
        ok("train", tmp_path / "store", "--model", model, "--out", tmp_path / model, "--max-steps", 2,
           "--batch-size", 8)
    (tmp_path / "ev.yaml").write_text("iwae_k: 2\niwae_max_patches: 5\nmmd_samples: 16\nmmd_permutations: 5\n"
                                      "report_patients: 6\n")
    ok("evaluate", tmp_path / "vae", "--store", tmp_path / "store", "--out", tmp_path / "report",
       "--compare", tmp_path / "monai-kl", "--config", tmp_path / "ev.yaml")
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert len(summary["per_patient"]) == 40 and summary["per_modality"]["image"]["n_patches"] == 40
    assert summary["per_modality"]["image"]["metrics"]["iwae"]["n"] == 5
    shown = summary["report_patients"]
    ssim = {p: v["metrics"]["ssim"]["mean"] for p, v in summary["per_patient"].items()}
    ranked = sorted(ssim, key=lambda p: (ssim[p], p))
    assert shown == ranked[:3] + ranked[-3:][::-1]
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.count('class="patient"') == 6 and "40 patients: shown are the 3 with the lowest" in html
    assert {r["metric"] for r in summary["compare"]["table"]} >= {"ssim", "iwae", "elbo", "kl", "mse", "mmd2_pixel"}


def test_report_patients_keeps_all_when_few():
    pp = {f"p{i}": {"metrics": {"ssim": {"mean": float(i)}}} for i in range(5)}
    assert report_patients(pp, 10) == list(pp)
    assert report_patients(pp, 3) == ["p0", "p1", "p4"]

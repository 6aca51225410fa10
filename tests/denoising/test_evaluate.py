"""`medvae evaluate` on a denoise run: medvae and the classical denoisers on the same noisy patches."""

import json

import numpy as np

from medvae.config import EvaluateConfig
from medvae.denoising import classical
from medvae.evaluation.evaluate import run_evaluation


def test_classical_baselines_see_the_same_noisy_patches(denoise_run, hu_store, tmp_path, monkeypatch):
    seen = {}
    real = classical.denoise
    expected = {m for m in ("tv", "wavelet", "nlm") if classical.available(m)}  # wavelet needs PyWavelets
    available = classical.available

    def spy(method, images):
        if images.shape[-1] != 512:  # the speed probe denoises a 512² slice
            seen.setdefault(method, []).append(images.copy())
        return real(method, images)

    monkeypatch.setattr(classical, "denoise", spy)
    monkeypatch.setattr(classical, "available", lambda m: "bm3d" not in m and available(m))  # bm3d is slow: skipped
    summary = run_evaluation(denoise_run, hu_store, tmp_path / "rep", EvaluateConfig(split="test", denoise_patches=6),
                       device="cpu")
    assert set(seen) == expected
    for level_idx in range(len(summary["levels"])):
        ref = seen["tv"][level_idx]
        assert ref.shape == (6, 1, 64, 64)
        for m in expected - {"tv"}:
            np.testing.assert_array_equal(seen[m][level_idx], ref)
    assert {"bm3d", "gat-bm3d"} <= set(summary["skipped_methods"])
    table = summary["per_modality"]["ct"]
    assert len(table) == 3
    for by_method in table.values():
        assert {"noisy", "medvae", *expected} <= set(by_method)
        assert by_method["noisy"]["psnr"]["n"] == 6
    assert set(summary["seconds_per_512_slice"]) == {"medvae", *expected}
    csv = (tmp_path / "rep" / "metrics.csv").read_text().splitlines()
    assert csv[0] == "run,method,noise,level,patient_id,modality,split,metric,value,n"
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "data:image/png;base64" in html
    assert summary["train_precision"] == "fp32" and "the run trained in fp32" in html  # its run.json's
    assert json.loads((tmp_path / "rep" / "summary.json").read_text())["n_patches"] == 6

"""`medvae evaluate` end to end on a tiny store and two tiny (untrained) ConvVAE checkpoints."""

import csv
import json

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from typer.testing import CliRunner

from medvae.cli import app
from medvae.config import EvaluateConfig, parse_model_config
from medvae.evaluation.evaluate import cohort_metrics, run_evaluation
from medvae.evaluation.sample_quality import prior_samples
from medvae.evaluation.sharpness import spectrum_bands
from medvae.evaluation.tables import CSV_COLUMNS
from medvae.metrics.spectrum import high_band_ratio, high_band_share, radial_power
from medvae.metrics.table import PATCH_METRICS
from medvae.models import build_model
from medvae.training.checkpoint import load_model, save_checkpoint
from tests.factories import patch_store

PATIENTS = ["PANCREAS_0001", "PANCREAS_0002", "PANCREAS_0003"]
CFG = EvaluateConfig(split="test", iwae_k=4, mmd_samples=24, mmd_permutations=20, batch_size=16, worst_patches=2,
                     feature_steps=5, prior_components=2)


def _store(path):
    """Three test patients (10 patches each) and a training patient the priors and features are fitted on."""
    rng = np.random.default_rng(0)
    n_per, size = 10, 64
    yy, xx = np.mgrid[:size, :size] / size
    ids, imgs = [], []
    for p, pid in enumerate([*PATIENTS, "TRAIN_0001", "TRAIN_0002"]):
        for _ in range(n_per):
            cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
            imgs.append(((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) * (0.5 + 0.1 * p) + 0.1)
            ids.append(pid)
    return patch_store(path, np.stack(imgs)[:, None], patient_id=ids,
                       split=["train" if i.startswith("TRAIN") else "test" for i in ids], source="phantom",
                       content_hash="tiny-eval-store",
                       normalization={"ct": {"low": -160.0, "high": 240.0, "unit": "HU"}})


def _run(path, seed, store_hash="tiny-eval-store", name="vae"):
    torch.manual_seed(seed)
    critic = dict(disc_channels=8, disc_layers=2) if name == "vaegan" else {}
    cfg = parse_model_config(dict(name=name, image_size=64, channels=(8, 16), latent_dim=8, **critic))
    model = build_model(cfg)
    save_checkpoint(path / "checkpoints" / "best.pt", {
        "model_config": cfg.model_dump(mode="json"), "model_state": model.state_dict(), "step": 7,
        "store_hash": store_hash})
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return _store(root / "store"), _run(root / "vae_a", 0), _run(root / "vae_b", 1, store_hash="other", name="vaegan")


@pytest.fixture(scope="module")
def evaluated(setup, tmp_path_factory):
    """One evaluation of run_a on the test split: (store, run_a, output folder, summary, metrics.csv rows)."""
    store, run_a, _ = setup
    out = tmp_path_factory.mktemp("evaluated") / "report"
    summary = run_evaluation(run_a, store.path, out, CFG, device="cpu")
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return store, run_a, out, summary, rows


def test_evaluate_writes_metrics_summary_and_report(evaluated):
    _, _, out, summary, rows = evaluated
    assert {p.name for p in out.iterdir()} >= {"metrics.csv", "summary.json", "report.html"}
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    assert summary["run"] == "vae_a"


def test_every_patient_has_every_patch_metric_with_its_count(evaluated):
    rows = evaluated[4]
    for pid in PATIENTS:
        mine = {r["metric"]: r for r in rows if r["patient_id"] == pid}
        assert set(PATCH_METRICS) <= set(mine) and {f"{m}_sd" for m in PATCH_METRICS} <= set(mine)
        assert int(mine["ssim"]["n"]) == 10 and int(mine["iwae"]["n"]) == 8
        assert mine["ssim"]["modality"] == "ct" and mine["ssim"]["split"] == "test"


def test_patient_ssim_and_psnr_match_scikit_image(evaluated):
    """One patient's mean SSIM and PSNR recomputed independently: scikit-image on decode(mu)."""
    store, run_a, _, _, rows = evaluated
    model, _ = load_model(run_a / "checkpoints" / "best.pt")
    x = store.get(np.flatnonzero(store.index["patient_id"] == PATIENTS[0]))
    with torch.no_grad():
        recon = model.decode(model.encode(torch.from_numpy(x))[0]).numpy()
    ref_ssim = np.mean([structural_similarity(r[0], o[0], data_range=1.0, gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False) for r, o in zip(recon, x)])
    ref_psnr = np.mean([peak_signal_noise_ratio(o[0], r[0], data_range=1.0) for r, o in zip(recon, x)])
    mine = {r["metric"]: float(r["value"]) for r in rows if r["patient_id"] == PATIENTS[0]}
    assert mine["ssim"] == pytest.approx(ref_ssim, abs=1e-4)
    assert mine["psnr"] == pytest.approx(ref_psnr, abs=1e-3)


def test_sample_metrics_per_prior_beside_the_real_floor(evaluated):
    store, run_a, out, _, rows = evaluated
    sample = {(r["prior"], r["metric"]) for r in rows if r["prior"] in ("real", "gmm", "standard")
              and r["metric"] in ("fid", "kid", "kid_sd", "precision", "recall", "density", "coverage")}
    assert {p for p, _ in sample} == {"real", "standard", "gmm"} and len(sample) == 21
    # The feature network is cached with the store, the mixture prior with the run, nothing in the report.
    assert (out / "features").exists() is False and any((store.path / "features").glob("*.pt"))
    assert any((run_a / "priors").glob("best-*.pt"))
    cohort = {r["metric"] for r in rows if r["patient_id"] == "ALL" and r["prior"] in ("", "standard")}
    assert {"mmd2_pixel", "mmd_p_pixel", "mmd2_randconv", "intensity_w1"} <= cohort


def test_summary_groups_patients_and_modalities(evaluated):
    js = json.loads((evaluated[2] / "summary.json").read_text())
    assert set(js) >= {"per_patient", "per_modality", "cohort"}
    assert sorted(js["per_patient"]) == PATIENTS
    assert js["per_modality"]["ct"]["n_patches"] == 30
    assert js["cohort"]["ct"]["unit"] == "HU"
    assert len(js["per_patient"]["PANCREAS_0001"]["worst_patches"]) == 2
    # ELBO <= IWAE on average (IWAE with k >= 1 is a tighter bound).
    m = js["per_modality"]["ct"]["metrics"]
    assert m["elbo"]["mean"] < m["iwae"]["mean"] + 1.0


def test_sharpness_rows_equal_the_spectrum_of_the_same_images(evaluated):
    """metrics.csv's high-band rows equal medvae.metrics.spectrum called directly on the test patches, their
    reconstructions decode(mu) and the prior samples the cohort metrics use; summary.json and the report
    have the spectra."""
    store, run_a, out, summary, rows = evaluated
    model, _ = load_model(run_a / "checkpoints" / "best.pt")
    test = store.select("test")
    x = torch.from_numpy(store.get(test))
    with torch.no_grad():
        recon = model.decode(model.encode(x)[0])
    samples = prior_samples(model, run_a / "checkpoints" / "best.pt", store, ["ct"], CFG)["ct"]
    n_bands = spectrum_bands(64)
    mine = {(r["metric"], r["prior"]): (float(r["value"]), int(r["n"])) for r in rows
            if r["metric"].startswith("high_band") and r["patient_id"] == "ALL" and r["modality"] == "ct"}
    assert set(mine) == {("high_band_share", ""), ("high_band_ratio_recon", ""),
                         ("high_band_ratio_samples", "standard"), ("high_band_ratio_samples", "gmm")}
    assert mine[("high_band_share", "")] == pytest.approx((high_band_share(x, 0.25, n_bands), 30), rel=1e-5)
    assert mine[("high_band_ratio_recon", "")] == pytest.approx((high_band_ratio(recon, x, 0.25, n_bands), 30),
                                                                rel=1e-4)
    for prior in ("standard", "gmm"):
        ref = high_band_ratio(samples[prior], x, 0.25, n_bands)
        assert mine[("high_band_ratio_samples", prior)] == pytest.approx((ref, CFG.mmd_samples), rel=1e-5)
    spec = json.loads((out / "summary.json").read_text())["spectrum"]
    assert list(spec["groups"]) == ["ct"] and len(spec["band_edges"]) == n_bands + 1  # one modality: no ALL
    np.testing.assert_allclose(spec["groups"]["ct"]["real"], radial_power(x, n_bands).numpy(), rtol=1e-5)
    html = (out / "report.html").read_text()
    assert 'id="sharpness"' in html and "as sharp as real" in html


def test_summary_and_report_say_how_long_each_stage_took(evaluated):
    out = evaluated[2]
    timings = json.loads((out / "summary.json").read_text())["timings"]
    stages = {"per_patch", "iwae", "prior_samples", "mmd", "spectrum", "sample_quality", "figures"}
    assert set(timings) >= stages | {"total", "compared_runs"}
    assert all(v >= 0 for v in timings.values())
    assert sum(timings[k] for k in stages) <= timings["total"] + 1e-6  # the stages are parts of the total
    html = (out / "report.html").read_text()
    assert 'id="timings"' in html and "IWAE</td>" in html


def test_report_is_self_contained_and_anonymous(evaluated):
    out = evaluated[2]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 + len(PATIENTS)
    for pid in PATIENTS:
        assert f'id="p-{pid}"' in html
    # Offline and anonymous: nothing fetched, no DICOM identity strings.
    assert "http://" not in html and "https://" not in html and "<script" not in html
    for ident in ("PHANTOM^", "PatientName", "BirthDate"):
        assert ident not in html and ident not in (out / "summary.json").read_text()


def test_a_patient_cohort_keeps_its_patients_with_or_without_per_image(evaluated, tmp_path):
    """Not an image set (patients of 10 patches): patient sections and rows, no image-set views, and
    --per-image (an image-set option) changes nothing."""
    store, run_a, out, summary, _ = evaluated
    assert not summary["image_set"] and summary["report_patients"] == PATIENTS
    assert summary["per_split"] == {} and summary["worst_images"] == [] and summary["per_class"] == {}
    html = (out / "report.html").read_text()
    assert 'id="patients"' in html and html.count('class="patient"') == len(PATIENTS) and 'id="distributions"' in html
    assert 'id="classes"' not in html and 'id="worst"' not in html
    run_evaluation(run_a, store.path, tmp_path / "per_image", CFG.model_copy(update={"per_image": True}), device="cpu")
    assert (tmp_path / "per_image" / "metrics.csv").read_text() == (out / "metrics.csv").read_text()


def test_cohort_w1_and_mmd_p_against_references(setup):
    """The cohort's intensity W1 equals scipy's on the HU values (and a 0.05 shift of the 400 HU window
    is 20 HU); the MMD test cannot tell the real patches from themselves and rejects flat images."""
    store = setup[0]
    rows = store.select("test")
    real = store.get(rows)
    cfg = CFG.model_copy(update={"mmd_samples": len(rows)})  # every real row: the reference sees the same set

    def cohort(samples):
        return cohort_metrics(store, rows, torch.from_numpy(samples), "ct", cfg, torch.device("cpu"))[0]

    def hu(x):
        return -160.0 + 400.0 * x.astype(np.float64).ravel()

    shifted = cohort(real - np.float32(0.05))
    assert shifted["intensity_w1"] == pytest.approx(wasserstein_distance(hu(real), hu(real - np.float32(0.05))),
                                                    rel=1e-5)
    assert shifted["intensity_w1"] == pytest.approx(20.0, rel=1e-3)
    same = cohort(real)
    assert same["intensity_w1"] == 0.0 and same["mmd_p_pixel"] > 0.5
    flat = cohort(np.full_like(real, 0.5))
    assert flat["mmd_p_pixel"] == pytest.approx(1 / (cfg.mmd_permutations + 1))  # no permutation reaches it


def test_compare_marks_best(setup, tmp_path, caplog):
    store, run_a, run_b = setup
    out = tmp_path / "cmp"
    with caplog.at_level("WARNING"):
        res = CliRunner().invoke(app, ["evaluate", str(run_a), "--store", str(store.path), "--out", str(out),
                                       "--compare", str(run_b), "--device", "cpu", "--config", str(_yaml(tmp_path))])
    assert res.exit_code == 0, res.output
    assert "trained on another store" in caplog.text  # run_b's store hash differs
    summary = json.loads((out / "summary.json").read_text())
    table = summary["compare"]["table"]
    assert summary["compare"]["runs"] == ["vae_a", "vae_b"]
    assert summary["compare"]["identical_weights"] == []  # two different models
    ssim_row = next(r for r in table if r["metric"] == "ssim")
    vals = ssim_row["values"]
    assert ssim_row["best"] == max(vals, key=vals.get)
    mse_row = next(r for r in table if r["metric"] == "mse")
    assert mse_row["best"] == min(mse_row["values"], key=mse_row["values"].get)
    assert next(r for r in table if r["metric"] == "kl")["best"] is None  # no better direction
    with open(out / "metrics.csv", newline="") as f:
        assert {r["run"] for r in csv.DictReader(f)} == {"vae_a", "vae_b"}
    html = (out / "report.html").read_text()
    assert 'id="compare"' in html and 'class="best"' in html


def test_compare_flags_identical_weights(setup, tmp_path, caplog):
    import shutil

    store, run_a, _ = setup
    twin = tmp_path / "vae_twin"
    shutil.copytree(run_a / "checkpoints", twin / "checkpoints")  # the same weights under another name
    cfg = CFG.model_copy(update={"sample_metrics": False})
    with caplog.at_level("WARNING"):
        summary = run_evaluation(run_a, store.path, tmp_path / "r", cfg, compare=[twin], device="cpu")
    assert summary["compare"]["identical_weights"] == [["vae_a", "vae_twin"]]
    assert "vae_a and vae_twin have IDENTICAL weights" in caplog.text
    assert "vae_a and vae_twin have identical weights" in (tmp_path / "r" / "report.html").read_text()


def test_bad_split_is_a_user_error(setup, tmp_path):
    from medvae.errors import InputError

    store, run_a, _ = setup
    with pytest.raises(InputError, match="split 'nope'"):
        run_evaluation(run_a, store.path, tmp_path / "x", CFG.model_copy(update={"split": "nope"}), device="cpu")


def test_yaml_split_is_used_unless_the_option_is_given(setup, tmp_path):
    store, run_a, _ = setup
    args = ["evaluate", str(run_a), "--store", str(store.path), "--out", str(tmp_path / "r"), "--device", "cpu",
            "--config", str(_yaml(tmp_path, split="val"))]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "split 'val'" in res.output  # the tiny store has only a test split
    res = CliRunner().invoke(app, [*args, "--split", "test"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["split"] == "test"


def _yaml(tmp_path, split="test"):
    p = tmp_path / "eval.yaml"
    p.write_text(f"split: {split}\niwae_k: 2\nmmd_samples: 16\nmmd_permutations: 10\nbatch_size: 16\n"
                 "worst_patches: 1\nfeature_steps: 5\nprior_components: 2\n")
    return p

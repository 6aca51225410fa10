"""The HTML report alone: self-contained, one section per patient, compare table, escaping."""

import re

import numpy as np

from medvae.evaluation.tables import compare_table
from medvae.metrics.table import ALL_METRICS, COHORT_METRICS, PATCH_METRICS
from medvae.report import render_report
from medvae.report.text import fmt as _fmt


def _result(run, ssim, pids=("PANCREAS_0001", "PANCREAS_0002")):
    stats = {k: {"mean": ssim if k == "ssim" else 1.0, "sd": 0.1, "n": 5} for k in PATCH_METRICS}
    stats["psnr"]["mean"] = float("nan")  # renders as a dash, never "nan"
    return {
        "run": run, "checkpoint": "x.pt", "step": 10, "model": "vae", "split": "test", "store": "/s",
        "store_hash_matches": True,
        "per_patient": {p: {"modality": "ct", "n_patches": 5, "metrics": stats, "best_row": 0,
                            "worst_patches": [{"row": 1, "slice_index": 3, "y": 0, "x": 0, "ssim": 0.5}]}
                        for p in pids},
        "per_modality": {"ct": {"n_patches": 10, "n_patients": len(pids), "metrics": stats}},
        "cohort": {"ct": {"n_real": 8, "n_samples": 8, "unit": "HU", **{k: 0.01 for k in COHORT_METRICS}}},
        "metric_info": {k: {"unit": m.unit, "direction": m.better} for k, m in ALL_METRICS.items()},
        "iwae_patches_per_patient": 8, "config": {"iwae_k": 4},
    }


def _figs(pids=("PANCREAS_0001", "PANCREAS_0002")):
    rng = np.random.default_rng(0)
    img = lambda: rng.uniform(-160, 240, (1, 32, 32)).astype(np.float32)  # noqa: E731
    item = lambda kind: {"kind": kind, "slice_index": 3, "ssim": 0.5, "original": img(),  # noqa: E731
                         "reconstruction": img()}
    edges = np.linspace(-160, 240, 9)
    return {"triptychs": {p: [item("best"), item("worst")] for p in pids},
            "samples": {"ct": rng.random((4, 1, 32, 32))}, "samples_gmm": {},
            "traversal": {"ct": rng.random((6, 1, 32, 32))},
            "traversal_dims": {"ct": [2, 0]}, "traversal_steps": [-1, 0, 1], "modalities": ["ct"],
            "histograms": {"ct": {"edges": edges.tolist(), "unit": "HU", "real": [1] * 8, "synthetic": [2] * 8}},
            "distributions": {p: {"ssim": rng.random(5), "psnr": rng.random(5), "mae": rng.random(5)} for p in pids},
            "normalization": {"ct": {"low": -160.0, "high": 240.0, "unit": "HU"}}}


def test_report_is_self_contained_with_patient_sections():
    html = render_report(_result("a", 0.8), _figs())
    assert html.lstrip().startswith("<!DOCTYPE html>")
    assert not re.search(r"(src|href)=\"(https?:)?//", html) and "<script" not in html and "<link" not in html
    for pid in ("PANCREAS_0001", "PANCREAS_0002"):
        assert f'id="p-{pid}"' in html and f'href="#p-{pid}"' in html
    # 2 triptychs + samples + traversal + histogram + distributions (no latent map given)
    assert html.count("data:image/png;base64,") == 6
    with_map = render_report(_result("a", 0.8), {**_figs(), "latent_map": {
        "points": np.random.default_rng(1).normal(size=(50, 2)), "labels": ["a", "b"] * 25, "by": "class",
        "explained": [0.5, 0.2]}})
    assert with_map.count("data:image/png;base64,") == 7 and 'id="latents"' in with_map
    singles = _figs()  # an image set: one image per "patient" -> no per-patient box plots
    singles["distributions"] = {p: {k: v[:1] for k, v in d.items()} for p, d in singles["distributions"].items()}
    html = render_report(_result("a", 0.8), singles)
    assert 'id="distributions"' not in html and html.count("data:image/png;base64,") == 5
    assert "nan" not in re.sub(r"base64,[^\"]+", "", html).lower().replace("nanosec", "")
    assert 'id="compare"' not in html


def test_compare_table_marks_best_and_escapes_ids():
    a, b = _result("vae", 0.8, pids=("<b>P1",)), _result("vaegan", 0.9, pids=("<b>P1",))
    a["compare"] = {"runs": ["vae", "vaegan"], "table": compare_table([a, b])}
    html = render_report(a, _figs(pids=("<b>P1",)))
    row = re.search(r"<tr><td>ct</td><td>SSIM .*?</tr>", html, re.S).group(0)
    assert row.count('class="best"') == 1 and re.search(r'class="best">0\.9000 ★', row)
    assert "<b>P1" not in html and "&lt;b&gt;P1" in html


def test_number_format():
    assert _fmt(float("nan")) == "–" and _fmt(None) == "–"
    assert _fmt(0.91234, "ssim") == "0.9123" and _fmt(-12345.6) == "-12,345.6" and _fmt(3e-6) == "3.00e-06"


def test_compare_table_stars_no_run_on_a_tie():
    a, b = _result("vae", 0.8), _result("vaegan", 0.8)  # every value equal
    assert all(row["best"] is None for row in compare_table([a, b]))


def _self_contained(html: str) -> None:
    assert html.lstrip().startswith("<!DOCTYPE html>") and "--goodbg" in html  # the one shared stylesheet, inline
    assert not re.search(r"(src|href)=\"(https?:)?//", html) and "<script" not in html and "<link" not in html
    assert "nan" not in re.sub(r"base64,[^\"]+", "", html).lower()


def test_denoise_and_utility_pages_share_the_base_page_and_escape():
    from types import SimpleNamespace

    from medvae.report.denoise import render_denoise_report
    from medvae.report.downstream import render_utility_report

    cell = {"mean": 0.5, "sd": float("nan"), "n": 0}  # an empty set's sd renders as a dash
    by_method = {m: {k: cell for k in ("psnr", "ssim", "mae")} for m in ("noisy", "medvae", "<i>tv")}
    rng = np.random.default_rng(0)
    ex = {k: rng.random((1, 16, 16)).astype(np.float32) for k in ("clean", "noisy", "medvae", "classical")}
    summary = {"run": "<b>run", "model": "dae", "step": 3, "split": "test", "n_patches": 4,
               "noise": {"kind": "gaussian"}, "level_name": "sigma", "levels": [0.05, 0.1],
               "methods": ["noisy", "medvae", "<i>tv"], "skipped_methods": {"bm3d": "not installed"},
               "per_modality": {"ct": {"0.05": by_method}}, "per_patient": {"P1": {"0.05": by_method}},
               "medvae_minus_best_classical_psnr": {"ct": {"0.05": -1.5}}, "seconds_per_512_slice": {"medvae": 0.1},
               "device": "cpu", "torch_threads": 1}
    store = SimpleNamespace(normalization=lambda m: {"low": -160.0, "high": 240.0, "unit": "HU"})
    html = render_denoise_report(summary, {"0.05": {**ex, "classical_name": "<i>tv", "patient_id": "P1",
                                                     "modality": "ct"}}, store)
    _self_contained(html)
    assert "&lt;b&gt;run" in html and "<b>run" not in html and "&lt;i&gt;tv" in html and "-1.50 dB" in html
    assert html.count("data:image/png;base64,") == 1

    interval = {"mean": 0.6, "sd": 0.1, "n": 3, "ci_low": 0.4, "ci_high": 0.8}
    utility = {"store": "<s>", "task": "classify", "synthetic": None, "condition": "class", "seeds": 3, "n_test": 9,
               "synthesis": "prior", "unlabelled": "none",
               "budgets": [{"key": "0.1", "fraction": 0.1, "labels_per_class": None},
                           {"key": "1", "fraction": 1.0, "labels_per_class": None}], "metrics": ["accuracy"],
               "metric_info": {"accuracy": {"label": "accuracy", "unit": "unitless", "better": "higher"}},
               "arms": {"real": {"0.1": {"accuracy": interval}, "1": {"accuracy": {**interval, "n": 1, "sd": None,
                                                                                   "ci_low": None, "ci_high": None}}},
                        "real+synthetic": {"0.1": {"accuracy": interval}}},
               "paired_differences": {"real+synthetic - real": {"0.1": {"accuracy": {**interval, "ci_low": 0.1}}}},
               "config": {"model": "vae", "generator_steps": 5, "ratio": 1.0, "downstream_steps": 4, "batch_size": 8,
                          "lr": 0.001, "generator_run": None, "per_image": 10, "filter_threshold": 0.5,
                          "drop_flagged": True, "synthetic_share": 3.0}}
    html = render_utility_report(utility, "AAAA")
    _self_contained(html)
    assert "&lt;s&gt;" in html and "<s>" not in html
    assert "0.6000 ± 0.2000" in html and '<td class="best">+0.6000 ± 0.2000' in html  # excludes 0: highlighted
    assert "(n=1)" in html  # one seed: no interval
    assert html.count("<td>–</td>") == 4  # the real rows (one per budget) have no difference to real or on top


def test_sharpness_section_per_modality_and_whole_split():
    """summary.json's spectrum: a table row per group with its ratios, one figure with the cutoff, the reading."""
    def group(share, recon):
        return {"n_real": 5, "real": [1.0, 0.1, 0.01, 0.001], "reconstruction": [1.0, 0.1, 1e-3, 1e-5],
                "samples": {"standard": [0.9, 0.1, 1e-3, 1e-4]}, "n_samples": {"standard": 8},
                "high_band_share": share, "high_band_ratio_recon": recon, "high_band_ratio_samples": {"standard": 0.25}}

    summary = {**_result("a", 0.8), "spectrum": {"cutoff": 0.25, "band_edges": [0, 0.125, 0.25, 0.375, 0.5],
                                                 "groups": {"ct": group(0.011, 0.0123), "ALL": group(0.02, 0.5)}}}
    html = render_report(summary, _figs())
    assert html.count("data:image/png;base64,") == 7  # test_report_is_self_contained...'s 6 + the spectra
    section = re.search(r'<h3 id="sharpness">.*?</p>', html, re.S).group(0)
    assert "as sharp as real" in section and "0.25 cycles/pixel" in section
    rows = re.findall(r"<tr><td>(.*?)</td>.*?</tr>", section, re.S)
    assert rows == ["ct", "whole split"]
    assert _fmt(0.0123) in section and _fmt(0.5) in section and "Gaussian mixture" not in section
    assert 'id="sharpness"' not in render_report(_result("a", 0.8), _figs())  # an older summary: no section

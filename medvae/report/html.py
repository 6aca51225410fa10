"""The evaluation's self-contained report.html: ``templates/report.html`` (on the shared base page and
stylesheet, :mod:`medvae.report.render`), figures as base64 PNG.

No external CSS, fonts or scripts, so the file opens offline and can be mailed as is. Patients
appear under their study ids (the store's patient_id) only.
"""

from __future__ import annotations

import numpy as np

from medvae.files import write_text
from medvae.metrics.table import ALL_METRICS, COHORT_METRICS, PATCH_METRICS, SAMPLE_METRICS
from medvae.report import figures
from medvae.report.downstream import utility_figure, utility_tables
from medvae.report.render import render

PRIOR_LABELS = {"": "", "real": "real vs real (floor)", "standard": "N(0, I)", "gmm": "Gaussian mixture",
                "diffusion": "latent diffusion"}
TABLE_METRICS = ("ssim", "ms_ssim", "psnr", "mse", "mae", "elbo")  # the class and split tables' columns


def build_figures(summary: dict, fig: dict) -> dict:
    """Render every figure the template shows; returns name -> base64 PNG (or nested dicts)."""
    norm = fig["normalization"]
    out: dict = {"patients": {}, "samples": {}, "samples_gmm": {}, "samples_diffusion": {}, "traversal": {},
                 "histograms": {}}
    for pid, items in fig["triptychs"].items():
        mod = summary["per_patient"][pid]["modality"]
        out["patients"][pid] = figures.triptych(items, mod, norm[mod])
    for mod in fig["modalities"]:
        lo, hi = float(norm[mod]["low"]), float(norm[mod]["high"])
        out["samples"][mod] = figures.image_grid(lo + np.asarray(fig["samples"][mod]) * (hi - lo), mod, norm[mod])
        for key in ("samples_gmm", "samples_diffusion"):  # a summary from before the diffusion prior has no key
            if mod in fig.get(key, {}):
                out[key][mod] = figures.image_grid(lo + np.asarray(fig[key][mod]) * (hi - lo), mod, norm[mod])
        labels = [f"z[{d}]" for d in fig["traversal_dims"][mod]]
        out["traversal"][mod] = figures.image_grid(lo + np.asarray(fig["traversal"][mod]) * (hi - lo), mod, norm[mod],
                                             ncols=len(fig["traversal_steps"]), row_labels=labels)
        out["histograms"][mod] = figures.histograms(fig["histograms"][mod], mod)
    # box plots need several patches per patient: an image set's "patients" are single images
    several = any(len(v["ssim"]) > 1 for v in fig["distributions"].values())
    out["distributions"] = figures.distributions(fig["distributions"]) if several else None
    if summary.get("utility"):
        out["utility"] = utility_figure(summary["utility"])
        out["utility_tables"] = utility_tables(summary["utility"])
    spec = summary.get("spectrum")
    out["spectrum"] = figures.spectrum(spec, PRIOR_LABELS) if spec and spec.get("groups") else None
    lm = fig.get("latent_map")
    out["latent_map"] = figures.latent_map(lm["points"], lm["labels"], lm["by"], lm["explained"]) if lm else None
    worst = fig.get("worst")
    out["worst"] = figures.worst_grid(worst, worst[0]["modality"], norm[worst[0]["modality"]]) if worst else None
    cs = fig.get("class_samples")
    out["class_samples"] = _class_sample_grids(cs, norm) if cs else {}
    out["class_samples_kind"] = cs["kind"] if cs else ""
    out["class_samples_n"] = cs.get("n", {}) if cs else {}
    return out


def _class_sample_grids(cs: dict, norm: dict) -> dict[str, str]:
    """Samples a row per class (a class model's condition, or the feature classifier's label of an
    unconditional model's samples, with each class's count): prior name -> grid."""
    mod, names = cs["modality"], cs["names"]
    lo, hi = float(norm[mod]["low"]), float(norm[mod]["high"])
    out = {}
    for prior in ("standard", "gmm", "diffusion"):
        if prior in cs:
            labels = names if "counts" not in cs else [f"{c} ({k})" for c, k in zip(names, cs["counts"][prior])]
            out[prior] = figures.image_grid(lo + np.asarray(cs[prior]) * (hi - lo), mod, norm[mod],
                                            ncols=len(cs[prior]) // len(names), row_labels=labels)
    return out


# summary.json ``timings`` keys in the order the evaluation runs them, as the report's "Time taken" table names them
TIMING_LABELS = {"per_patch": "per-image metrics (encode, ELBO, reconstruction)", "iwae": "IWAE",
                 "prior_samples": "prior samples", "mmd": "cohort MMD and intensity distance",
                 "spectrum": "sharpness (power spectra)", "sample_quality": "sample quality (feature network)",
                 "other_splits": "other splits",
                 "figures": "figure data", "compared_runs": "compared runs", "total": "total (before the report)"}


def render_report(summary: dict, fig: dict) -> str:
    """The report as one HTML string."""
    return render("report.html", s=summary, figs=build_figures(summary, fig),
                  conditional=fig.get("conditional", "none"), image_set=bool(summary.get("image_set")),
                  table_metrics=list(TABLE_METRICS), metrics=list(PATCH_METRICS),
                  cohort_metrics=list(COHORT_METRICS), info=summary["metric_info"],
                  sample_metrics=list(SAMPLE_METRICS), prior_labels=PRIOR_LABELS,
                  labels={k: m.label for k, m in ALL_METRICS.items()},
                  explain={k: m.explain for k, m in ALL_METRICS.items()}, timing_labels=TIMING_LABELS)


def write_report(summary: dict, fig: dict, path) -> None:
    """Atomically write the self-contained report.html."""
    write_text(path, render_report(summary, fig))

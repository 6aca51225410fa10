"""Self-contained report.html: one jinja2 template, inline CSS, figures as base64 PNG.

No external CSS, fonts or scripts, so the file opens offline and can be mailed as is. Patients
appear under their study ids (the store's patient_id) only.
"""

from __future__ import annotations

import math
from importlib import resources

import jinja2
import numpy as np

from medvae.files import write_text
from medvae.report import figures as F

LABELS = {
    "ssim": "SSIM", "ms_ssim": "MS-SSIM", "psnr": "PSNR", "mse": "MSE", "mae": "MAE", "elbo": "ELBO",
    "kl": "KL", "iwae": "IWAE log-lik.", "bpd": "bits/dim", "mmd2_pixel": "MMD² pixels",
    "mmd_p_pixel": "MMD p (pixels)", "mmd2_randconv": "MMD² random-conv", "mmd_p_randconv": "MMD p (random-conv)",
    "intensity_w1": "intensity W₁",
}
EXPLAIN = {
    "ssim": "Structural similarity of each patch and its reconstruction decode(mu): Gaussian window 11, "
            "σ 1.5, K1 0.01, K2 0.03, averaged over the valid region (as scikit-image). 1 = identical.",
    "ms_ssim": "Multi-scale SSIM: contrast-structure at successively 2× downsampled scales and SSIM at the "
               "coarsest; 4 scales at 128 px (standard weights renormalised). 1 = identical.",
    "psnr": "Peak signal-to-noise ratio 10·log10(1 / MSE) on the [0, 1] scale.",
    "mse": "Mean squared error on the [0, 1] intensity scale.",
    "mae": "Mean absolute error on the [0, 1] intensity scale (× window width for physical units).",
    "elbo": "Evidence lower bound log p(x|z) − KL with one sample of z: a lower bound on log-likelihood per patch.",
    "kl": "KL(q(z|x) ‖ N(0, I)): information the code carries about the patch; neither high nor low is better by itself.",
    "iwae": "Importance-weighted bound with k samples: a tighter lower bound on log p(x) per patch (continuous density on [0, 1]).",
    "bpd": "−IWAE / (pixels · ln 2): negative log-likelihood per pixel in bits (continuous density; can be negative).",
    "mmd2_pixel": "Unbiased MMD² between real patches and prior samples on 32×32 area-downsampled pixels, Gaussian kernels "
                  "at 0.5/1/2 × the median distance. ≈ 0 when the distributions match.",
    "mmd_p_pixel": "Permutation-test p-value of the MMD² on pixels: small = samples distinguishable from real.",
    "mmd2_randconv": "As MMD² pixels, on 512-d features of a fixed seeded random conv net (no downloaded weights).",
    "mmd_p_randconv": "Permutation-test p-value of the random-conv MMD².",
    "intensity_w1": "Wasserstein-1 distance between real and synthetic intensity distributions in physical units (HU for CT).",
}


def _fmt(v, metric: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if metric.startswith("mmd_p"):
        return f"{v:.3f}"
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e5):
        return f"{v:.2e}"
    if a >= 100:
        return f"{v:,.1f}"
    return f"{v:.4f}" if a < 1 else f"{v:.3f}"


def _env() -> jinja2.Environment:
    text = resources.files("medvae.report").joinpath("templates/report.html").read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    env.globals["template_text"] = text
    return env


def build_figures(summary: dict, fig: dict) -> dict:
    """Render every figure the template shows; returns name -> base64 PNG (or nested dicts)."""
    norm = fig["normalization"]
    out: dict = {"patients": {}, "samples": {}, "traversal": {}, "histograms": {}}
    for pid, items in fig["triptychs"].items():
        mod = summary["per_patient"][pid]["modality"]
        out["patients"][pid] = F.triptych(items, mod, norm[mod])
    for mod in fig["modalities"]:
        lo, hi = float(norm[mod]["low"]), float(norm[mod]["high"])
        out["samples"][mod] = F.image_grid(lo + np.asarray(fig["samples"]) * (hi - lo), mod, norm[mod])
        labels = [f"z[{d}]" for d in fig["traversal_dims"]]
        out["traversal"][mod] = F.image_grid(lo + np.asarray(fig["traversal"]) * (hi - lo), mod, norm[mod],
                                             ncols=len(fig["traversal_steps"]), row_labels=labels)
        out["histograms"][mod] = F.histograms(fig["histograms"][mod], mod)
    out["distributions"] = F.distributions(fig["distributions"])
    return out


def render_report(summary: dict, fig: dict) -> str:
    """The report as one HTML string."""
    env = _env()
    template = env.from_string(env.globals["template_text"])
    from medvae.evaluate import COHORT_METRICS, METRICS

    return template.render(s=summary, figs=build_figures(summary, fig), metrics=list(METRICS),
                           cohort_metrics=list(COHORT_METRICS), info=summary["metric_info"],
                           labels=LABELS, explain=EXPLAIN)


def write_report(summary: dict, fig: dict, path) -> None:
    """Atomically write the self-contained report.html."""
    write_text(path, render_report(summary, fig))

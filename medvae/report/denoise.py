"""report.html of a denoise run: per-level method tables, speed, and noisy / denoised / clean
triptychs with error maps, in one self-contained page (``templates/denoise.html`` on the shared base
page and stylesheet; base64 PNG figures)."""

from __future__ import annotations

import numpy as np

from medvae.files import write_text
from medvae.metrics.table import DENOISE_METRICS
from medvae.report import figures
from medvae.report.render import render

TABLE_METRICS = ("psnr", "ssim", "mae")


def _triptych(ex: dict, norm: dict) -> str:
    """noisy | medvae | best classical | clean, and |error| maps below, in physical units."""
    plt = figures.plt
    lo, hi = float(norm["low"]), float(norm["high"])
    cmap = "gray" if ex["modality"] == "ct" else "magma"
    panels = [("noisy", ex["noisy"]), ("medvae", ex["medvae"])]
    if ex["classical"] is not None:
        panels.append((ex["classical_name"], ex["classical"]))
    panels.append(("clean", ex["clean"]))
    clean = lo + ex["clean"][0] * (hi - lo)
    fig, axes = plt.subplots(2, len(panels), figsize=(2.4 * len(panels), 4.9))
    emax = float(np.percentile(np.abs(lo + ex["noisy"][0] * (hi - lo) - clean), 99)) or 1.0
    for j, (name, img) in enumerate(panels):
        phys = lo + img[0] * (hi - lo)
        axes[0, j].imshow(phys, cmap=cmap, vmin=lo, vmax=hi)
        axes[0, j].set_title(name)
        for a in axes[:, j]:
            a.axis("off")
        if name == "clean":
            continue
        im = axes[1, j].imshow(np.abs(phys - clean), cmap="inferno", vmin=0, vmax=emax)
        axes[1, j].set_title(f"|{name} − clean|")
    fig.colorbar(im, ax=axes[1, :].tolist(), shrink=0.8, label=norm.get("unit", ""))
    return figures.to_png(fig)


def render_denoise_report(summary: dict, examples: dict, store) -> str:
    """The report as one HTML string."""
    best = {mod: {level: max((m for m in summary["methods"] if m in by_method),
                             key=lambda m, by_method=by_method: by_method[m]["psnr"]["mean"])
                  for level, by_method in by_level.items()}
            for mod, by_level in summary["per_modality"].items()}
    images = {level: _triptych(ex, store.normalization(ex["modality"])) for level, ex in examples.items()}
    return render("denoise.html", s=summary, best=best, examples=images,
                  patients={level: ex["patient_id"] for level, ex in examples.items()},
                  metrics=TABLE_METRICS, info={k: DENOISE_METRICS[k] for k in TABLE_METRICS})


def write_denoise_report(summary: dict, examples: dict, store, path) -> None:
    """Atomically write the self-contained report.html of a denoise run."""
    write_text(path, render_denoise_report(summary, examples, store))

"""report.html of a denoise run: per-level method tables, speed, and noisy / denoised / clean
triptychs with error maps, in one self-contained page (inline CSS, base64 PNG figures)."""

from __future__ import annotations

import html

import numpy as np

from medvae.files import write_text
from medvae.metrics.table import DENOISE_METRICS
from medvae.report import figures as F

_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;"
        "margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
        "td.m{text-align:left}.best{font-weight:bold;color:#2b6cb0}.note{color:#666;font-size:90%}")


def _triptych(ex: dict, norm: dict) -> str:
    """noisy | medvae | best classical | clean, and |error| maps below, in physical units."""
    plt = F.plt
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
    return F._png(fig)


def _table(by_level: dict, methods: list[str], level_name: str) -> str:
    rows = [f"<tr><th>{html.escape(level_name)}</th><th>method</th>"
            + "".join(f"<th>{DENOISE_METRICS[k].label} ({DENOISE_METRICS[k].unit})</th>"
                      for k in ("psnr", "ssim", "mae"))
            + "</tr>"]
    for level, by_method in by_level.items():
        best = max((m for m in methods if m in by_method), key=lambda m: by_method[m]["psnr"]["mean"])
        for m in methods:
            if m not in by_method:
                continue
            cells = "".join(f"<td>{by_method[m][k]['mean']:.4g} ± {by_method[m][k]['sd']:.2g}</td>"
                            for k in ("psnr", "ssim", "mae"))
            cls = ' class="best"' if m == best else ""
            rows.append(f"<tr><td>{float(level):g}</td><td class=m{cls}>{html.escape(m)}</td>{cells}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def render_denoise_report(summary: dict, examples: dict, store) -> str:
    """The report as one HTML string."""
    s = summary
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>medvae denoise: {html.escape(s['run'])}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>Denoising: {html.escape(s['run'])}</h1><p>model <b>{html.escape(str(s['model']))}</b>, step "
             f"{s['step']}, split <b>{html.escape(s['split'])}</b>, {s['n_patches']} patches, noise "
             f"<b>{html.escape(s['noise']['kind'])}</b> ({html.escape(s['level_name'])} {s['levels']}). Every method "
             "denoises the same noisy patches; bold = best PSNR.</p>"]
    if s["skipped_methods"]:
        parts.append("<p class=note>skipped: " + "; ".join(f"{html.escape(m)} ({html.escape(w)})"
                                                          for m, w in s["skipped_methods"].items()) + "</p>")
    for mod, by_level in s["per_modality"].items():
        parts.append(f"<h2>{html.escape(mod)}</h2>" + _table(by_level, s["methods"], s["level_name"]))
        gaps = s["medvae_minus_best_classical_psnr"][mod]
        parts.append("<p>medvae − best classical PSNR: " + ", ".join(
            f"{float(lv):g}: {g:+.2f} dB" for lv, g in gaps.items() if g is not None) + "</p>")
    parts.append("<h2>Time per 512² slice</h2><table><tr><th>method</th><th>seconds</th></tr>" + "".join(
        f"<tr><td class=m>{html.escape(m)}</td><td>{v:.3f}</td></tr>" for m, v in s["seconds_per_512_slice"].items())
        + f"</table><p class=note>device {html.escape(s['device'])}, {s['torch_threads']} torch threads</p>")
    parts.append("<h2>Examples (median medvae PSNR patch per level)</h2>")
    for level, ex in examples.items():
        norm = store.normalization(ex["modality"])
        parts.append(f"<h3>{html.escape(s['level_name'])} {float(level):g}: patient {html.escape(ex['patient_id'])}"
                     f"</h3><img src='data:image/png;base64,{_triptych(ex, norm)}'>")
    parts.append("<h2>Per patient (PSNR dB, mean)</h2><table><tr><th>patient</th><th>level</th>" + "".join(
        f"<th>{html.escape(m)}</th>" for m in s["methods"]) + "</tr>")
    for pid, by_level in s["per_patient"].items():
        for level, by_method in by_level.items():
            parts.append(f"<tr><td class=m>{html.escape(pid)}</td><td>{float(level):g}</td>" + "".join(
                f"<td>{by_method[m]['psnr']['mean']:.2f}</td>" for m in s["methods"] if m in by_method) + "</tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)


def write_denoise_report(summary: dict, examples: dict, store, path) -> None:
    """Atomically write the self-contained report.html of a denoise run."""
    write_text(path, render_denoise_report(summary, examples, store))

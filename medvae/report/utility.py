"""report.html and utility.png of a utility study (medvae.utility): each metric against the real
fraction per arm with 95 % confidence intervals over seeds, and the paired differences to the real
arm, in one self-contained page (inline CSS, the plot as base64 PNG).

Takes the utility.json dict only, so the report layer needs nothing from the study code above it.
"""

from __future__ import annotations

import html

from medvae.files import write_text
from medvae.report import figures as F
from medvae.report.denoise import _CSS
from medvae.report.text import fmt

ARM_COLORS = {"real": F.ACCENT, "real+synthetic": "#38a169", "synthetic": F.SYNTH, "fidelity": "#805ad5"}


def _error_bars(cells: list[dict]) -> list[list[float]]:
    """Bar lengths below and above each mean (0 where the interval is undefined: one seed)."""
    return [[c["mean"] - c["ci_low"] if c["ci_low"] is not None else 0.0 for c in cells],
            [c["ci_high"] - c["mean"] if c["ci_high"] is not None else 0.0 for c in cells]]


def utility_figure(summary: dict) -> str:
    """One panel per metric: mean over seeds against the real fraction (log axis) per arm, bars = 95 % CI."""
    plt = F.plt
    metrics = summary["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for j, (arm, by_fraction) in enumerate(summary["arms"].items()):
            pts = [(float(f), m[metric]) for f, m in by_fraction.items() if m[metric]["mean"] is not None]
            if pts:
                cells = [c for _, c in pts]
                ax.errorbar([f * 1.04 ** (j - 1) for f, _ in pts],  # a small offset per arm keeps bars apart
                            [c["mean"] for c in cells], yerr=_error_bars(cells), marker="o", ms=4, capsize=3,
                            color=ARM_COLORS.get(arm), label=arm)
        info = summary["metric_info"][metric]
        # few seeds give wide t intervals: keep the axis to the metric's range ([0, 1] for fractions, >= 0 else)
        ax.set_ylim(*((0, 1.02) if info["unit"] == "unitless" else (0, None)))
        ax.set_xscale("log")
        ax.set_xticks(summary["fractions"], [f"{f:g}" for f in summary["fractions"]])
        ax.minorticks_off()
        ax.set_xlabel("real fraction of the train split")
        ax.set_ylabel(f"{info['label']} ({info['unit']})")
        ax.set_title(f"{info['label']} ({info['better']} is better)")
        ax.legend(frameon=False)
    return F._png(fig)


def _cell(c: dict | None, signed: bool = False) -> str:
    """``mean ± half-width`` of a t interval (``mean (n=1)`` without one)."""
    if c is None or c["mean"] is None:
        return "<td>–</td>"
    mean = ("+" if signed and c["mean"] >= 0 else "") + fmt(c["mean"])
    if c["ci_high"] is None:
        return f"<td>{mean} <span class=note>(n={c['n']})</span></td>"
    excludes_zero = signed and (c["ci_low"] > 0 or c["ci_high"] < 0)
    cls = " class=best" if excludes_zero else ""
    return f"<td{cls}>{mean} ± {fmt(c['ci_high'] - c['mean'])}</td>"


def _table(summary: dict, metric: str) -> str:
    arms, diffs = summary["arms"], summary["paired_differences"]
    head = "".join(f"<th>{html.escape(a)}</th>" for a in arms) + "".join(
        f"<th>Δ {html.escape(d)}</th>" for d in diffs)
    rows = [f"<tr><th>real fraction</th>{head}</tr>"]
    for f in summary["fractions"]:
        key = f"{f:g}"
        cells = "".join(_cell(arms[a].get(key, {}).get(metric)) for a in arms)
        cells += "".join(_cell(diffs[d].get(key, {}).get(metric), signed=True) for d in diffs)
        rows.append(f"<tr><td class=m>{key}</td>{cells}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def utility_tables(summary: dict) -> dict[str, str]:
    """Metric label -> its HTML table (fractions x arms and paired differences), for the evaluation report."""
    return {f"{summary['metric_info'][m]['label']} ({summary['metric_info'][m]['unit']}, "
            f"{summary['metric_info'][m]['better']} is better)": _table(summary, m) for m in summary["metrics"]}


def render_utility_report(summary: dict, figure: str) -> str:
    """The report as one HTML string; ``figure`` is :func:`utility_figure`'s base64 PNG."""
    s, cfg = summary, summary["config"]
    source = (f"the synthetic store <b>{html.escape(s['synthetic'])}</b> at every fraction" if s["synthetic"] else
              f"a <b>{html.escape(cfg['model'])}</b> generator conditioned on <b>{html.escape(s['condition'])}</b>, "
              f"trained for {cfg['generator_steps']} steps on each real subset only, {cfg['ratio']:g} synthetic "
              "images per real one")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>medvae utility: {html.escape(s['store'])}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>Utility of synthetic data: {html.escape(s['task'])}</h1>",
             f"<p>store <b>{html.escape(s['store'])}</b>; synthetic data from {source}. The same downstream network "
             f"({cfg['downstream_steps']} steps, batch {cfg['batch_size']}, lr {cfg['lr']:g}, random flips, the "
             f"cell's seed) is trained on each arm and scored on the {s['n_test']} real test patches. Mean over "
             f"{s['seeds']} seeds ± the half-width of the 95 % Student-t interval; Δ is the paired difference to "
             "the real arm (same seed, same real subset), highlighted where its interval excludes 0. "
             "<b>fidelity</b> is the real arm's network scored on the synthetic images against the labels they "
             "were generated with: near the real arm's test score, the synthetic labels are as right as real ones.</p>",
             f"<img src='data:image/png;base64,{figure}' alt='metric against real fraction'>"]
    parts += [f"<h2>{html.escape(title)}</h2>{table}" for title, table in utility_tables(s).items()]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_utility_report(summary: dict, figure: str, path) -> None:
    """Atomically write the self-contained report.html of a utility study."""
    write_text(path, render_utility_report(summary, figure))

"""report.html and utility.png of a utility study (medvae.utility): each metric against the label
budget per arm with 95 % confidence intervals over seeds, the paired differences, and one sentence
per budget saying what to do, in one self-contained page (inline CSS, the plot as base64 PNG).

Takes the utility.json dict only, so the report layer needs nothing from the study code above it.
"""

from __future__ import annotations

import html

from medvae.files import write_text
from medvae.report import figures as F
from medvae.report.denoise import _CSS
from medvae.report.text import fmt

ARM_COLORS = {"real": F.ACCENT, "real+classical": "#718096", "real+synthetic": "#38a169",
              "real+classical+synthetic": "#2f855a", "synthetic": F.SYNTH, "fidelity": "#805ad5"}


def _x(summary: dict) -> tuple[dict[str, float], str]:
    """Each budget's position on the x axis, and the axis label."""
    budgets = summary["budgets"]
    if budgets and budgets[0]["labels_per_class"] is not None:
        return {b["key"]: float(b["labels_per_class"]) for b in budgets}, "labels per class"
    return {b["key"]: float(b["fraction"]) for b in budgets}, "real fraction of the train split"


def budget_label(budget: dict) -> str:
    """``10 labels per class`` or ``5 % of the labels``."""
    if budget["labels_per_class"] is not None:
        return f"{budget['labels_per_class']} labels per class"
    return f"{budget['fraction'] * 100:g} % of the labels"


def verdicts(summary: dict) -> list[str]:
    """One sentence per budget on the task's first metric: what synthetic data adds on top of classical
    augmentation (or on top of real data alone when the study ran no classical arm), with the paired
    95 % interval; "no measurable gain" when the interval holds 0."""
    metric = summary["metrics"][0]
    info = summary["metric_info"][metric]
    diffs = summary["paired_differences"]
    pair = next((p for p in ("real+classical+synthetic - real+classical", "real+synthetic - real") if p in diffs),
                None)
    if pair is None:
        return []
    over = "classical augmentation" if "classical" in pair else "the real data alone"
    scale, unit = (100.0, " points") if info["unit"] == "unitless" else (1.0, f" {info['unit']}")
    sign = 1 if info["better"] == "higher" else -1
    what = summary.get("synthesis") or "synthetic data"
    out = []
    for b in summary["budgets"]:
        c = diffs[pair].get(b["key"], {}).get(metric)
        if c is None or c["mean"] is None:
            continue
        mean = c["mean"] * scale * sign
        if c["ci_low"] is None:
            out.append(f"With {budget_label(b)}, {what} synthesis changes {info['label']} by {mean:+.1f}{unit} over "
                       f"{over} (one seed: no interval).")
            continue
        lo, hi = sorted((c["ci_low"] * scale * sign, c["ci_high"] * scale * sign))
        half = (hi - lo) / 2
        if lo > 0:
            verb = "adds"
        elif hi < 0:
            verb = "costs"
            mean = -mean
        else:
            out.append(f"With {budget_label(b)}, {what} synthesis gives no measurable gain in {info['label']} over "
                       f"{over} ({mean:+.1f} ± {half:.1f}{unit}).")
            continue
        out.append(f"With {budget_label(b)}, {what} synthesis {verb} {mean:.1f} ± {half:.1f}{unit} of "
                   f"{info['label']} over {over}.")
    return out


def _error_bars(cells: list[dict]) -> list[list[float]]:
    """Bar lengths below and above each mean (0 where the interval is undefined: one seed)."""
    return [[c["mean"] - c["ci_low"] if c["ci_low"] is not None else 0.0 for c in cells],
            [c["ci_high"] - c["mean"] if c["ci_high"] is not None else 0.0 for c in cells]]


def utility_figure(summary: dict) -> str:
    """One panel per metric: mean over seeds against the label budget (log axis) per arm, bars = 95 % CI."""
    plt = F.plt
    xs, xlabel = _x(summary)
    metrics = summary["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for j, (arm, by_budget) in enumerate(summary["arms"].items()):
            pts = [(xs[k], m[metric]) for k, m in by_budget.items() if m[metric]["mean"] is not None]
            if pts:
                cells = [c for _, c in pts]
                ax.errorbar([f * 1.04 ** (j - 1) for f, _ in pts],  # a small offset per arm keeps bars apart
                            [c["mean"] for c in cells], yerr=_error_bars(cells), marker="o", ms=4, capsize=3,
                            color=ARM_COLORS.get(arm), label=arm)
        info = summary["metric_info"][metric]
        # few seeds give wide t intervals: keep the axis to the metric's range ([0, 1] for fractions, >= 0 else)
        ax.set_ylim(*((0, 1.02) if info["unit"] == "unitless" else (0, None)))
        ax.set_xscale("log")
        ax.set_xticks(list(xs.values()), [f"{v:g}" for v in xs.values()])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{info['label']} ({info['unit']})")
        ax.set_title(f"{info['label']} ({info['better']} is better)")
        ax.legend(frameon=False, fontsize=7)
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
    rows = [f"<tr><th>label budget</th>{head}</tr>"]
    for b in summary["budgets"]:
        key = b["key"]
        cells = "".join(_cell(arms[a].get(key, {}).get(metric)) for a in arms)
        cells += "".join(_cell(diffs[d].get(key, {}).get(metric), signed=True) for d in diffs)
        rows.append(f"<tr><td class=m>{html.escape(budget_label(b))}</td>{cells}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def utility_tables(summary: dict) -> dict[str, str]:
    """Metric label -> its HTML table (budgets x arms and paired differences), for the evaluation report."""
    return {f"{summary['metric_info'][m]['label']} ({summary['metric_info'][m]['unit']}, "
            f"{summary['metric_info'][m]['better']} is better)": _table(summary, m) for m in summary["metrics"]}


def render_utility_report(summary: dict, figure: str) -> str:
    """The report as one HTML string; ``figure`` is :func:`utility_figure`'s base64 PNG."""
    s, cfg = summary, summary["config"]
    if s["synthetic"]:
        source = f"the synthetic store <b>{html.escape(s['synthetic'])}</b> at every budget"
    else:
        learned = ("every train image, without its label (one generator for the whole study)"
                   if s.get("unlabelled") == "all" else "each labelled subset only")
        made = (f"{cfg['per_image']} {html.escape(s['synthesis'])} variants of every labelled image"
                if s["synthesis"] != "prior" else f"{cfg['ratio']:g} prior samples per labelled image")
        kept = (f", kept when the real arm's network gives their label probability ≥ {cfg['filter_threshold']:g}"
                if s["task"] == "classify" and cfg["filter_threshold"] > 0 else "")
        source = (f"a <b>{html.escape(cfg['model'])}</b> generator (condition <b>{html.escape(s['condition'])}</b>, "
                  f"{cfg['generator_steps']} steps) learned from {learned}: {made}{kept}"
                  + (", without the samples the memorization audit flags" if cfg["drop_flagged"] else ""))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>medvae utility: {html.escape(s['store'])}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>Utility of synthetic data: {html.escape(s['task'])}</h1>",
             "".join(f"<p class=verdict><b>{html.escape(v)}</b></p>" for v in verdicts(s)),
             f"<p>store <b>{html.escape(s['store'])}</b>; synthetic data from {source}. The same downstream network "
             f"({cfg['downstream_steps']} steps, {cfg['batch_size']} real images per batch plus up to "
             f"{cfg['synthetic_share']:g}× as many synthetic ones in the +synthetic arms, lr {cfg['lr']:g}, the "
             f"cell's seed; random flips, or the classical augmentation in the +classical arms) is trained on each "
             f"arm and scored on the {s['n_test']} real test patches. Mean over {s['seeds']} seeds ± the half-width "
             "of the 95 % Student-t interval; Δ is a paired difference (same seed, same real subset and real "
             "batches), highlighted where its interval excludes 0. <b>fidelity</b> is the real arm's network scored "
             "on every synthetic candidate against the label it was made with: near the real arm's test score, the "
             "synthetic labels are as right as real ones.</p>",
             f"<img src='data:image/png;base64,{figure}' alt='metric against label budget'>"]
    parts += [f"<h2>{html.escape(title)}</h2>{table}" for title, table in utility_tables(s).items()]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_utility_report(summary: dict, figure: str, path) -> None:
    """Atomically write the self-contained report.html of a utility study."""
    write_text(path, render_utility_report(summary, figure))

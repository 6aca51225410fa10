"""report.html and utility.png of a utility study (medvae.downstream): each metric against the label
budget per arm with 95 % confidence intervals over seeds, the paired differences, and one sentence
per budget saying what to do, in one self-contained page (``templates/utility.html`` on the shared
base page and stylesheet, the plot as base64 PNG); the tables are the ``_utility.html`` macro the
evaluation report uses too.

Takes the utility.json dict only, so the report layer needs nothing from the study code above it.
"""

from __future__ import annotations

from medvae.files import write_text
from medvae.report import figures
from medvae.report.render import macro, render

ARM_COLORS = {"real": figures.ACCENT, "real+classical": "#718096", "real+synthetic": "#38a169",
              "real+classical+synthetic": "#2f855a", "synthetic": figures.SYNTH, "fidelity": "#805ad5"}


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
    plt = figures.plt
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
        # the data's range with a margin (arms differ by points, not by the whole [0, 1]); few seeds give
        # wide t intervals, so the axis stays within the metric's range ([0, 1] for fractions, >= 0 else)
        lo, hi = ax.get_ylim()
        pad = 0.05 * (hi - lo)
        ax.set_ylim(max(lo - pad, 0.0), min(hi + pad, 1.02) if info["unit"] == "unitless" else hi + pad)
        ax.set_xscale("log")
        ax.set_xticks(list(xs.values()), [f"{v:g}" for v in xs.values()])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{info['label']} ({info['unit']})")
        ax.set_title(f"{info['label']} ({info['better']} is better)")
        ax.legend(frameon=False, fontsize=7)
    return figures.to_png(fig)


def utility_tables(summary: dict) -> dict[str, str]:
    """Metric title -> its HTML table (budgets x arms and paired differences), for this report and the
    evaluation report."""
    table = macro("_utility.html", "utility_table")
    info = summary["metric_info"]
    labels = {b["key"]: budget_label(b) for b in summary["budgets"]}
    return {f"{info[m]['label']} ({info[m]['unit']}, {info[m]['better']} is better)": table(summary, m, labels)
            for m in summary["metrics"]}


def render_utility_report(summary: dict, figure: str) -> str:
    """The report as one HTML string; ``figure`` is :func:`utility_figure`'s base64 PNG."""
    return render("utility.html", s=summary, figure=figure, tables=utility_tables(summary),
                  verdicts=verdicts(summary))


def write_utility_report(summary: dict, figure: str, path) -> None:
    """Atomically write the self-contained report.html of a utility study."""
    write_text(path, render_utility_report(summary, figure))

"""report.html and utility.png of a utility study (medvae.utility): each metric against the real
fraction per arm with 95 % confidence intervals over seeds, and the paired differences to the real
arm, in one self-contained page (``templates/utility.html`` on the shared base page and stylesheet,
the plot as base64 PNG); the tables are the ``_utility.html`` macro the evaluation report uses too.

Takes the utility.json dict only, so the report layer needs nothing from the study code above it.
"""

from __future__ import annotations

from medvae.files import write_text
from medvae.report import figures
from medvae.report.render import macro, render

ARM_COLORS = {"real": figures.ACCENT, "real+synthetic": "#38a169", "synthetic": figures.SYNTH, "fidelity": "#805ad5"}


def _error_bars(cells: list[dict]) -> list[list[float]]:
    """Bar lengths below and above each mean (0 where the interval is undefined: one seed)."""
    return [[c["mean"] - c["ci_low"] if c["ci_low"] is not None else 0.0 for c in cells],
            [c["ci_high"] - c["mean"] if c["ci_high"] is not None else 0.0 for c in cells]]


def utility_figure(summary: dict) -> str:
    """One panel per metric: mean over seeds against the real fraction (log axis) per arm, bars = 95 % CI."""
    plt = figures.plt
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
    return figures.to_png(fig)


def utility_tables(summary: dict) -> dict[str, str]:
    """Metric title -> its HTML table (fractions x arms and paired differences), for this report and the
    evaluation report."""
    table = macro("_utility.html", "utility_table")
    info = summary["metric_info"]
    return {f"{info[m]['label']} ({info[m]['unit']}, {info[m]['better']} is better)": table(summary, m)
            for m in summary["metrics"]}


def render_utility_report(summary: dict, figure: str) -> str:
    """The report as one HTML string; ``figure`` is :func:`utility_figure`'s base64 PNG."""
    return render("utility.html", s=summary, figure=figure, tables=utility_tables(summary))


def write_utility_report(summary: dict, figure: str, path) -> None:
    """Atomically write the self-contained report.html of a utility study."""
    write_text(path, render_utility_report(summary, figure))

"""report.html and utility.png of a utility study (medvae.downstream): the verdict first, then the arms
ranked best first per label budget with 95 % confidence intervals over seeds and the paired differences,
the plot (one budget: a ranked horizontal bar chart; several: each arm's line over the budgets, legend
best first), and the synthetic set's own properties (kept fraction, label fidelity), in one
self-contained page (``templates/utility.html`` on the shared base page and stylesheet, the plot as
base64 PNG); the tables are the ``_utility.html`` macros the evaluation report uses too.

Takes the utility.json dict only, so the report layer needs nothing from the study code above it.
"""

from __future__ import annotations

from medvae.files import write_text
from medvae.report import figures
from medvae.report.render import macro, render

ARM_COLORS = {"real": figures.ACCENT, "real+classical": "#718096", "real+synthetic": "#38a169",
              "real+classical+synthetic": "#2f855a", "synthetic": figures.SYNTH, "pseudo": "#805ad5",
              "pseudo+synthetic": "#b794f4", "fixmatch": "#c53030", "fixmatch+synthetic": "#fc8181",
              "latent": "#d69e2e", "m2": "#319795"}
ON_TOP = "+synthetic"
OLD_FIDELITY = "fidelity"  # a utility.json written before the verdict lists label fidelity among the arms


def arms_of(summary: dict) -> list[str]:
    """The study's arms in utility.json order (label fidelity, a property of the synthetic set, left out)."""
    return [a for a in summary["arms"] if a != OLD_FIDELITY]


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


def rank_arms(summary: dict, budget: str, metric: str) -> list[str]:
    """The arms with a mean at ``budget``, best first by ``metric`` (ties in the study's arm order)."""
    higher = summary["metric_info"][metric]["better"] == "higher"
    means = {a: summary["arms"][a][budget][metric]["mean"] for a in arms_of(summary)
             if (summary["arms"][a].get(budget, {}).get(metric) or {}).get("mean") is not None}
    return sorted(means, key=lambda a: -means[a] if higher else means[a])


def _error_bars(cells: list[dict]) -> list[list[float]]:
    """Bar lengths below and above each mean (0 where the interval is undefined: one seed)."""
    return [[c["mean"] - c["ci_low"] if c["ci_low"] is not None else 0.0 for c in cells],
            [c["ci_high"] - c["mean"] if c["ci_high"] is not None else 0.0 for c in cells]]


def _bars(ax, summary: dict, budget: str, metric: str, unitless: bool) -> None:
    """The arms at one budget as horizontal bars, best on top, with their 95 % intervals; the axis spans the
    intervals (arms differ by points, so bars from 0 would hide the differences)."""
    arms = rank_arms(summary, budget, metric)[::-1]  # barh draws the first at the bottom
    cells = [summary["arms"][a][budget][metric] for a in arms]
    lo, hi = _limits(min(c["ci_low"] if c["ci_low"] is not None else c["mean"] for c in cells),
                     max(c["ci_high"] if c["ci_high"] is not None else c["mean"] for c in cells), unitless)
    ax.barh(range(len(arms)), [c["mean"] - lo for c in cells], left=lo, xerr=_error_bars(cells), capsize=3,
            color=[ARM_COLORS.get(a, "#a0aec0") for a in arms], height=0.6)
    ax.set_xlim(lo, hi)
    ax.set_yticks(range(len(arms)), arms)
    for i, c in enumerate(cells):
        ax.annotate(f"{c['mean']:.3f}", (lo, i), xytext=(3, -3), textcoords="offset points", fontsize=7,
                    color="white")


def _lines(ax, summary: dict, metric: str, xs: dict[str, float], xlabel: str) -> None:
    """Each arm's mean over the budgets (log axis), bars = 95 % CI, legend best first at the largest budget."""
    largest = summary["budgets"][-1]["key"]
    ranked = rank_arms(summary, largest, metric)
    order = ranked + [a for a in arms_of(summary) if a not in ranked]
    for j, arm in enumerate(order):
        by_budget = summary["arms"][arm]
        pts = [(xs[k], m[metric]) for k, m in by_budget.items() if (m.get(metric) or {}).get("mean") is not None]
        if pts:
            cells = [c for _, c in pts]
            ax.errorbar([f * 1.03 ** (j - len(order) / 2) for f, _ in pts],  # a small offset per arm keeps bars apart
                        [c["mean"] for c in cells], yerr=_error_bars(cells), marker="o", ms=4, capsize=3,
                        color=ARM_COLORS.get(arm), label=arm)
    ax.set_xscale("log")
    ax.set_xticks(list(xs.values()), [f"{v:g}" for v in xs.values()])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.legend(frameon=False, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))


def _limits(lo: float, hi: float, unitless: bool) -> tuple[float, float]:
    """The data's range with a margin (arms differ by points, not by the whole [0, 1]); few seeds give wide
    t intervals, so the axis stays within the metric's range ([0, 1] for fractions, >= 0 else)."""
    pad = 0.08 * (hi - lo) or 0.01
    return max(lo - pad, 0.0), (min(hi + pad, 1.02) if unitless else hi + pad)


def utility_figure(summary: dict) -> str:
    """One panel per metric: a ranked bar chart (one budget) or lines over the budgets (several)."""
    plt = figures.plt
    xs, xlabel = _x(summary)
    metrics = summary["metrics"]
    one = len(summary["budgets"]) == 1
    n_arms = len(arms_of(summary))
    size = (6.0, 1.1 + 0.36 * n_arms) if one else (6.4, 3.8)
    fig, axes = plt.subplots(1, len(metrics), figsize=(size[0] * len(metrics), max(size[1], 2.4)), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        info = summary["metric_info"][metric]
        label = f"{info['label']} ({info['unit']})"
        if one:
            budget = summary["budgets"][0]
            _bars(ax, summary, budget["key"], metric, info["unit"] == "unitless")
            ax.set_xlabel(label)
            ax.set_title(f"{info['label']} at {budget_label(budget)} ({info['better']} is better)", fontsize=9)
        else:
            _lines(ax, summary, metric, xs, xlabel)
            ax.set_ylim(*_limits(*ax.get_ylim(), info["unit"] == "unitless"))
            ax.set_ylabel(label)
            ax.set_title(f"{info['label']} ({info['better']} is better)", fontsize=9)
    fig.tight_layout()
    return figures.to_png(fig)


def ranked_rows(summary: dict, metric: str) -> list[dict]:
    """Per budget (smallest first): ``{"key", "label", "rows": [{"arm", "cell", "vs_real", "base", "on_top"}]}``,
    the arms best first; ``on_top`` is ``X+synthetic − X`` on the row of ``X+synthetic`` (``base`` = X)."""
    diffs = summary["paired_differences"]
    out = []
    for b in summary["budgets"]:
        key, rows = b["key"], []
        for arm in rank_arms(summary, key, metric):
            base = arm.removesuffix(ON_TOP) if arm.endswith(ON_TOP) else None
            rows.append({"arm": arm, "cell": summary["arms"][arm][key][metric],
                         "vs_real": _diff(diffs, f"{arm} - real", key, metric), "base": base,
                         "on_top": _diff(diffs, f"{arm} - {base}", key, metric) if base else None})
        out.append({"key": key, "label": budget_label(b), "rows": rows})
    return out


def _diff(diffs: dict, name: str, budget: str, metric: str) -> dict | None:
    return (diffs.get(name) or {}).get(budget, {}).get(metric)


def utility_tables(summary: dict) -> dict[str, str]:
    """Metric title -> its HTML table (per budget the arms best first, with the paired differences), for
    this report and the evaluation report."""
    table = macro("_utility.html", "ranked_table")
    info = summary["metric_info"]
    return {f"{info[m]['label']} ({info[m]['unit']}, {info[m]['better']} is better)":
            table(ranked_rows(summary, m), info[m], info[m]["better"] == "higher")
            for m in summary["metrics"]}


def synthetic_set_table(summary: dict) -> str:
    """The synthetic set per budget: candidates, kept fraction, flagged and label fidelity ("" without one)."""
    fidelity, kept = summary.get("label_fidelity") or {}, summary.get("filter") or {}
    if not fidelity and not kept:
        return ""
    budgets = [b for b in summary["budgets"] if b["key"] in fidelity or b["key"] in kept]
    return macro("_utility.html", "synthetic_table")(budgets, {b["key"]: budget_label(b) for b in budgets},
                                                     fidelity, kept, summary["metrics"], summary["metric_info"])


def render_utility_report(summary: dict, figure: str) -> str:
    """The report as one HTML string; ``figure`` is :func:`utility_figure`'s base64 PNG."""
    return render("utility.html", s=summary, figure=figure, tables=utility_tables(summary),
                  synthetic_table=synthetic_set_table(summary), verdict=summary.get("verdict") or {})


def write_utility_report(summary: dict, figure: str, path) -> None:
    """Atomically write the self-contained report.html of a utility study."""
    write_text(path, render_utility_report(summary, figure))

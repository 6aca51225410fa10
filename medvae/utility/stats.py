"""Statistics over seeds: mean, standard deviation and a Student-t confidence interval, and the
paired difference of an arm and the real arm (paired by seed, which shares the real subset, the
initial weights and the batch order, so the difference cancels what the arms have in common).

With n seeds the interval is ``mean ± t(0.975, n - 1) · sd / √n`` (sd with n - 1 in the
denominator); with one seed sd and the interval are undefined and reported as None. Values that
are not finite (an HD95 with no foreground in the test set) are left out and n counts the rest.
"""

from __future__ import annotations

import math
from collections import defaultdict

from medvae.metrics.stats import finite_stats

BASELINE = "real"


def fraction_key(fraction: float) -> str:
    """How a fraction is written in keys and paths: ``0.05``, ``1``."""
    return f"{fraction:g}"


def t_interval(values, level: float = 0.95) -> dict:
    """``{"mean", "sd", "n", "ci_low", "ci_high"}`` of the finite ``values``
    (:func:`medvae.metrics.stats.finite_stats`), None where undefined: the mean of no value, the sd and
    the interval of fewer than two (utility.json writes null, never NaN)."""
    out = finite_stats(values, level)
    if out["n"] < 2:  # one seed: no interval, and utility.json reports the sd as undefined along with it
        out["sd"] = math.nan
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in out.items()}


def summarize(rows: list[dict]) -> dict:
    """Per arm, fraction and metric a :func:`t_interval` over seeds, and the paired differences.

    Args:
        rows: dicts with ``arm, fraction, seed, metric, value`` (utility.csv's rows).
    Returns:
        ``{"arms": {arm: {fraction_key: {metric: interval}}},
        "paired_differences": {"<arm> - real": {fraction_key: {metric: interval}}}}``.
    """
    values: dict = defaultdict(dict)  # (arm, fraction, metric) -> {seed: value}
    for r in rows:
        values[r["arm"], fraction_key(r["fraction"]), r["metric"]][r["seed"]] = r["value"]
    arms: dict = defaultdict(lambda: defaultdict(dict))
    diffs: dict = defaultdict(lambda: defaultdict(dict))
    for (arm, frac, metric), by_seed in values.items():
        arms[arm][frac][metric] = t_interval(by_seed.values())
        base = values.get((BASELINE, frac, metric))
        if arm != BASELINE and base is not None:
            paired = [by_seed[s] - base[s] for s in sorted(set(by_seed) & set(base))]
            diffs[f"{arm} - {BASELINE}"][frac][metric] = t_interval(paired)
    as_dict = lambda d: {k: dict(v) for k, v in d.items()}  # noqa: E731
    return {"arms": as_dict(arms), "paired_differences": as_dict(diffs)}

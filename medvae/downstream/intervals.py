"""Statistics over seeds: mean, standard deviation and a Student-t confidence interval, and paired
differences between arms (paired by seed, which shares the real subset, the initial weights, the
real batches and their augmentation, so the difference cancels what the arms have in common):
each arm against ``real``, and each ``X+synthetic`` against ``X`` (does synthetic data add anything
on top of classical augmentation, of self-training, of FixMatch?).

With n seeds the interval is ``mean ± t(0.975, n - 1) · sd / √n`` (sd with n - 1 in the
denominator); with one seed sd and the interval are undefined and reported as None. Values that
are not finite (an HD95 with no foreground in the test set) are left out and n counts the rest.
"""

from __future__ import annotations

import math
from collections import defaultdict

from medvae.metrics.stats import finite_stats

BASELINE = "real"
ON_TOP = "+synthetic"  # X+synthetic is compared with X: what synthetic images add on top of that arm


def t_interval(values, level: float = 0.95) -> dict:
    """``{"mean", "sd", "n", "ci_low", "ci_high"}`` of the finite ``values``
    (:func:`medvae.metrics.stats.finite_stats`), None where undefined: the mean of no value, the sd and
    the interval of fewer than two (utility.json writes null, never NaN)."""
    out = finite_stats(values, level)
    if out["n"] < 2:  # one seed: no interval, and utility.json reports the sd as undefined along with it
        out["sd"] = math.nan
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in out.items()}


def summarize(rows: list[dict]) -> dict:
    """Per arm, budget and metric a :func:`t_interval` over seeds, and the paired differences.

    Args:
        rows: dicts with ``arm, budget, seed, metric, value`` (utility.csv's rows; ``budget`` the key of a
            label budget, e.g. ``0.05`` or ``10pc``).
    Returns:
        ``{"arms": {arm: {budget: {metric: interval}}},
        "paired_differences": {"<arm> - <other>": {budget: {metric: interval}}}}``.
    """
    values: dict = defaultdict(dict)  # (arm, budget, metric) -> {seed: value}
    for r in rows:
        values[r["arm"], str(r["budget"]), r["metric"]][r["seed"]] = r["value"]
    arms: dict = defaultdict(lambda: defaultdict(dict))
    diffs: dict = defaultdict(lambda: defaultdict(dict))
    names = list(dict.fromkeys(k[0] for k in values))
    pairs = [(a, BASELINE) for a in names if a != BASELINE] + [
        (a, a.removesuffix(ON_TOP)) for a in names if a.endswith(ON_TOP) and a.removesuffix(ON_TOP) != BASELINE]
    for (arm, budget, metric), by_seed in values.items():
        arms[arm][budget][metric] = t_interval(by_seed.values())
    for arm, other in pairs:
        for (a, budget, metric), by_seed in values.items():
            base = values.get((other, budget, metric))
            if a != arm or base is None:
                continue
            paired = [by_seed[s] - base[s] for s in sorted(set(by_seed) & set(base))]
            diffs[f"{arm} - {other}"][budget][metric] = t_interval(paired)
    as_dict = lambda d: {k: dict(v) for k, v in d.items()}  # noqa: E731
    return {"arms": as_dict(arms), "paired_differences": as_dict(diffs)}

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

import numpy as np

BASELINE = "real"


def fraction_key(fraction: float) -> str:
    """How a fraction is written in keys and paths: ``0.05``, ``1``."""
    return f"{fraction:g}"


def t_interval(values, level: float = 0.95) -> dict:
    """``{"mean", "sd", "n", "ci_low", "ci_high"}`` of the finite ``values`` (None where undefined)."""
    from scipy.stats import t  # scipy.stats is slow to import

    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    n = len(v)
    out = {"mean": float(v.mean()) if n else None, "sd": None, "n": n, "ci_low": None, "ci_high": None}
    if n > 1:
        sd = float(v.std(ddof=1))
        half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
        out.update(sd=sd, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    return out


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

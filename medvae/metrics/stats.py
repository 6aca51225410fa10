"""Summary statistics of a set of measurements: the one definition every table of medvae uses.

The evaluation's per-patient and per-modality tables, the denoise tables and the utility study's
statistics over seeds all summarise the *finite* values of a set (a PSNR of a perfect
reconstruction is +inf, an HD95 without foreground NaN: such values are left out and ``n`` counts
the rest) by :func:`finite_stats`:

- ``mean``: the arithmetic mean; NaN for an empty set.
- ``sd``: the sample standard deviation (``n - 1`` in the denominator, ``np.std(ddof=1)``); 0.0 for
  a single value (no spread observed: metrics.csv and the reports show 0 for a one-patch patient),
  NaN for an empty set. The utility study reports a single seed's sd as undefined (null), because
  it reports it with the interval (:func:`medvae.downstream.intervals.t_interval`).
- ``ci_low``, ``ci_high`` (with ``level``): the Student-t interval of the mean,
  ``mean ± t(0.5 + level / 2, n - 1) · sd / √n``; NaN with fewer than two values (no degrees of
  freedom).

The empty set is answered in this one place: nothing measured gives NaN for every statistic, never a
number that reads like a measurement. Callers writing JSON turn NaN into null where their format
says so (the utility study).
"""

from __future__ import annotations

import math

import numpy as np


def finite_stats(values, level: float | None = None) -> dict:
    """Mean, sample standard deviation and count of the finite ``values`` (and their t interval).

    Args:
        values: numbers: an array of any shape or an iterable; None, NaN and ±inf are left out.
        level: confidence level of the Student-t interval of the mean (e.g. 0.95); None: no interval.

    Returns:
        ``{"mean": float, "sd": float, "n": int}``, plus ``"ci_low"``, ``"ci_high"`` (floats) when
        ``level`` is given; the module docstring says what each is for 0 and 1 values.
    """
    v = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    n = int(v.size)
    mean = float(v.mean()) if n else math.nan
    sd = float(v.std(ddof=1)) if n > 1 else 0.0 if n else math.nan
    out = {"mean": mean, "sd": sd, "n": n}
    if level is not None:
        half = math.nan
        if n > 1:
            from scipy.stats import t  # scipy.stats is slow to import; only where an interval is asked for

            half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
        out.update(ci_low=mean - half, ci_high=mean + half)
    return out

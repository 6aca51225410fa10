"""finite_stats against numpy and scipy, and its answers for no value and one value."""

import math

import numpy as np
import pytest
from scipy import stats

from medvae.metrics.stats import finite_stats


@pytest.mark.parametrize("n", [2, 3, 7, 50])
def test_matches_numpy_and_scipy(n):
    v = np.random.default_rng(n).normal(3.0, 2.0, n)
    got = finite_stats(v, level=0.95)
    assert got["n"] == n
    assert got["mean"] == pytest.approx(np.mean(v), rel=1e-12)
    assert got["sd"] == pytest.approx(np.std(v, ddof=1), rel=1e-12)
    lo, hi = stats.t.interval(0.95, n - 1, loc=np.mean(v), scale=stats.sem(v))
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((lo, hi), rel=1e-10)
    lo90, hi90 = stats.t.interval(0.9, n - 1, loc=np.mean(v), scale=stats.sem(v))
    assert (finite_stats(v, 0.9)["ci_low"], finite_stats(v, 0.9)["ci_high"]) == pytest.approx((lo90, hi90))


def test_non_finite_values_are_left_out_and_not_counted():
    v = [1.0, float("nan"), 2.0, float("inf"), None, -float("inf"), 4.0]
    got = finite_stats(v)
    assert got == {"mean": pytest.approx(7 / 3), "sd": pytest.approx(np.std([1, 2, 4], ddof=1)), "n": 3}
    assert set(got) == {"mean", "sd", "n"}  # no interval unless a level is given
    # any shape and any iterable
    assert finite_stats(np.arange(6.0).reshape(2, 3))["n"] == 6 and finite_stats(iter([1.0, 3.0]))["mean"] == 2.0


def test_empty_set_is_nan_everywhere():
    for empty in ([], np.array([]), [float("nan"), None], np.full(3, np.inf)):
        got = finite_stats(empty, level=0.95)
        assert got["n"] == 0
        assert all(math.isnan(got[k]) for k in ("mean", "sd", "ci_low", "ci_high"))


def test_one_value_has_sd_zero_and_no_interval():
    got = finite_stats([0.5, float("nan")], level=0.95)
    assert got["mean"] == 0.5 and got["sd"] == 0.0 and got["n"] == 1
    assert math.isnan(got["ci_low"]) and math.isnan(got["ci_high"])

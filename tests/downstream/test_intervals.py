"""Means, Student-t intervals over seeds and paired differences, against hand-computed values."""

import math

import pytest
from scipy import stats

from medvae.downstream.intervals import summarize, t_interval

T975_DF2 = 4.302652729911275  # t(0.975, 2), from tables


def test_t_interval_by_hand():
    out = t_interval([1.0, 2.0, 3.0])
    half = T975_DF2 * 1.0 / math.sqrt(3)
    assert out["mean"] == pytest.approx(2.0) and out["sd"] == pytest.approx(1.0) and out["n"] == 3
    assert out["ci_low"] == pytest.approx(2.0 - half) and out["ci_high"] == pytest.approx(2.0 + half)
    assert stats.t.ppf(0.975, 2) == pytest.approx(T975_DF2)
    v = [0.61, 0.58, 0.66, 0.7]
    lo, hi = stats.t.interval(0.95, len(v) - 1, loc=sum(v) / 4, scale=stats.sem(v))
    assert (t_interval(v)["ci_low"], t_interval(v)["ci_high"]) == pytest.approx((lo, hi))


def test_t_interval_undefined_parts():
    assert t_interval([0.5]) == {"mean": 0.5, "sd": None, "n": 1, "ci_low": None, "ci_high": None}
    assert t_interval([float("nan"), 2.0, 4.0])["n"] == 2  # not finite: left out
    assert t_interval([])["mean"] is None


def test_summarize_pairs_by_seed():
    rows = []
    real, both = {0: 0.50, 1: 0.60, 2: 0.55}, {0: 0.58, 1: 0.61, 2: 0.65}
    for seed in range(3):
        rows += [{"arm": "real", "budget": "0.1", "seed": seed, "metric": "accuracy", "value": real[seed]},
                 {"arm": "real+synthetic", "budget": "0.1", "seed": seed, "metric": "accuracy", "value": both[seed]}]
    s = summarize(rows)
    assert s["arms"]["real"]["0.1"]["accuracy"]["mean"] == pytest.approx(0.55)
    d = s["paired_differences"]["real+synthetic - real"]["0.1"]["accuracy"]
    diffs = [0.08, 0.01, 0.10]  # by hand
    mean, sd = sum(diffs) / 3, stats.tstd(diffs)
    assert d["mean"] == pytest.approx(mean) and d["sd"] == pytest.approx(sd)
    assert d["ci_high"] - d["mean"] == pytest.approx(T975_DF2 * sd / math.sqrt(3))
    assert "real" not in {k.split(" - ")[0] for k in s["paired_differences"]}


def test_synthesis_on_top_of_classical_is_paired_with_classical():
    rows = []
    for seed, (c, cs) in enumerate([(0.70, 0.74), (0.68, 0.71), (0.72, 0.73)]):
        rows += [{"arm": "real", "budget": "10pc", "seed": seed, "metric": "accuracy", "value": 0.6},
                 {"arm": "real+classical", "budget": "10pc", "seed": seed, "metric": "accuracy", "value": c},
                 {"arm": "real+classical+synthetic", "budget": "10pc", "seed": seed, "metric": "accuracy",
                  "value": cs}]
    d = summarize(rows)["paired_differences"]
    assert set(d) == {"real+classical - real", "real+classical+synthetic - real",
                      "real+classical+synthetic - real+classical"}
    paired = d["real+classical+synthetic - real+classical"]["10pc"]["accuracy"]
    assert paired["mean"] == pytest.approx((0.04 + 0.03 + 0.01) / 3)

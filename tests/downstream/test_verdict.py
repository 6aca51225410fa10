"""The verdict on a hand-made study: the best arm per budget, what synthetic images add on top of the best arm
without them (the paired interval checked against scipy.stats.t), the sentence and the command; and the
report's ranked table, best first per budget, with label fidelity apart from the arms."""

import re

import numpy as np
import pytest
from scipy import stats

from medvae.config import UtilityConfig
from medvae.downstream.intervals import summarize
from medvae.downstream.verdict import verdict
from medvae.report.downstream import render_utility_report, utility_figure

# accuracy per arm and seed at two budgets; by hand: at 10pc fixmatch+synthetic has the best mean (0.86),
# fixmatch the best without synthetic images (0.84); at 100pc fixmatch (0.90) beats fixmatch+synthetic (0.89)
VALUES = {"10pc": {"real": [0.70, 0.69, 0.71], "real+classical": [0.72, 0.71, 0.73], "synthetic": [0.60, 0.62, 0.61],
                   "real+synthetic": [0.71, 0.70, 0.70], "fixmatch": [0.84, 0.83, 0.85],
                   "fixmatch+synthetic": [0.86, 0.855, 0.865]},
          "100pc": {"real": [0.80, 0.79, 0.81], "real+classical": [0.82, 0.83, 0.81], "synthetic": [0.70, 0.71, 0.72],
                    "real+synthetic": [0.79, 0.80, 0.80], "fixmatch": [0.90, 0.91, 0.89],
                    "fixmatch+synthetic": [0.89, 0.905, 0.875]}}


def hand_summary(values=VALUES, seeds=3) -> dict:
    rows = [{"arm": arm, "budget": budget, "seed": s, "metric": "accuracy", "value": v[s]}
            for budget, arms in values.items() for arm, v in arms.items() for s in range(seeds)]
    cfg = UtilityConfig(labels_per_class=[10, 100], arms=list(VALUES["10pc"]), downstream_steps=300)
    summary = {"task": "classify", "store": "/data/my store", "synthetic": None, "synthesis": "neighbours",
               "condition": "none", "unlabelled": "all", "seeds": seeds, "n_test": 100, "metrics": ["accuracy"],
               "metric_info": {"accuracy": {"label": "accuracy", "unit": "unitless", "better": "higher"}},
               "budgets": [{"key": "10pc", "fraction": None, "labels_per_class": 10},
                           {"key": "100pc", "fraction": None, "labels_per_class": 100}],
               "config": cfg.model_dump(mode="json"), **summarize(rows),
               "label_fidelity": {"10pc": {"accuracy": {"mean": 0.93, "sd": 0.01, "n": 3, "ci_low": 0.9,
                                                        "ci_high": 0.96}}},
               "filter": {}}
    return {**summary, "verdict": verdict(summary)}


def scipy_interval(a, b):
    d = np.asarray(a) - np.asarray(b)
    return stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))


def test_the_best_arm_and_synthetic_on_top_of_the_best_without_it():
    v = hand_summary()["verdict"]
    assert v["metric"] == "accuracy"
    small, large = v["budgets"]
    assert small["ranking"] == ["fixmatch+synthetic", "fixmatch", "real+classical", "real+synthetic", "real",
                                "synthetic"]
    assert (small["arm"], small["base"], small["pair"]) == ("fixmatch+synthetic", "fixmatch",
                                                            "fixmatch+synthetic - fixmatch")
    lo, hi = scipy_interval(VALUES["10pc"]["fixmatch+synthetic"], VALUES["10pc"]["fixmatch"])
    assert (small["on_top"]["ci_low"], small["on_top"]["ci_high"]) == pytest.approx((lo, hi))
    assert small["on_top"]["mean"] == pytest.approx(0.02) and lo > 0 and small["judgement"] == "they help"
    assert small["best"]["mean"] == pytest.approx(0.86)
    assert (large["arm"], large["base"]) == ("fixmatch", "fixmatch")
    lo, hi = scipy_interval(VALUES["100pc"]["fixmatch+synthetic"], VALUES["100pc"]["fixmatch"])
    assert (large["on_top"]["ci_low"], large["on_top"]["ci_high"]) == pytest.approx((lo, hi))
    assert lo < 0 < hi and large["judgement"] == "not shown to help"


def test_the_sentences_and_the_command():
    small, large = hand_summary()["verdict"]["budgets"]
    # by hand: fixmatch+synthetic − fixmatch = 0.02, 0.025, 0.015 -> mean 2.0 points, sd 0.5, half-width
    # t(0.975, 2) · 0.5 / √3 = 4.303 · 0.2887 = 1.24 points; 86.0 % ± t · 0.005 / √3 = 1.24
    assert small["sentence"] == ("At 10 labels per class the best arm is fixmatch+synthetic, accuracy 86.0 % ± 1.2; "
                                 "synthetic images add +2.0 points on top of fixmatch, the best arm without them "
                                 "(+0.8 to +3.2: they help).")
    # at 100pc: −0.01, −0.005, −0.015 -> −1.0 ± 4.303 · 0.5 / √3 = 1.24 points; fixmatch 90.0 ± 4.303 · 1 / √3
    assert large["sentence"] == ("At 100 labels per class the best arm is fixmatch, accuracy 90.0 % ± 2.5; synthetic "
                                 "images add −1.0 points on top of it (−2.2 to +0.2: not shown to help).")
    assert small["command"] == ("medvae utility '/data/my store' --labels-per-class 10 --arms fixmatch+synthetic "
                                "--seeds 1 --downstream-steps 300 --out STUDY_DIR --export-model MODEL_DIR")


def test_a_missing_synthetic_arm_and_one_seed_are_said_plainly():
    values = {b: {a: v for a, v in arms.items() if a != "fixmatch+synthetic"} for b, arms in VALUES.items()}
    v = hand_summary(values)["verdict"]["budgets"][0]
    assert v["arm"] == "fixmatch" and v["on_top"] is None and v["judgement"] is None
    assert v["sentence"].endswith("the study ran no fixmatch+synthetic arm, so what synthetic images add on top of "
                                  "it is not measured.")
    one = hand_summary(seeds=1)["verdict"]["budgets"][0]
    assert one["sentence"] == ("At 10 labels per class the best arm is fixmatch+synthetic, accuracy 86.0 % (one seed); "
                               "synthetic images add +2.0 points on top of fixmatch, the best arm without them "
                               "(one seed: no interval).")


def test_the_report_ranks_the_arms_best_first_per_budget():
    summary = hand_summary()
    html = render_utility_report(summary, utility_figure(summary))
    assert html.index('id="verdict"') < html.index('id="design"')  # the verdict first
    assert summary["verdict"]["budgets"][0]["sentence"] in html and "--export-model MODEL_DIR" in html
    table = html[html.index('id="metric-1"'):html.index('id="synthetic-set"')]
    blocks = table.split('<tr class="budget">')[1:]
    for block, budget in zip(blocks, ("10pc", "100pc")):
        arms = re.findall(r'<td class="m">([^<]+)</td>', block)
        means = {a: np.mean(v) for a, v in VALUES[budget].items()}
        assert arms == sorted(means, key=lambda a: -means[a])  # best first, by the hand values
    assert "fidelity" not in table  # a property of the synthetic set, not an arm
    fidelity = html[html.index('id="synthetic-set"'):]
    assert "label fidelity: accuracy" in fidelity and "0.9300 ± 0.0300" in fidelity


def test_one_budget_plots_ranked_bars():
    from medvae.report import figures

    summary = hand_summary()
    one = {**summary, "budgets": summary["budgets"][:1]}
    captured = {}
    to_png = figures.to_png
    figures.to_png = lambda fig: captured.setdefault("fig", fig) and to_png(fig)
    try:
        utility_figure(one)
    finally:
        figures.to_png = to_png
    ax = captured["fig"].axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[::-1] == summary["verdict"]["budgets"][0]["ranking"]  # best on top
    assert len(ax.patches) == 6


def test_a_study_written_before_keeps_label_fidelity_out_of_the_ranking():
    """utility.json of before listed label fidelity as an arm (and "fidelity - real"): the evaluation report's
    tables and plot of such a study rank the arms only."""
    from medvae.report.downstream import rank_arms, utility_tables

    summary = hand_summary()
    cell = {"mean": 0.99, "sd": 0.0, "n": 3, "ci_low": 0.99, "ci_high": 0.99}  # would rank first
    old = {**summary, "arms": {**summary["arms"], "fidelity": {"10pc": {"accuracy": cell}}},
           "paired_differences": {**summary["paired_differences"], "fidelity - real": {"10pc": {"accuracy": cell}}}}
    old.pop("verdict")
    assert rank_arms(old, "10pc", "accuracy") == verdict(summary)["budgets"][0]["ranking"]
    assert "fidelity" not in next(iter(utility_tables(old).values()))
    utility_figure(old)

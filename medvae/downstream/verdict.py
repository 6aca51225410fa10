"""The study's verdict: per label budget, the best arm, what synthetic images add on top of the best arm
without them, and the command that trains that model for the user.

On the task's first metric (accuracy, Dice), per budget:

- the arms ranked by their mean over seeds (the synthetic-only arm included), best first;
- the best arm ``X`` that uses no synthetic image and, where the study ran ``X+synthetic``, the paired
  t-interval over seeds of ``X+synthetic − X`` (utility.json's paired differences,
  :mod:`medvae.downstream.intervals`): "help" where it lies above 0 in the metric's better direction,
  "hurt" below, "not shown to help" where it holds 0;
- one plain sentence, and the `medvae utility` command that trains the best arm (seed 0, as the study's
  first seed) and exports it (:mod:`medvae.downstream.export`).
"""

from __future__ import annotations

import shlex

from medvae.config import UtilityConfig
from medvae.report.downstream import budget_label, rank_arms

# UtilityConfig fields `medvae utility` sets with an option of its own (medvae.cli.utility)
CLI_OPTIONS = {"task": "--task", "model": "--model", "condition": "--condition", "synthesis": "--synthesis",
               "unlabelled": "--unlabelled", "per_image": "--per-image", "generator_run": "--generator-run",
               "filter_threshold": "--filter-threshold", "generator_steps": "--generator-steps",
               "downstream_steps": "--downstream-steps", "ratio": "--ratio"}
BUDGET_FIELDS = {"fractions", "labels_per_class", "seeds", "arms"}  # the command's own budget, arm and seed


def uses_synthetic(arm: str) -> bool:
    """Whether an arm trains on synthetic images (``synthetic``, ``X+synthetic``)."""
    return "synthetic" in arm


def verdict(summary: dict) -> dict:
    """``{"metric", "budgets": [{budget, labels_per_class, fraction, ranking, arm, best (interval), base,
    pair, on_top (interval or None), judgement, sentence, command}]}`` of utility.json's ``summary``."""
    metric = summary["metrics"][0]
    info = summary["metric_info"][metric]
    out = []
    for b in summary["budgets"]:
        ranking = rank_arms(summary, b["key"], metric)
        if not ranking:
            continue
        arm = ranking[0]
        base = next((a for a in ranking if not uses_synthetic(a)), None)
        pair = f"{base}+synthetic - {base}" if base is not None else None
        on_top = summary["paired_differences"].get(pair, {}).get(b["key"], {}).get(metric) if pair else None
        judgement = _judgement(on_top, info["better"] == "higher")
        best = summary["arms"][arm][b["key"]][metric]
        out.append({"budget": b["key"], "labels_per_class": b["labels_per_class"], "fraction": b["fraction"],
                    "ranking": ranking, "arm": arm, "best": best, "base": base,
                    "pair": pair if on_top is not None else None, "on_top": on_top, "judgement": judgement,
                    "sentence": _sentence(b, arm, best, base, on_top, judgement, info),
                    "command": command(summary, b, arm)})
    return {"metric": metric, "budgets": out}


def _judgement(c: dict | None, higher: bool) -> str | None:
    if c is None or c["ci_low"] is None:
        return None
    if (c["ci_low"] > 0) if higher else (c["ci_high"] < 0):
        return "they help"
    if (c["ci_high"] < 0) if higher else (c["ci_low"] > 0):
        return "they hurt"
    return "not shown to help"


def _num(v: float, signed: bool = False) -> str:
    """One decimal, with a true minus sign."""
    return (f"{v:+.1f}" if signed else f"{v:.1f}").replace("-", "−")


def _sentence(b: dict, arm: str, best: dict, base: str | None, on_top: dict | None, judgement: str | None,
              info: dict) -> str:
    pct = info["unit"] == "unitless"
    scale, unit, diff_unit = (100.0, " %", " points") if pct else (1.0, f" {info['unit']}", f" {info['unit']}")
    value = f"{_num(best['mean'] * scale)}{unit}"
    value += f" ± {_num((best['ci_high'] - best['mean']) * scale)}" if best["ci_high"] is not None else " (one seed)"
    text = f"At {budget_label(b)} the best arm is {arm}, {info['label']} {value}"
    if base is None:
        return text + "; every arm of the study uses synthetic images."
    it = "it" if base == arm else f"{base}, the best arm without them"
    if on_top is None:
        return text + f"; the study ran no {base}+synthetic arm, so what synthetic images add on top of {it} is " \
                      "not measured."
    verb = "add" if info["better"] == "higher" else f"change {info['label']} by"
    text += f"; synthetic images {verb} {_num(on_top['mean'] * scale, True)}{diff_unit} on top of {it}"
    if judgement is None:
        return text + " (one seed: no interval)."
    return text + f" ({_num(on_top['ci_low'] * scale, True)} to {_num(on_top['ci_high'] * scale, True)}: {judgement})."


def command(summary: dict, b: dict, arm: str) -> str:
    """`medvae utility` with the study's settings that trains ``arm`` at budget ``b`` (seed 0) and exports it;
    settings the command line cannot give are named after it."""
    cfg = summary["config"]
    default = UtilityConfig(model=cfg["model"]).model_dump(mode="json")
    parts = ["medvae", "utility", summary["store"]]
    parts += ["--labels-per-class", str(b["labels_per_class"])] if b["labels_per_class"] is not None else [
        "--fractions", f"{b['fraction']:g}"]
    parts += ["--arms", arm, "--seeds", "1"]
    parts += [p for k, flag in CLI_OPTIONS.items() if cfg.get(k) != default.get(k) for p in (flag, str(cfg[k]))]
    if summary.get("synthetic"):
        parts += ["--synthetic", summary["synthetic"]]
    parts += ["--out", "STUDY_DIR", "--export-model", "MODEL_DIR"]
    text = shlex.join(parts)
    other = sorted(k for k in cfg if k not in CLI_OPTIONS and k not in BUDGET_FIELDS and cfg[k] != default.get(k))
    if "generator" in other:
        text = text.replace(" --out ", " --config GENERATOR_YAML --out ", 1)
    if [k for k in other if k != "generator"]:
        text += "  # and the study's " + ", ".join(k for k in other if k != "generator") + " (utility.json config)"
    return text

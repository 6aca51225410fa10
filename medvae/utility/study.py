"""The utility study: does synthetic data help a downstream model trained on little real data?

For each real fraction f of the train split and each seed s (a "cell"):

1. the real subset (:mod:`medvae.utility.subsets`) is written as ``cells/f<f>_s<s>/real_store``;
2. a generator is trained on that store only and sampled into ``synthetic_store``
   (:mod:`medvae.utility.synthesis`), unless the user gave a synthetic store for every cell;
3. the same downstream network, steps and seed (:mod:`medvae.utility.downstream`) is trained on
   each arm — ``real``, ``real+synthetic``, ``synthetic`` — and scored on the real test split.

Resumable per (fraction, seed, arm): an arm's result is written atomically to
``cells/f<f>_s<s>/<arm>.json`` and a re-run skips it; a finished subset or synthetic store is
reused (complete only once its store.json exists); a half-trained generator resumes from its
``last.pt``. ``study.json`` records the settings that results depend on (all but the fractions and
seeds, which may grow), and a re-run with other settings in the same directory is refused.

Outputs in the study directory: ``utility.csv`` (``arm, fraction, seed, metric, value``),
``utility.json`` (:func:`medvae.utility.stats.summarize` plus settings), ``utility.png`` and
``report.html`` (:mod:`medvae.report.utility`).
"""

from __future__ import annotations

import base64
import csv
import functools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medvae.config import UtilityConfig
from medvae.data.store import PatchStore, open_store
from medvae.devices import select_device
from medvae.errors import InputError
from medvae.files import atomic_open, atomic_path, write_json
from medvae.metrics.table import TASK_METRICS, UTILITY_METRICS
from medvae.report.utility import utility_figure, write_utility_report
from medvae.utility.downstream import (
    LabelledSet,
    from_store,
    score_downstream,
    train_downstream,
)
from medvae.utility.stats import fraction_key, summarize
from medvae.utility.subsets import check_task, labelled_rows, subset_rows, write_subset_store
from medvae.utility.synthesis import synthesize, synthetic_rows, train_generator

log = logging.getLogger(__name__)
ARMS = ("real", "real+synthetic", "synthetic")
# Label fidelity: the real arm's network scored on the synthetic set against the labels it was generated
# with; near the real arm's test score, the synthetic labels are as right as real ones. Kept as a
# pseudo-arm, so utility.csv, the intervals and the paired difference to `real` cover it.
FIDELITY = "fidelity"
RESULTS = (*ARMS, FIDELITY)
CSV_COLUMNS = ("arm", "fraction", "seed", "metric", "value")
Progress = Callable[[int, int, str], None]  # (arms done, arms in all, what runs now)


def run_utility(store: PatchStore | str | os.PathLike, out: str | os.PathLike, cfg: UtilityConfig,
                device: str = "auto", synthetic: str | os.PathLike | None = None,
                progress: Progress | None = None) -> dict:
    """Run (or resume) the study on ``store`` into the directory ``out``.

    Args:
        store: the real patch store (train split: the subsets; test split: the scores).
        out: the study directory.
        cfg: fractions, seeds, generator and downstream settings.
        device: ``auto | cpu | cuda | ...`` for generators and downstream networks.
        synthetic: a labelled synthetic patch store used at every fraction instead of training generators.
        progress: called with (arms done, arms in all, what runs now).

    Returns:
        The utility.json dict.
    """
    store = store if isinstance(store, PatchStore) else open_store(store)
    check_task(store, cfg.task)
    out = Path(out)
    user = open_store(synthetic) if synthetic is not None else None
    _check_settings(out, store, cfg, user)
    task = cfg.task
    test = from_store(store, labelled_rows(store, "test", task), task, store.classes)
    given = from_store(user, synthetic_rows(user, store), task, store.classes) if user is not None else None
    n_out = len(store.classes) if task == "classify" else int(np.max(store.labels)) + 1  # background + labels
    ctx = _Context(cfg, store.classes, n_out, str(select_device(device)), test, given)
    cells = [(f, s) for f in sorted(set(cfg.fractions)) for s in range(cfg.seeds)]
    total, rows = len(cells) * len(RESULTS), []
    for i, (f, s) in enumerate(cells):
        results = _run_cell(store, out / "cells" / f"f{fraction_key(f)}_s{s}", f, s, ctx,
                            functools.partial(_tell, progress, i * len(RESULTS), total))
        rows += [{"arm": arm, "fraction": f, "seed": s, "metric": m, "value": v}
                 for arm in RESULTS for m, v in results[arm]["metrics"].items()]
    _tell(progress, total, total, 0, "report")
    info = {m: {"label": UTILITY_METRICS[m].label, "unit": UTILITY_METRICS[m].unit, "better": UTILITY_METRICS[m].better}
            for m in TASK_METRICS[task]}
    summary = {"task": task, "condition": cfg.generator_condition, "store": str(store.path),
               "synthetic": str(user.path) if user is not None else None, "fractions": sorted(set(cfg.fractions)),
               "seeds": cfg.seeds, "metrics": list(TASK_METRICS[task]), "n_test": len(ctx.test), "metric_info": info,
               **summarize(rows), "config": cfg.model_dump(mode="json")}
    _write_outputs(out, rows, summary)
    return summary


@dataclass
class _Context:
    """What every cell shares: settings, the class list, the network's outputs, the real test set."""

    cfg: UtilityConfig
    classes: list[str]
    n_out: int  # classes, or label values (background included)
    device: str
    test: LabelledSet
    given: LabelledSet | None  # the --synthetic set, used in every cell


def _run_cell(store: PatchStore, cell: Path, fraction: float, seed: int, ctx: _Context,
              tell: Callable[[int, str], None]) -> dict[str, dict]:
    """The arms' results of one cell: read when finished, else trained, scored and written."""
    cfg, task = ctx.cfg, ctx.cfg.task
    results = {arm: _read_result(cell / f"{arm}.json") for arm in RESULTS}
    todo = [arm for arm in RESULTS if results[arm] is None]
    if not todo:
        return results
    real_store = _subset(store, cfg, fraction, seed, cell / "real_store")
    real, syn = from_store(real_store, real_store.select("train"), task, ctx.classes), ctx.given
    real_net = None

    def fit(data):
        return train_downstream(task, data, ctx.n_out, cfg.downstream_steps, cfg.batch_size, cfg.lr, seed, ctx.device)

    for k, arm in enumerate(todo):  # real first: its result is kept even if the generator then fails
        done = len(RESULTS) - len(todo) + k
        if arm != "real" and syn is None:
            tell(done, f"f={fraction:g} seed {seed}: generator")
            syn = _cell_synthetic(real_store, cell, cfg, seed, ctx.device)
        tell(done, f"f={fraction:g} seed {seed}: {arm}")
        if arm == FIDELITY:  # the real arm's network (trained again, identically, after a resume)
            real_net = real_net or fit(real)
            results[arm] = {"arm": arm, "fraction": fraction, "seed": seed, "n_synthetic": len(syn),
                            "metrics": score_downstream(task, real_net, syn, ctx.n_out)}
        else:
            data = real if arm == "real" else syn if arm == "synthetic" else real + syn
            net = fit(data)
            real_net = net if arm == "real" else real_net
            results[arm] = {"arm": arm, "fraction": fraction, "seed": seed, "n_real": len(real),
                            "n_synthetic": 0 if arm == "real" else len(syn), "n_train": len(data),
                            "metrics": score_downstream(task, net, ctx.test, ctx.n_out)}
        write_json(cell / f"{arm}.json", results[arm])
    return results


def _tell(progress: Progress | None, offset: int, total: int, done: int, what: str) -> None:
    """Report ``offset + done`` of ``total`` arms finished, and ``what`` runs now."""
    if progress is not None:
        progress(offset + done, total, what)


def _read_result(path: Path) -> dict | None:
    """A finished arm's result, or None (not run yet)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _check_settings(out: Path, store: PatchStore, cfg: UtilityConfig, user: PatchStore | None) -> None:
    """Write ``study.json`` on the first run; refuse a re-run whose results would not be comparable."""
    settings = {"store_hash": store.content_hash, "synthetic_hash": user.content_hash if user is not None else None,
                "config": cfg.model_dump(mode="json", exclude={"fractions", "seeds"})}
    path = out / "study.json"
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        if before != json.loads(json.dumps(settings)):
            changed = sorted(k for k in settings if before.get(k) != settings[k])
            changed += sorted(f"config.{k}" for k in settings["config"]
                              if before.get("config", {}).get(k) != settings["config"][k])
            raise InputError(f"{out}: holds a study with other settings ({', '.join(changed)}); resume it with the "
                             "same store and options, or use another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, settings)


def _subset(store: PatchStore, cfg: UtilityConfig, fraction: float, seed: int, path: Path) -> PatchStore:
    """The cell's real subset store (reused once complete)."""
    if (path / "store.json").is_file():
        return open_store(path)
    return write_subset_store(store, subset_rows(store, cfg.task, fraction, seed), path)


def _cell_synthetic(real_store: PatchStore, cell: Path, cfg: UtilityConfig, seed: int, device: str) -> LabelledSet:
    """The cell's synthetic set: a generator trained on ``real_store`` only, sampled ``ratio × subset`` times."""
    path = cell / "synthetic_store"
    if not (path / "store.json").is_file():
        checkpoint = train_generator(real_store, cell / "generator", cfg, seed, device)
        n = max(1, round(cfg.ratio * len(real_store)))
        synthesize(checkpoint, real_store, cfg, n, seed, path, device)
    syn = open_store(path)
    return from_store(syn, syn.select(), cfg.task, real_store.classes)


def _write_outputs(out: Path, rows: list[dict], summary: dict) -> None:
    """utility.csv, utility.json, utility.png and report.html (each atomically)."""
    with atomic_open(out / "utility.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    write_json(out / "utility.json", summary)
    png = utility_figure(summary)
    with atomic_path(out / "utility.png") as tmp:
        tmp.write_bytes(base64.b64decode(png))
    write_utility_report(summary, png, out / "report.html")

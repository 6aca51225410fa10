"""The utility study: the best downstream model from few labels and many images, and does synthetic data help?

For each label budget (a fraction of the train split, or a number of labels per class) and each
seed s (a "cell"):

1. the labelled subset (:mod:`medvae.downstream.subsets`) is written as ``cells/<budget>_s<s>/real_store``;
2. the real arm's network is trained on it (it is also the filter and the label-fidelity judge);
3. a generator — one for the whole study, learned from every train image without labels
   (``unlabelled: all``), or the cell's own, learned from its subset — makes labelled candidates
   that the filter thins into ``synthetic_store`` (:mod:`medvae.downstream.synthetic_sets`), unless the
   user gave a synthetic store for every cell;
4. the same downstream network, steps, real batches and seed (:mod:`medvae.downstream.networks`) is
   trained on each arm — ``real``, ``real+classical``, ``real+synthetic``,
   ``real+classical+synthetic``, ``synthetic``, and the semi-supervised arms that learn from the
   unlabelled train images too: ``pseudo``, ``fixmatch`` (and each ``+synthetic``,
   :mod:`medvae.downstream.semisupervised`), ``latent`` (:mod:`medvae.downstream.latent`) and ``m2``
   (:mod:`medvae.downstream.m2`) — and scored on the real test split;
5. the verdict (:mod:`medvae.downstream.verdict`) names the best arm per budget and what synthetic images
   add on top of the best arm without them.

The directory's layout is :class:`medvae.downstream.studydir.StudyDir`'s. Resumable per (budget,
seed, arm): an arm's result is written atomically to ``cells/<budget>_s<s>/<arm>.json`` and a
re-run skips it; a finished subset, unlabelled or synthetic store is reused (complete only once
its store.json exists); a half-trained generator resumes from its ``last.pt``. ``study.json``
records the settings that results depend on (all but the budgets and seeds, which may grow), and a
re-run with other settings in the same directory is refused.

Each arm's trained network is saved as TorchScript next to its result (``cells/<budget>_s<s>/<arm>.pt``)
for ``--export-model`` (:mod:`medvae.downstream.export`).

Outputs in the study directory: ``utility.csv`` (``arm, budget, fraction, labels_per_class, seed,
metric, value``; label fidelity as the rows of arm ``fidelity``), ``utility.json``
(:func:`medvae.downstream.intervals.summarize` of the arms, the label fidelity and what the filter kept,
the verdict of :mod:`medvae.downstream.verdict`, and settings), ``utility.png`` and ``report.html``
(:mod:`medvae.report.downstream`).
"""

from __future__ import annotations

import base64
import csv
import functools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medvae.config import UtilityConfig
from medvae.data.store import PatchStore, open_store, store_complete
from medvae.devices import select_device
from medvae.downstream import latent, m2, semisupervised, synthetic_sets
from medvae.downstream.augment import for_modality
from medvae.downstream.export import save_network
from medvae.downstream.intervals import summarize, t_interval
from medvae.downstream.networks import LabelledSet, from_store, score_downstream, train_downstream
from medvae.downstream.studydir import CellDir, StudyDir
from medvae.downstream.subsets import check_task, labelled_rows, subset_rows, write_subset_store
from medvae.downstream.verdict import uses_synthetic, verdict
from medvae.errors import InputError
from medvae.files import atomic_open, atomic_path, write_json
from medvae.metrics.table import TASK_METRICS, UTILITY_METRICS
from medvae.report.downstream import utility_figure, write_utility_report
from medvae.synthesis import audit

log = logging.getLogger(__name__)
# Label fidelity: the real arm's network scored on every synthetic candidate (before the filter)
# against the label it was made with; near the real arm's test score, the synthetic labels are as
# right as real ones. A property of the synthetic set, not an arm: computed per cell like one (and
# kept in utility.csv under this name) where the study has a synthetic arm, but summarized apart
# (utility.json ``label_fidelity``), never ranked or compared with the arms.
FIDELITY = "fidelity"
CSV_COLUMNS = ("arm", "budget", "fraction", "labels_per_class", "seed", "metric", "value")
Progress = Callable[[int, int, str], None]  # (arms done, arms in all, what runs now)


def run_utility(store: PatchStore | str | os.PathLike, out: str | os.PathLike, cfg: UtilityConfig,
                device: str = "auto", synthetic: str | os.PathLike | None = None,
                progress: Progress | None = None) -> dict:
    """Run (or resume) the study on ``store`` into the directory ``out``.

    Args:
        store: the real patch store (train split: the subsets and the unlabelled images; test split: the scores).
        out: the study directory.
        cfg: budgets, seeds, arms, synthesis, generator and downstream settings.
        device: ``auto | cpu | cuda | ...`` for generators and downstream networks.
        synthetic: a labelled synthetic patch store used at every budget instead of generators.
        progress: called with (arms done, arms in all, what runs now).

    Returns:
        The utility.json dict.
    """
    store = store if isinstance(store, PatchStore) else open_store(store)
    check_task(store, cfg.task)
    out = StudyDir(out)
    user = open_store(synthetic) if synthetic is not None else None
    _check_settings(out, store, cfg, user)
    task = cfg.task
    test = from_store(store, labelled_rows(store, "test", task), task, store.classes)
    given = None if user is None else from_store(user, synthetic_sets.synthetic_rows(user, store), task,
                                                 store.classes)
    n_out = len(store.classes) if task == "classify" else int(np.max(store.labels)) + 1  # background + labels
    classical = for_modality(cfg.classical, store.modalities[0])
    ctx = _Context(cfg, store, out, n_out, str(select_device(device)), test, given, classical)
    results_of = [*cfg.arms, *([FIDELITY] if any(map(uses_synthetic, cfg.arms)) else [])]
    cells = [(b, s) for b in cfg.budgets for s in range(cfg.seeds)]
    total, rows, kept = len(cells) * len(results_of), [], {}
    n_train = len(labelled_rows(store, "train", task))
    for i, ((key, fraction, per_class), s) in enumerate(cells):
        cell = out.cell(key, s)
        results = _run_cell(cell, fraction, per_class, s, ctx, results_of,
                            functools.partial(_tell, progress, i * len(results_of), total))
        n_real = next(iter(results.values())).get("n_real")
        for arm in results_of:
            for m, v in results[arm]["metrics"].items():
                rows.append({"arm": arm, "budget": key, "fraction": n_real / n_train if n_real else fraction,
                             "labels_per_class": per_class, "seed": s, "metric": m, "value": v})
        if store_complete(cell.synthetic_store):
            kept.setdefault(key, []).append(open_store(cell.synthetic_store).meta.get("synthetic", {}))
    _tell(progress, total, total, 0, "report")
    info = {m: {"label": UTILITY_METRICS[m].label, "unit": UTILITY_METRICS[m].unit, "better": UTILITY_METRICS[m].better}
            for m in TASK_METRICS[task]}
    summary = {"task": task, "condition": cfg.generator_condition, "synthesis": cfg.synthesis,
               "unlabelled": cfg.unlabelled if cfg.pools_unlabelled else "none", "store": str(store.path),
               "synthetic": str(user.path) if user is not None else None,
               "budgets": [{"key": k, "fraction": f, "labels_per_class": n} for k, f, n in cfg.budgets],
               "arms_run": list(cfg.arms), "seeds": cfg.seeds, "metrics": list(TASK_METRICS[task]),
               "n_test": len(ctx.test), "metric_info": info, **summarize([r for r in rows if r["arm"] != FIDELITY]),
               "label_fidelity": _label_fidelity(rows), "filter": _filter_summary(kept),
               "config": cfg.model_dump(mode="json")}
    summary["verdict"] = verdict(summary)
    _write_outputs(out, rows, summary)
    return summary


@dataclass
class _Context:
    """What every cell shares: settings, the real store, the network's outputs, the real test set, and
    (built on first use) the study's unlabelled generator and the memorization audit's reference."""

    cfg: UtilityConfig
    store: PatchStore
    out: StudyDir
    n_out: int  # classes, or label values (background included)
    device: str
    test: LabelledSet
    given: LabelledSet | None  # the --synthetic set, used in every cell
    classical: object  # the AugmentConfig of the +classical arms, modality defaults filled in
    shared: dict = field(default_factory=dict)

    def pool_generator(self) -> tuple[PatchStore, Path]:
        """The unlabelled store of every train image and the one generator trained on it (``unlabelled: all``)."""
        if "pool" not in self.shared:
            pool = synthetic_sets.unlabelled_store(self.store, self.out.unlabelled_store)
            if self.cfg.generator_run is not None:
                checkpoint = synthetic_sets.given_generator(self.cfg.generator_run, self.store)
            else:
                checkpoint = synthetic_sets.train_generator(pool, self.out.generator, self.cfg,
                                                       self.cfg.generator.train.seed, self.device)
            self.shared["pool"] = (pool, checkpoint)
        return self.shared["pool"]

    def unlabelled(self) -> torch.Tensor:
        """Every train image without its label, ``(N, C, H, W)`` float32: the semi-supervised arms' pool
        (the same images the study's generator learns from with ``unlabelled: all``)."""
        if "unlabelled" not in self.shared:
            pool = synthetic_sets.unlabelled_store(self.store, self.out.unlabelled_store)
            self.shared["unlabelled"] = torch.from_numpy(pool.get(pool.select()))
        return self.shared["unlabelled"]

    def reference(self) -> audit.TrainReference:
        """The memorization audit's features of the real train split (computed once)."""
        if "reference" not in self.shared:
            self.shared["reference"] = audit.build_reference(self.store, torch.device(self.device))
        return self.shared["reference"]


def _run_cell(cell: CellDir, fraction: float | None, per_class: int | None, seed: int, ctx: _Context,
              results_of: list[str], tell: Callable[[int, str], None]) -> dict[str, dict]:
    """The arms' results of one cell: read when finished, else trained, scored and written."""
    cfg, task = ctx.cfg, ctx.cfg.task
    results = {arm: _read_result(cell.result(arm)) for arm in results_of}
    todo = [arm for arm in results_of if results[arm] is None]
    if not todo:
        return results
    real_store = _subset(ctx.store, cfg, fraction, per_class, seed, cell.real_store)
    real = from_store(real_store, real_store.select("train"), task, ctx.store.classes)
    syn, nets = ctx.given, {}
    label = f"{per_class} per class" if per_class is not None else f"f={fraction:g}"

    def fit(arm: str, data: LabelledSet, extra: LabelledSet | None = None):
        classical = ctx.classical if "classical" in arm else None
        return train_downstream(task, data, ctx.n_out, cfg.downstream_steps, cfg.batch_size, cfg.lr, seed,
                                ctx.device, synthetic=extra, share=cfg.synthetic_share, classical=classical)

    def real_net():  # the real arm's network: its result, the filter and the fidelity judge
        if "real" not in nets:
            nets["real"] = fit("real", real)
        return nets["real"]

    def classical_net():  # the real+classical arm's network: also the pseudo arms' first teacher
        if "real+classical" not in nets:
            nets["real+classical"] = fit("real+classical", real)
        return nets["real+classical"]

    for k, arm in enumerate(todo):
        done = len(results_of) - len(todo) + k
        if "synthetic" in arm or arm == FIDELITY:
            if syn is None:
                tell(done, f"{label} seed {seed}: synthetic data")
                syn = _cell_synthetic(real_store, cell, seed, ctx, real_net)
        tell(done, f"{label} seed {seed}: {arm}")
        if arm == FIDELITY:
            if ctx.given is not None:  # the user's set: the real arm's network on its labels
                metrics = score_downstream(task, real_net(), syn, ctx.n_out)
            else:  # on every candidate, before the filter (recorded when the set was made)
                info = open_store(cell.synthetic_store).meta["synthetic"]
                metrics = {m: info.get(f"fidelity_{m}") for m in TASK_METRICS[task]}
            results[arm] = {"arm": arm, "seed": seed, "n_synthetic": len(syn), "metrics": metrics}
        else:
            semi = {}
            if arm == "real":
                net = real_net()
            elif arm == "real+classical":
                net = classical_net()
            elif arm == "synthetic":
                if not len(syn):
                    raise InputError(f"{cell.synthetic_store}: the filter kept no synthetic image, so the synthetic "
                                     "arm has nothing to train on; drop the arm, or set drop_flagged: false / a "
                                     "lower filter_threshold in the utility config")
                net = fit(arm, syn)
            elif arm in semisupervised.ARMS:  # pseudo, fixmatch (+synthetic): the unlabelled pool too
                net, semi = semisupervised.train_arm(arm, real, ctx.unlabelled(), classical_net,
                                                     syn if "synthetic" in arm else None, cfg, seed, ctx.n_out,
                                                     ctx.device, ctx.classical, ctx.store.modalities[0])
            elif arm == "latent":  # M1: the unlabelled generator's encoder + a linear head
                net = latent.train_latent(ctx.pool_generator()[1], real, ctx.n_out, cfg, seed, ctx.device)
            elif arm == "m2":  # M2's q(y|x), learned from the cell's labels and the unlabelled pool
                net = m2.cell_m2(cell.m2, real_store, ctx.unlabelled(), ctx.store.classes, cfg, seed,
                                 ctx.device).classifier
            else:
                net = fit(arm, real, syn if "synthetic" in arm else None)
            n_syn = len(syn) if "synthetic" in arm else 0
            results[arm] = {"arm": arm, "seed": seed, "n_real": len(real), "n_synthetic": n_syn,
                            "steps": cfg.downstream_steps,
                            "real_images_seen": 0 if arm == "synthetic" else cfg.downstream_steps * min(
                                cfg.batch_size, len(real)),
                            "metrics": score_downstream(task, net, ctx.test, ctx.n_out), **semi}
            save_network(cell.network(arm), net, ctx.test.images[:2])  # the export's source (downstream.export)
        write_json(cell.result(arm), results[arm])
    return results


def _cell_synthetic(real_store: PatchStore, cell: CellDir, seed: int, ctx: _Context,
                    real_net: Callable[[], torch.nn.Module]) -> LabelledSet:
    """The cell's filtered synthetic set (written once to ``synthetic_store``)."""
    cfg, path = ctx.cfg, cell.synthetic_store
    if not store_complete(path):
        if cfg.synthesis == "m2":  # the cell's M2 model, not the study's generator
            pool, checkpoint = None, cell.m2 / m2.MODEL_FILE
        elif cfg.pools_unlabelled:
            pool, checkpoint = ctx.pool_generator()
        else:
            pool = None
            checkpoint = synthetic_sets.train_generator(real_store, cell.generator, cfg, seed, ctx.device)
        judge = real_net()  # trained on the same labelled subset: it labels, filters and judges
        teacher = judge if cfg.task == "classify" else None  # segmentation candidates are not filtered by it
        if cfg.synthesis == "prior":
            cands = synthetic_sets.prior_candidates(checkpoint, real_store, pool, cfg, seed, teacher)
        elif cfg.synthesis == "m2":
            cands = m2.m2_candidates(m2.cell_m2(cell.m2, real_store, ctx.unlabelled(), ctx.store.classes, cfg, seed,
                                                ctx.device), real_store, cfg, seed)
        else:
            cands = synthetic_sets.anchored_candidates(checkpoint, real_store, pool, cfg, seed)
        reference = ctx.reference() if cfg.drop_flagged else None
        kept, info = synthetic_sets.filter_candidates(cands, cfg, teacher, reference)
        if len(cands.images):
            labels = cands.classes if cands.classes is not None else cands.masks
            info.update({f"fidelity_{m}": v for m, v in score_downstream(
                cfg.task, judge, LabelledSet(torch.from_numpy(cands.images), torch.from_numpy(labels).long()),
                ctx.n_out).items()})
        info.update(seed=seed, synthesis=cfg.synthesis, checkpoint=str(checkpoint))
        synthetic_sets.write_synthetic_store(path, kept, real_store, info)
    return synthetic_set(open_store(path), real_store, cfg.task, ctx.store.classes)


def synthetic_set(syn: PatchStore, real: PatchStore, task: str, classes: list[str]) -> LabelledSet:
    """A cell's synthetic store as a LabelledSet; an empty one (the filter kept nothing) has the real subset's
    shapes (a store of no rows has no labels.npy)."""
    if not len(syn):
        return from_store(real, np.empty(0, dtype=np.int64), task, classes)
    return from_store(syn, syn.select(), task, classes)


def _filter_summary(kept: dict[str, list[dict]]) -> dict:
    """Per budget: the kept fraction of candidates, flagged and label-fidelity intervals over seeds."""
    out = {}
    for key, infos in kept.items():
        n = [i.get("candidates") for i in infos if i.get("candidates")]
        out[key] = {"candidates": t_interval(n),
                    "kept_fraction": t_interval([i["kept"] / i["candidates"] for i in infos if i.get("candidates")]),
                    "flagged": t_interval([i.get("flagged") for i in infos if i.get("flagged") is not None]),
                    "fidelity": t_interval([i.get("fidelity") for i in infos if i.get("fidelity") is not None])}
    return out


def _label_fidelity(rows: list[dict]) -> dict:
    """Per budget and metric: the :func:`t_interval` over seeds of the label fidelity (``FIDELITY`` rows)."""
    by: dict = {}
    for r in rows:
        if r["arm"] == FIDELITY:
            by.setdefault(r["budget"], {}).setdefault(r["metric"], []).append(r["value"])
    return {b: {m: t_interval(v) for m, v in ms.items()} for b, ms in by.items()}


def _tell(progress: Progress | None, offset: int, total: int, done: int, what: str) -> None:
    """Report ``offset + done`` of ``total`` arms finished, and ``what`` runs now."""
    if progress is not None:
        progress(offset + done, total, what)


def _read_result(path: Path) -> dict | None:
    """A finished arm's result, or None (not run yet)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


_GROWABLE = {"fractions", "labels_per_class", "seeds", "arms"}


def _check_settings(out: StudyDir, store: PatchStore, cfg: UtilityConfig, user: PatchStore | None) -> None:
    """Write ``study.json`` on the first run; refuse a re-run whose results would not be comparable. Budgets,
    seeds and arms may change: each arm's result depends on its cell alone, so a study grows by any of them."""
    settings = {"store_hash": store.content_hash, "synthetic_hash": user.content_hash if user is not None else None,
                "config": cfg.stable_dump(exclude=_GROWABLE)}
    path = out.settings
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        before.get("config", {}).pop("arms", None)  # studies written before arms could grow
        if before != json.loads(json.dumps(settings)):
            changed = sorted(k for k in settings if before.get(k) != settings[k])
            changed += sorted(f"config.{k}" for k in settings["config"]
                              if before.get("config", {}).get(k) != settings["config"][k])
            raise InputError(f"{out.path}: holds a study with other settings ({', '.join(changed)}); resume it with "
                             "the same store and options, or use another --out")
        return
    out.path.mkdir(parents=True, exist_ok=True)
    write_json(path, settings)


def _subset(store: PatchStore, cfg: UtilityConfig, fraction: float | None, per_class: int | None, seed: int,
            path: Path) -> PatchStore:
    """The cell's real subset store (reused once complete)."""
    if store_complete(path):
        return open_store(path)
    return write_subset_store(store, subset_rows(store, cfg.task, fraction, seed, per_class), path)


def _write_outputs(out: StudyDir, rows: list[dict], summary: dict) -> None:
    """utility.csv, utility.json, utility.png and report.html (each atomically)."""
    with atomic_open(out.csv, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    write_json(out.json, summary)
    png = utility_figure(summary)
    with atomic_path(out.png) as tmp:
        tmp.write_bytes(base64.b64decode(png))
    write_utility_report(summary, png, out.report)

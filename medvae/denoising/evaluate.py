"""`medvae evaluate` on a denoise run: medvae against the noisy input and the classical denoisers.

On an evenly spaced subset of the split (``EvaluateConfig.denoise_patches``), at each evaluation
noise level (``noise.eval_levels``, default low / middle / high of the training range), the clean
patches are corrupted once with a fixed seed, and the *same* noisy patches go to medvae's model
and to every classical denoiser (:mod:`medvae.denoising.classical`). PSNR, SSIM and MAE
(:mod:`medvae.metrics`, [0, 1] scale, outputs clipped to [0, 1]) are tabulated per method ×
level × modality and per patient, with the time per 512² slice of each method.

Writes ``metrics.csv`` (``run, method, noise, level, patient_id, modality, split, metric, value,
n``; sd as ``<metric>_sd``; modality rows have patient ``ALL``), ``summary.json`` and a
self-contained ``report.html`` with noisy / denoised / clean triptychs and error maps.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path

import numpy as np
import torch

from medvae.config import EvaluateConfig
from medvae.data.store import PatchStore, even_positions
from medvae.denoising import classical
from medvae.denoising.noise import LEVEL_NAMES, eval_levels, step_generator
from medvae.denoising.supervised import DenoiseTask
from medvae.errors import InputError
from medvae.metrics import images as M
from medvae.metrics.stats import finite_stats
from medvae.metrics.table import DENOISE_METRICS
from medvae.report.denoise import write_denoise_report
from medvae.report.reportdir import ReportDir
from medvae.training.checkpoint import load_model
from medvae.training.rundir import RunDir

log = logging.getLogger(__name__)

EVAL_SEED = 2024
CSV_COLUMNS = ("run", "method", "noise", "level", "patient_id", "modality", "split", "metric", "value", "n")
ALL = "ALL"


@torch.no_grad()
def _medvae(model, noisy: np.ndarray, device, batch: int) -> np.ndarray:
    outs = []
    prior = getattr(model.config, "prior", False)  # n2v --posterior: the posterior mean, as `medvae denoise` writes
    for i in range(0, len(noisy), batch):
        x = torch.from_numpy(noisy[i:i + batch]).to(device)
        outs.append((model.denoise(x) if prior else model(x).x_hat).float().cpu().numpy())
    return np.concatenate(outs)


def _scores(out: np.ndarray, clean: np.ndarray) -> dict[str, np.ndarray]:
    o, c = torch.from_numpy(np.clip(out, 0, 1).astype(np.float32)), torch.from_numpy(clean)
    return {"psnr": M.psnr(o, c).double().numpy(), "ssim": M.ssim(o, c).double().numpy(),
            "mae": M.mae(o, c).double().numpy()}


def _speed(model, methods: list[str], image: np.ndarray, device) -> dict[str, float]:
    """Seconds per 512² slice of each method (medvae: best of 3 after a warm-up; classical: best of 2)."""
    x = torch.from_numpy(image[None, None].astype(np.float32)).to(device)
    model.denoise(x)  # warm-up
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        model.denoise(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    speeds = {"medvae": best}
    for m in methods:
        speeds[m] = classical.seconds_per_slice(m, image, repeats=1 if m in classical.SLOW else 2)
    return speeds


def evaluate_denoise(run, store: PatchStore, out, cfg: EvaluateConfig, device: torch.device,
                     methods: list[str] | None = None) -> dict:
    """Evaluate the denoise run ``run`` on ``cfg.split`` of ``store``; write the report directory ``out``."""
    run_dir = RunDir(run)
    if run_dir.task != "denoise":
        raise InputError(f"{run}: not a denoise run (trained with task {run_dir.task})")
    train_cfg = run_dir.config()
    ckpt = run_dir.checkpoint("best")
    model, meta = load_model(ckpt, device=device)
    rows = store.select(split=cfg.split)
    rows = rows[even_positions(len(rows), cfg.denoise_patches)]
    if rows.size == 0:
        raise InputError(f"{store.path}: no patches in split '{cfg.split}'; the store has {store.splits}")
    skipped = classical.missing_methods()
    methods = [m for m in (methods or classical.METHODS) if m not in skipped]
    kind = train_cfg.noise.kind
    levels = eval_levels(kind, train_cfg.noise.levels, train_cfg.noise.eval_levels)
    task = DenoiseTask(store, train_cfg.noise, EVAL_SEED)
    clean = store.get(rows)
    pids = store.index["patient_id"][rows].astype(str)
    mods = store.index["modality"][rows].astype(str)
    log.info("denoise evaluation of %s on %d %s patches, %s at %s, methods medvae + %s", Path(run).name,
             len(rows), cfg.split, kind, levels, methods)
    per: dict = {}  # (level, method) -> metric -> (n,)
    examples: dict = {}
    for li, level in enumerate(levels):
        gen = step_generator(EVAL_SEED, li)
        x = torch.from_numpy(clean)
        noisy = task.corrupt(x, rows, gen, levels=torch.full((len(rows),), float(level)))[0].numpy()
        outputs = {"noisy": noisy, "medvae": _medvae(model, noisy, device, cfg.batch_size)}
        for m in methods:
            t0 = time.perf_counter()
            outputs[m] = classical.denoise(m, noisy)
            log.info("  level %g: %s on %d patches in %.1f s", level, m, len(rows), time.perf_counter() - t0)
        for name, o in outputs.items():
            per[(level, name)] = _scores(o, clean)
        k = int(np.argsort(per[(level, "medvae")]["psnr"])[len(rows) // 2])  # the median patch
        best_classical = max(methods, key=lambda m: per[(level, m)]["psnr"].mean()) if methods else None
        examples[level] = {"clean": clean[k], "noisy": noisy[k], "medvae": outputs["medvae"][k],
                           "classical": outputs[best_classical][k] if best_classical else None,
                           "classical_name": best_classical, "patient_id": str(pids[k]), "modality": str(mods[k]),
                           "row": int(rows[k])}
    table, per_patient = {}, {}
    for (level, name), scores in per.items():
        for mod in sorted(set(mods.tolist())):
            m = mods == mod
            table.setdefault(mod, {}).setdefault(str(level), {})[name] = {
                k: finite_stats(v[m]) for k, v in scores.items()}
        for pid in sorted(set(pids.tolist())):
            m = pids == pid
            per_patient.setdefault(pid, {}).setdefault(str(level), {})[name] = {
                k: finite_stats(v[m]) for k, v in scores.items()}
    gaps = {mod: {lv: _gap(t) for lv, t in by_level.items()} for mod, by_level in table.items()}
    speed_img = _speed_image(clean)
    speeds = _speed(model, methods, speed_img, device)
    summary = {"run": Path(run).name, "checkpoint": str(ckpt), "step": meta.get("step"),
               "model": (meta.get("model_config") or {}).get("name"), "split": cfg.split, "store": str(store.path),
               "noise": train_cfg.noise.model_dump(mode="json"), "level_name": LEVEL_NAMES[kind],
               "levels": levels, "methods": ["noisy", "medvae", *methods], "skipped_methods": skipped,
               "n_patches": int(len(rows)), "per_modality": table, "per_patient": per_patient,
               "patient_modality": {str(p): str(m) for p, m in zip(pids, mods)},
               "medvae_minus_best_classical_psnr": gaps, "seconds_per_512_slice": speeds,
               "device": str(device), "torch_threads": torch.get_num_threads(),
               "train_precision": run_dir.info().get("precision"),  # None: a run from before it was recorded
               "metric_info": {k: {"unit": m.unit, "direction": m.better} for k, m in DENOISE_METRICS.items()},
               "config": cfg.model_dump(mode="json")}
    ReportDir(out).write(_csv(summary, kind), summary,
                         lambda path: write_denoise_report(summary, examples, store, path))
    return summary


def _gap(by_method: dict) -> float | None:
    """medvae's mean PSNR minus the best classical method's (dB); None without classical methods."""
    classical_psnr = [v["psnr"]["mean"] for k, v in by_method.items() if k not in ("noisy", "medvae")]
    return by_method["medvae"]["psnr"]["mean"] - max(classical_psnr) if classical_psnr else None


def _speed_image(clean: np.ndarray) -> np.ndarray:
    """A 512² test slice: the evaluation patches tiled (first channel), with light Gaussian noise."""
    tiles = clean[:, 0]
    side = tiles.shape[-1]
    reps = -(-512 // side)
    idx = np.arange(reps * reps) % len(tiles)
    grid = tiles[idx].reshape(reps, reps, side, side).transpose(0, 2, 1, 3).reshape(reps * side, reps * side)
    rng = np.random.default_rng(0)
    return (grid[:512, :512] + 0.05 * rng.standard_normal((512, 512))).astype(np.float32)


def _csv(summary: dict, kind: str) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    split, run = summary["split"], summary["run"]
    for scope, data in (("modality", summary["per_modality"]), ("patient", summary["per_patient"])):
        for key, by_level in data.items():
            pid, mod = (ALL, key) if scope == "modality" else (key, summary["patient_modality"][key])
            for level, by_method in by_level.items():
                for method, ms in by_method.items():
                    for metric, st in ms.items():
                        w.writerow((run, method, kind, level, pid, mod, split, metric, st["mean"], st["n"]))
                        w.writerow((run, method, kind, level, pid, mod, split, f"{metric}_sd", st["sd"], st["n"]))
    for method, sec in summary["seconds_per_512_slice"].items():
        w.writerow((run, method, kind, "", ALL, "", split, "seconds_per_512_slice", sec, 1))
    return buf.getvalue()

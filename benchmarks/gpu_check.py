"""One prepared GPU check: training, loader, evaluate and generate throughput in one table.

Rows:

- train images/s of ConvVAE (``vae``) and the VAE–GAN (``vaegan``, critic on: both optimizer
  steps) at 128² and 256², batch 64, in fp32 eager, bf16 autocast, bf16 + channels_last and bf16 +
  channels_last + torch.compile; each times the trainer's own step (``TrainStep`` through
  ``_Trainer._train_step``) on a batch already on the device, after warm-up steps, between
  ``torch.cuda.synchronize()`` calls; peak GPU memory per row.
- loader patches/s: ``PatchBatches`` over a synthetic store written with medvae's own
  ``write_store`` in a temporary directory, batches moved to the device.
- evaluate patches/s: ``medvae.evaluation.evaluate.patch_metrics`` (SSIM, MS-SSIM, PSNR, ELBO, IWAE on a
  quarter of the rows) of an untrained ConvVAE.
- generate images/s: ``medvae.synthesis.sampling.latents`` decoded by the ConvVAE.

Runs in under 8 minutes on one GPU (a time budget skips the remaining train rows, marked in the
table, should compilation be slow); ``--device cpu --quick`` (64², tiny channels, a few steps)
takes about a minute. Writes bench_out/gpu_check.json (``gpu_check_quick.json`` with --quick).

Run: ``make install`` then ``.venv/bin/python benchmarks/gpu_check.py [--device auto|cuda|cpu] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_train import random_store, stage_cfg, step_rate  # noqa: E402

from medvae.config import EvaluateConfig  # noqa: E402
from medvae.data.loader import PatchBatches  # noqa: E402
from medvae.devices import select_device  # noqa: E402
from medvae.models import build_model  # noqa: E402
from medvae.training.trainer import resolve_config  # noqa: E402

MODES = [  # label, amp, channels_last, compile
    ("fp32 eager", "off", False, False),
    ("bf16 autocast", "bf16", False, False),
    ("bf16 + channels_last", "bf16", True, False),
    ("bf16 + channels_last + compile", "bf16", True, True),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed(fn, device: torch.device, warmup: int, min_seconds: float, max_calls: int) -> tuple[int, float]:
    """(calls, seconds) of ``fn()`` repeated after ``warmup`` calls, synchronised around the clock."""
    for _ in range(warmup):
        fn()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while n < max_calls and (n < 2 or time.perf_counter() - t0 < min_seconds):
        fn()
        n += 1
    sync(device)
    return n, time.perf_counter() - t0


def train_rows(args, device, stores, channels, deadline) -> list[dict]:
    rows = []
    for size in args.sizes:
        for label, amp, cl, comp in MODES:
            for name in ("vae", "vaegan"):
                row = {"task": "train", "model": name, "size": size, "mode": label, "unit": "images/s"}
                rows.append(row)
                if device.type != "cuda" and cl:
                    row["note"] = "channels_last: CUDA only"
                    continue
                if device.type != "cuda" and comp and not args.cpu_compile:
                    row["note"] = "compile: CUDA only (--cpu-compile)"
                    continue
                if time.monotonic() > deadline:
                    row["note"] = "skipped: time budget"
                    continue
                cfg = stage_cfg(name, channels, 1, args.batch, amp, cl, comp, 10**9)
                cfg.model.latent_dim = args.latent
                warmup = args.warmup + (3 if comp else 0)  # compile: first calls build the graphs
                try:
                    r = step_rate(stores[size], cfg, device, warmup, args.seconds, args.max_steps)
                except Exception as err:  # noqa: BLE001 - one failing mode must not lose the table
                    row["note"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
                    print(row["note"], file=sys.stderr)
                    continue
                row.update(value=r["images_per_s"], peak_gib=r["peak_gib"], steps=r["steps"],
                           params_m=r["params"] / 1e6, bad_steps=r["bad_steps"])
                print(f"train {name:6s} {size}² {label:32s} {r['images_per_s']:9.1f} img/s", flush=True)
    return rows


def loader_row(args, device, store) -> dict:
    batches = PatchBatches(store, "train", batch_size=args.batch, seed=0, rank=0, world_size=1, device=device)
    it = iter(batches)

    def next_batch():
        nonlocal it
        x = next(it, None)
        if x is None:
            it = iter(batches)
            x = next(it)
        return x

    reset_peak(device)
    n, dt = timed(next_batch, device, warmup=2, min_seconds=args.seconds, max_calls=10**6)
    return {"task": "loader", "model": "PatchBatches", "size": args.sizes[0], "mode": f"batch {args.batch}",
            "value": n * args.batch / dt, "unit": "patches/s", "peak_gib": peak_gib(device)}


def evaluate_rows(args, device, store, channels) -> list[dict]:
    from medvae.evaluation.evaluate import patch_metrics
    from medvae.synthesis.sampling import latents

    cfg = resolve_config(stage_cfg("vae", channels, 1, args.batch, "off", False, False, 1), store)
    cfg.model.latent_dim = args.latent
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).eval()
    size = cfg.model.image_size
    rows = store.select("train")[: args.eval_patches]
    ecfg = EvaluateConfig(batch_size=args.batch, iwae_k=args.iwae_k)
    iwae_rows = rows[: max(1, len(rows) // 4)]

    def run_eval():
        patch_metrics(model, store, rows, ecfg, device, iwae_rows=iwae_rows)

    out = []
    reset_peak(device)
    n, dt = timed(run_eval, device, warmup=1, min_seconds=0, max_calls=args.eval_calls)
    out.append({"task": "evaluate", "model": "vae", "size": size,
                "mode": f"patch_metrics, IWAE k={args.iwae_k} on 1/4", "value": n * len(rows) / dt,
                "unit": "patches/s", "peak_gib": peak_gib(device)})

    z_all = latents(0, 0, args.gen_images, model.latent_dim)

    @torch.no_grad()
    def run_generate():
        for start in range(0, len(z_all), args.batch):
            model.decode(z_all[start:start + args.batch].to(device)).float().cpu()

    reset_peak(device)
    n, dt = timed(run_generate, device, warmup=1, min_seconds=args.seconds, max_calls=10**6)
    out.append({"task": "generate", "model": "vae", "size": size, "mode": "latents -> decode -> host",
                "value": n * len(z_all) / dt, "unit": "images/s", "peak_gib": peak_gib(device)})
    return out


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"medvae gpu_check: {results['device']}, torch {results['torch']}, batch {results['batch']}"
                    f"{' (quick)' if results['quick'] else ''}, {results['wall_s']:.0f} s")
    for col in ("task", "model", "size", "mode", "throughput", "unit", "vs fp32", "peak GiB", "note"):
        t.add_column(col)
    base = {(r["model"], r["size"]): r.get("value") for r in results["rows"]
            if r["task"] == "train" and r["mode"] == "fp32 eager"}
    for r in results["rows"]:
        v = r.get("value")
        ref = base.get((r["model"], r["size"])) if r["task"] == "train" else None
        t.add_row(r["task"], r["model"], f"{r['size']}²", r["mode"], "" if v is None else f"{v:.4g}", r["unit"],
                  f"{v / ref:.2f}" if v and ref else "",
                  "" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}", r.get("note", ""))
    Console(width=160).print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu (auto: CUDA when available)")
    ap.add_argument("--quick", action="store_true", help="64², tiny channels, a few steps (CPU: ~1 min)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds after which train rows are skipped")
    ap.add_argument("--cpu-compile", action="store_true", help="also time torch.compile on CPU")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out")
    args = ap.parse_args()
    t_start = time.monotonic()
    device = select_device(args.device)
    if args.quick:
        args.sizes, channels, args.latent, args.batch = [64], (8, 16, 32), 16, 4
        args.warmup, args.seconds, args.max_steps = 1, 0.5, 3
        args.eval_patches, args.eval_calls, args.iwae_k, args.gen_images = 16, 1, 4, 16
    else:
        args.sizes, channels, args.latent = [128, 256], (32, 64, 128, 256), 128
        args.batch = 64 if device.type == "cuda" else 8
        args.warmup, args.seconds, args.max_steps = (5, 3.0, 10**6) if device.type == "cuda" else (1, 5.0, 20)
        args.eval_patches, args.eval_calls, args.iwae_k = (1024, 3, 64) if device.type == "cuda" else (64, 1, 8)
        args.gen_images = 2048 if device.type == "cuda" else 64
    torch.backends.cudnn.benchmark = True
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"machine": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
               "batch": args.batch, "quick": args.quick, "rows": []}
    with tempfile.TemporaryDirectory(prefix="medvae_gpu_check_") as tmp:
        n_store = max(8 * args.batch, 64) if args.quick else max(32 * args.batch, 512)
        stores = {s: random_store(Path(tmp) / f"store_{s}", s, n_store) for s in args.sizes}
        results["rows"] += train_rows(args, device, stores, channels, t_start + args.budget)
        results["rows"].append(loader_row(args, device, stores[args.sizes[0]]))
        results["rows"] += evaluate_rows(args, device, stores[args.sizes[0]], channels)
    results["wall_s"] = time.monotonic() - t_start
    print_table(results)
    out = args.out / ("gpu_check_quick.json" if args.quick else "gpu_check.json")
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()

"""One prepared GPU check (issue #20): training precision modes, the trainer against a bare loop,
peak memory, DDP over two GPUs, and the loader / evaluate / generate throughput, in one table.

Sections (the default-sized ConvVAE of each patch size, ``channels`` left to the patch size):

1. **precision modes**, at 128² and 256², batch 64: images/s of the trainer's own step
   (``_Trainer._train_step`` on a batch already on the GPU, between ``torch.cuda.synchronize()``
   calls, after warm-up steps) in fp32 eager, bf16 autocast + channels_last, and bf16 +
   channels_last + ``torch.compile``, for every model family (issue #26 item 6): the ConvVAE, the
   VAE–GAN (critic on), the denoisers dae and unet-vae (supervised denoise task) and MONAI's
   VarAutoEncoder and AutoencoderKL; peak GPU memory per row; the ratio over fp32 eager, and per
   family and size the fastest mode (whether compile wins). The compiled rows run after every eager
   row, so a slow compilation only costs compiled rows.
2. **trainer / bare loop**, at 128² and 256²: ``medvae.training.trainer.train`` (the trainer's
   defaults: bf16 + channels_last on CUDA) against a bare PyTorch loop with the same model, batch,
   precision and Adam settings (``benchmarks/bench_train.py``'s ``compare``: the marginal images/s
   of steps N1..N2, several pairs, the median ratio; goal >= 0.95).
3. **DDP**: with two or more GPUs, the step time of two processes (``torch.multiprocessing`` +
   NCCL, the trainer's DDP wrappers, batch 64 per GPU) against one process on one GPU.
4. loader patches/s (``PatchBatches`` to the GPU), evaluate patches/s (``patch_metrics``, IWAE on a
   quarter), generate images/s (latents decoded, copied to the host).

Runs in under 8 minutes on one GPU: a time budget (``--budget``) skips what is left of sections 1–3
(marked in the table) should compilation be slow. Without a CUDA device it stops at once with a
message (exit code 2); ``--dry-run`` runs every section on the CPU with tiny sizes (the DDP section
with gloo) to check the script itself in about a minute. Writes bench_out/gpu_check.json
(``gpu_check_dry_run.json`` with --dry-run).

Run: ``make install`` then ``.venv/bin/python benchmarks/gpu_check.py [--dry-run]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MODES = [  # label, amp, channels_last, compile
    ("fp32 eager", "off", False, False),
    ("bf16 + channels_last", "bf16", True, False),
    ("bf16 + channels_last + compile", "bf16", True, True),
]


def no_gpu_exit() -> None:
    """Stop at once, before anything slow, where there is no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    built = torch.version.cuda or "no CUDA (a CPU build)"
    print(f"gpu_check: no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, built with "
          f"{built}). Run it on a machine with a GPU, or pass --dry-run to check the script on the CPU.",
          file=sys.stderr)
    sys.exit(2)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed(fn, device, warmup: int, min_seconds: float, max_calls: int) -> tuple[int, float]:
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


# --------------------------------------------------------------------------- 1. precision modes
FAMILIES = ("vae", "vaegan", "dae", "unet-vae", "monai-vae", "monai-kl")  # every model family (issue #26 item 6)
DENOISERS = ("dae", "unet-vae")  # trained on the denoise task (noisy input, clean target): whole slices


def family_cfg(name: str, args, amp: str, channels_last: bool, compile_: bool):
    """The trainer config of model family ``name`` (``args.channels``, ``args.latent``, ``args.batch``) in one
    precision mode; a denoiser gets ``task: denoise`` (supervised, Gaussian noise), the others reconstruct."""
    from bench_train import stage_cfg

    from medvae.config import TrainStageConfig

    cfg = stage_cfg(name if name not in DENOISERS else "vae", args.channels, 1, args.batch, amp, channels_last,
                    compile_, 10**9)
    if name in DENOISERS:  # their configs take neither latent_dim nor another family's keys
        model = {"name": name, "res_units": 1} | ({} if args.channels is None else {"channels": list(args.channels)})
        return TrainStageConfig.model_validate({"model": model, "train": cfg.train.model_dump(), "task": "denoise"})
    cfg.model.latent_dim = args.latent if name != "monai-kl" else 64 * -(-args.latent // 64)  # its latent: x 64
    return cfg


def precision_rows(args, device, stores, deadline) -> list[dict]:
    """images/s of every family at every size in each of MODES; the compiled rows last (compilation is the slow
    part: the time budget skips those first)."""
    import torch
    from bench_train import step_rate

    from medvae.denoising.selfsupervised import build_task

    rows = []
    passes = [[m for m in MODES if not m[3]], [m for m in MODES if m[3]]]
    for modes in passes:
        for size in args.sizes:
            for label, amp, cl, comp in modes:
                for name in args.families:
                    row = {"section": "precision", "model": name, "size": size, "mode": label, "unit": "images/s"}
                    rows.append(row)
                    if time.monotonic() > deadline:
                        row["note"] = "skipped: time budget"
                        continue
                    if device.type != "cuda" and (cl or amp == "bf16") and not args.dry_run:
                        row["note"] = "CUDA only"
                        continue
                    if args.dry_run and comp and name != args.families[0]:  # a CPU compile takes minutes
                        row["note"] = f"skipped: the dry run compiles {args.families[0]} only"
                        continue
                    warmup = args.warmup + (3 if comp else 0)  # compile: the first calls build the graphs
                    try:
                        cfg = family_cfg(name, args, amp, cl, comp)
                        task = build_task(stores[size], cfg) if name in DENOISERS else None
                        r = step_rate(stores[size], cfg, device, warmup, args.seconds, args.max_steps, task=task)
                    except Exception as err:  # noqa: BLE001 - one failing mode must not lose the table
                        row["note"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
                        print(f"precision {name} {size}² {label}: {row['note']}", file=sys.stderr)
                        continue
                    row.update(value=r["images_per_s"], peak_gib=r["peak_gib"], steps=r["steps"],
                               params_m=r["params"] / 1e6, bad_steps=r["bad_steps"])
                    print(f"precision {name:9s} {size}² {label:32s} {r['images_per_s']:9.1f} img/s "
                          f"({r['params'] / 1e6:.1f} M params)", flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    rows.sort(key=lambda r: (r["size"], FAMILIES.index(r["model"]), [m[0] for m in MODES].index(r["mode"])))
    return rows


# --------------------------------------------------------------------------- 2. trainer vs bare loop
def trainer_rows(args, device, stores, deadline) -> list[dict]:
    import torch
    from bench_train import compare, trainer_cfg

    rows = []
    for size in args.sizes:
        row = {"section": "trainer / bare loop", "model": "vae", "size": size, "unit": "ratio",
               "mode": "amp auto (bf16), channels_last" if device.type == "cuda" else "fp32 (dry run)"}
        rows.append(row)
        if time.monotonic() > deadline:
            row["note"] = "skipped: time budget"
            continue
        cfg = trainer_cfg(args.channels, args.batch, args.cmp_steps[1])
        cfg.model.latent_dim = args.latent
        reset_peak(device)
        try:
            c = compare(stores[size], cfg, device, *args.cmp_steps, repeats=args.cmp_repeats, load=0)
        except Exception as err:  # noqa: BLE001
            row["note"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
            print(row["note"], file=sys.stderr)
            continue
        row.update(value=c["ratio_median"], peak_gib=peak_gib(device), bare=c["bare_images_per_s"],
                   trainer=c["trainer_images_per_s"], ratios=c["ratios"],
                   note=f"train {c['trainer_images_per_s']:.0f} / bare {c['bare_images_per_s']:.0f} img/s")
        print(f"trainer / bare loop {size}²: {c['ratio_median']:.3f} ({row['note']})", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- 3. DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, spec: dict) -> None:
    """One rank: the trainer's step (DDP-wrapped) timed on a batch on its device; rank 0 writes the time."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    import torch

    from medvae.config import TrainStageConfig
    from medvae.data.loader import Batch
    from medvae.data.store import open_store
    from medvae.training.distributed import init_distributed, shutdown
    from medvae.training.tasks import ReconstructTask
    from medvae.training.trainer import _Trainer, resolve_config

    device_type = spec["device_type"]
    if device_type == "cpu":
        torch.set_num_threads(1)
    info = init_distributed(device_type)
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    try:
        store = open_store(spec["store"])
        cfg = resolve_config(TrainStageConfig.model_validate(spec["cfg"]), store)
        with tempfile.TemporaryDirectory() as tmp:
            tr = _Trainer(store, Path(tmp), cfg, device, info, ReconstructTask(store, 0), resume=False)
            b, s = cfg.train.batch_size, cfg.model.image_size
            x = torch.rand(b, cfg.model.in_channels, s, s, device=device)
            if tr.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            batch = Batch(x, None, None)

            def step():
                tr._train_step(batch)
                tr.step += 1

            n, dt = timed(step, device, spec["warmup"], spec["seconds"], spec["max_steps"])
            tr._settle()
            if rank == 0:
                Path(spec["out"]).write_text(json.dumps({"step_ms": 1000 * dt / n, "steps": n,
                                                         "peak_gib": peak_gib(device)}))
    finally:
        shutdown(info)


def ddp_rows(args, device, stores, deadline) -> list[dict]:
    import torch
    import torch.multiprocessing as mp
    from bench_train import trainer_cfg

    n_gpu = torch.cuda.device_count() if device.type == "cuda" else (2 if args.dry_run else 0)
    size = args.sizes[0]
    row = {"section": "DDP", "model": "vae", "size": size, "unit": "ms / step",
           "mode": f"2 processes x batch {args.batch}" + (" (gloo, CPU dry run)" if device.type != "cuda" else "")}
    if n_gpu < 2:
        row["note"] = f"skipped: {n_gpu} GPU(s); DDP needs 2"
        return [row]
    if time.monotonic() > deadline:
        row["note"] = "skipped: time budget"
        return [row]
    cfg = trainer_cfg(args.channels, args.batch, 10**9)
    cfg.model.latent_dim = args.latent
    cfg.train.log_every = cfg.train.checkpoint_every = 10**9
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            spec = {"device_type": device.type, "store": str(stores[size].path), "cfg": cfg.model_dump(mode="json"),
                    "warmup": args.warmup, "seconds": args.seconds, "max_steps": args.max_steps,
                    "out": str(Path(tmp) / f"ddp{world}.json")}
            try:
                mp.spawn(_ddp_worker, args=(world, _free_port(), spec), nprocs=world, join=True)
                out[world] = json.loads(Path(spec["out"]).read_text())
            except Exception as err:  # noqa: BLE001
                row["note"] = f"failed ({world} process(es)): {type(err).__name__}: {str(err).splitlines()[0][:70]}"
                print(row["note"], file=sys.stderr)
                return [row]
    one, two = out[1]["step_ms"], out[2]["step_ms"]
    row.update(value=two, peak_gib=out[2]["peak_gib"], single_ms=one,
               note=f"1 process: {one:.1f} ms; 2 processes train {2 * one / two:.2f}x the images/s")
    print(f"DDP {size}²: {two:.1f} ms / step with 2 processes, {one:.1f} ms with 1", flush=True)
    return [row]


# --------------------------------------------------------------------------- 4. loader, evaluate, generate
def loader_row(args, device, store) -> dict:
    from medvae.data.loader import PatchBatches

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
    return {"section": "loader", "model": "PatchBatches", "size": args.sizes[0], "mode": f"batch {args.batch}",
            "value": n * args.batch / dt, "unit": "patches/s", "peak_gib": peak_gib(device)}


def evaluate_rows(args, device, store) -> list[dict]:
    import torch
    from bench_train import stage_cfg

    from medvae.config import EvaluateConfig
    from medvae.evaluation.evaluate import patch_metrics
    from medvae.models import build_model
    from medvae.synthesis.sampling import latents
    from medvae.training.trainer import resolve_config

    cfg = resolve_config(stage_cfg("vae", args.channels, 1, args.batch, "off", False, False, 1), store)
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
    out.append({"section": "evaluate", "model": "vae", "size": size,
                "mode": f"patch_metrics, IWAE k={args.iwae_k} on 1/4", "value": n * len(rows) / dt,
                "unit": "patches/s", "peak_gib": peak_gib(device)})
    z_all = latents(0, 0, args.gen_images, model.latent_dim)

    @torch.no_grad()
    def run_generate():
        for start in range(0, len(z_all), args.batch):
            model.decode(z_all[start:start + args.batch].to(device)).float().cpu()

    reset_peak(device)
    n, dt = timed(run_generate, device, warmup=1, min_seconds=args.seconds, max_calls=10**6)
    out.append({"section": "generate", "model": "vae", "size": size, "mode": "latents -> decode -> host",
                "value": n * len(z_all) / dt, "unit": "images/s", "peak_gib": peak_gib(device)})
    return out


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"medvae gpu_check: {results['device']}, torch {results['torch']}, batch {results['batch']}"
                    f"{' (dry run)' if results['dry_run'] else ''}, {results['wall_s']:.0f} s")
    for col in ("section", "model", "size", "mode", "value", "unit", "vs fp32", "peak GiB", "note"):
        t.add_column(col)
    base = {(r["model"], r["size"]): r.get("value") for r in results["rows"]
            if r["section"] == "precision" and r["mode"] == "fp32 eager"}
    for r in results["rows"]:
        v = r.get("value")
        ref = base.get((r["model"], r["size"])) if r["section"] == "precision" else None
        t.add_row(r["section"], r["model"], f"{r['size']}²", r["mode"], "" if v is None else f"{v:.4g}", r["unit"],
                  f"{v / ref:.2f}" if v and ref else "",
                  "" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}", r.get("note", ""))
    Console(width=180).print(t)


def best_modes(rows: list[dict]) -> list[str]:
    """Per family and size: the fastest precision mode, its ratio to fp32 eager, and whether compile wins over
    the same mode eager."""
    out = []
    timed_rows = [r for r in rows if r["section"] == "precision" and r.get("value")]
    for key in dict.fromkeys((r["model"], r["size"]) for r in timed_rows):
        vals = {r["mode"]: r["value"] for r in timed_rows if (r["model"], r["size"]) == key}
        best = max(vals, key=vals.get)
        fp32 = vals.get(MODES[0][0])
        line = f"{key[0]} {key[1]}²: fastest {best}" + (f", {vals[best] / fp32:.2f}x fp32" if fp32 else "")
        eager, comp = vals.get(MODES[1][0]), vals.get(MODES[2][0])
        if eager and comp:
            line += f"; compile {'wins' if comp > eager else 'loses'} ({comp / eager:.2f}x bf16 eager)"
        out.append(line)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="every section on the CPU, tiny sizes (~1 min)")
    ap.add_argument("--budget", type=float, default=390.0,
                    help="seconds after which what is left of sections 1-3 is skipped (default 390: < 8 min in all)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out")
    ap.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                    help="model families of the precision section (default: all)")
    args = ap.parse_args()
    t_start = time.monotonic()
    if not args.dry_run:
        no_gpu_exit()  # before anything slow
    import numpy as np
    import torch
    from bench_train import random_store

    np.seterr(all="ignore")
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    if args.dry_run:
        args.sizes, args.channels, args.latent, args.batch = [32], (8, 16, 32), 16, 8
        args.warmup, args.seconds, args.max_steps = 1, 0.3, 3
        args.cmp_steps, args.cmp_repeats = (2, 4), 1
        args.eval_patches, args.eval_calls, args.iwae_k, args.gen_images = 16, 1, 4, 16
    else:
        args.sizes, args.channels, args.latent, args.batch = [128, 256], None, 128, 64
        args.warmup, args.seconds, args.max_steps = 5, 3.0, 10**6
        args.cmp_steps, args.cmp_repeats = (20, 120), 3
        args.eval_patches, args.eval_calls, args.iwae_k, args.gen_images = 1024, 3, 64, 2048
    torch.backends.cudnn.benchmark = True
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"machine": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
               "gpus": torch.cuda.device_count() if device.type == "cuda" else 0,
               "batch": args.batch, "dry_run": args.dry_run, "rows": []}
    deadline = t_start + args.budget
    with tempfile.TemporaryDirectory(prefix="medvae_gpu_check_") as tmp:
        n_store = max(8 * args.batch, 64) if args.dry_run else 40 * args.batch
        stores = {s: random_store(Path(tmp) / f"store_{s}", s, n_store) for s in args.sizes}
        results["rows"] += precision_rows(args, device, stores, deadline)
        results["rows"] += trainer_rows(args, device, stores, deadline)
        results["rows"] += ddp_rows(args, device, stores, deadline)
        results["rows"].append(loader_row(args, device, stores[args.sizes[0]]))
        results["rows"] += evaluate_rows(args, device, stores[args.sizes[0]])
    results["wall_s"] = time.monotonic() - t_start
    print_table(results)
    for line in best_modes(results["rows"]):
        print(line)
    ratios = [r["value"] for r in results["rows"] if r["section"] == "trainer / bare loop" and r.get("value")]
    if ratios:
        print(f"trainer / bare loop: median {statistics.median(ratios):.3f} (goal >= 0.95)")
    out = args.out / ("gpu_check_dry_run.json" if args.dry_run else "gpu_check.json")
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

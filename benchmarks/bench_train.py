"""Training throughput (images/s) of ConvVAE and the VAE–GAN against MONAI AutoencoderKL.

Measured in the same run, on the available device (CUDA > MPS > CPU):

- ConvVAE, VAE–GAN (discriminator active: both optimizer steps) and MONAI ``AutoencoderKL``
  (``monai-kl``, its channels chosen so its parameter count is closest to ConvVAE's) at 128² and
  256², batch 64. Each row times the trainer's own step (``medvae.training.trainer``: forward,
  losses, backward, clipping, NaN guard, optimizer steps) on random tensors shaped like the store,
  so it is model throughput; the ratio column is images/s over MONAI KL's at the same size.
  Batch 64 (8 on CPU by default: per-image throughput hardly depends on it there).
- On CUDA also bf16 + channels_last and bf16 + channels_last + torch.compile against fp32
  eager (the ratio column then is over fp32 eager), and peak GPU memory per row.
- One row of a full ``train()`` run reading a store through ``PatchBatches`` (``--store``, or a
  store of random patches written to bench_out/), against the step-only rate of the same model:
  a ratio near 1 means the loader is not the bottleneck.

Prints a table and writes bench_out/bench_train.json (``_quick`` with ``--quick``: batch 8, ~2 s
per row). Run: ``.venv/bin/python benchmarks/bench_train.py [--quick] [--store STORE]``.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from medvae.config import TrainStageConfig  # noqa: E402
from medvae.data.store import open_store  # noqa: E402
from medvae.devices import select_device  # noqa: E402
from medvae.models import build_model  # noqa: E402
from medvae.training.distributed import DistInfo  # noqa: E402
from medvae.training.tasks import ReconstructTask  # noqa: E402
from medvae.training.trainer import _Trainer, resolve_config, train  # noqa: E402
from tests.factories import patch_store  # noqa: E402

OUR_CHANNELS = (32, 64, 128, 256)


def random_store(path: Path, size: int, n: int) -> object:
    """A store of ``n`` random patches (smooth blobs) of ``size``², all in the train split."""
    if (path / "store.json").is_file():
        return open_store(path)
    rng = np.random.default_rng(0)
    x = rng.random((n, 1, size // 8, size // 8), dtype=np.float32)
    x = np.repeat(np.repeat(x, 8, axis=2), 8, axis=3)  # blocky, compressible like anatomy, not noise
    return patch_store(path, x, patient_id=[f"P{i % 10}" for i in range(n)],
                       split=["train"] * (n - n // 8) + ["val"] * (n // 8), source="bench",
                       content_hash=f"bench-random-{size}-{n}")


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def stage_cfg(name: str, channels, res_units: int, batch: int, amp: str, channels_last: bool,
              compile_: bool, steps: int) -> TrainStageConfig:
    return TrainStageConfig.model_validate({
        "model": {"name": name, "channels": list(channels), "latent_dim": 128, "res_units": res_units},
        "train": {"batch_size": batch, "max_steps": steps, "warmup_steps": 0, "disc_start": 0,
                  "amp": amp, "channels_last": channels_last, "compile": compile_, "checkpoint_every": 10**6,
                  "log_every": 10**6, "val_batches": 1, "max_bad_steps": 10**6},
    })


def matched_monai_kl(size: int) -> tuple[tuple[int, ...], int, int, int]:
    """MONAI KL channels/res_units whose parameter count is closest to ConvVAE's at ``size``."""
    ours = n_params(build_model(stage_cfg("vae", OUR_CHANNELS, 1, 1, "off", False, False, 1).model
                                .model_copy(update={"image_size": size})))
    best = None
    for res_units in (0, 1):
        for c in range(8, 65, 8):
            chs = (c, 2 * c, 4 * c, 8 * c)
            mcfg = stage_cfg("monai-kl", chs, res_units, 1, "off", False, False, 1).model
            p = n_params(build_model(mcfg.model_copy(update={"image_size": size})))
            if best is None or abs(p - ours) < abs(best[2] - ours):
                best = (chs, res_units, p, ours)
    return best


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_rate(store, cfg: TrainStageConfig, device, warmup: int, min_seconds: float, max_steps: int) -> dict:
    """images/s of the trainer's step on one pre-made random batch on ``device``."""
    cfg = resolve_config(cfg, store)
    with tempfile.TemporaryDirectory() as tmp:
        tr = _Trainer(store, Path(tmp), cfg, device, DistInfo(), ReconstructTask(store, cfg.train.seed), resume=False)
        b = cfg.train.batch_size
        x = torch.rand(b, cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size, device=device)
        if tr.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        tr.model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            tr._train_step(x)
            tr.step += 1
        sync(device)
        n, t0 = 0, time.perf_counter()
        while n < max_steps and (n < 2 or time.perf_counter() - t0 < min_seconds):
            tr._train_step(x)
            tr.step += 1
            n += 1
        sync(device)
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return {"params": n_params(tr.model), "steps": n, "images_per_s": n * b / dt, "peak_gib": peak,
                "amp": str(tr.amp_dtype).replace("torch.", "") if tr.amp_dtype else "fp32",
                "channels_last": tr.channels_last, "compile": cfg.train.compile, "bad_steps": tr.bad_steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 8, ~2 s per row")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=None,
                    help="default 64 (8 on CPU, where 64 takes minutes a step)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--seconds", type=float, default=10.0, help="minimum timed seconds per row")
    ap.add_argument("--store", type=Path, default=None, help="a patch store for the loader row")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows on CUDA")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out")
    args = ap.parse_args()
    device = select_device(args.device)
    if args.quick:
        args.batch, args.seconds = args.batch or 8, 2.0
    args.batch = args.batch or (64 if device.type != "cpu" else 8)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = True
    warmup, max_steps = (1, 20) if args.quick else (3, 200)
    if device.type == "cuda":
        warmup, max_steps = 10, 10**6

    results = {"machine": platform.node(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
               "torch": torch.__version__, "batch": args.batch, "rows": []}
    rows = results["rows"]
    precisions = [("off", False, False)]
    if device.type == "cuda":
        precisions += [("bf16", True, False)] + ([] if args.no_compile else [("bf16", True, True)])
    for size in args.sizes:
        store = random_store(args.out / f"bench_train_store_{size}", size, max(4 * args.batch, 64))
        kl_chs, kl_res, kl_p, our_p = matched_monai_kl(size)
        results[f"monai_kl_match_{size}"] = {"channels": list(kl_chs), "res_units": kl_res,
                                             "params": kl_p, "convvae_params": our_p}
        models = [("vae", OUR_CHANNELS, 1), ("vaegan", OUR_CHANNELS, 1), ("monai-kl", kl_chs, kl_res)]
        for amp, cl, comp in precisions:
            for name, chs, res in models:
                cfg = stage_cfg(name, chs, res, args.batch, amp, cl, comp, 10**9)
                r = step_rate(store, cfg, device, warmup, args.seconds, max_steps)
                r.update(model=name, size=size, channels=list(chs), res_units=res)
                rows.append(r)
                print(f"{name:9s} {size}² {r['amp']:5s} cl={cl!s:5s} compile={comp!s:5s} "
                      f"{r['params'] / 1e6:6.2f} M params  {r['images_per_s']:8.3g} img/s", flush=True)
        for r in rows:  # ratios: vs MONAI KL at the same size and precision; vs fp32 eager of the same model
            same = [q for q in rows if q["size"] == r["size"] and q["amp"] == r["amp"]
                    and q["compile"] == r["compile"] and q["model"] == "monai-kl"]
            if same:
                r["ratio_vs_monai_kl"] = r["images_per_s"] / same[0]["images_per_s"]
            base = [q for q in rows
                    if q["size"] == r["size"] and q["model"] == r["model"] and q["amp"] == "fp32"]
            if base:
                r["ratio_vs_fp32_eager"] = r["images_per_s"] / base[0]["images_per_s"]

    # loader row: a full train() through PatchBatches vs the step-only rate of the same config
    size = args.sizes[0]
    store = open_store(args.store) if args.store else random_store(
        args.out / f"bench_train_store_{size}_loader", size, 16 * args.batch)
    amp, cl, comp = precisions[1] if len(precisions) > 1 else precisions[0]
    steps = 200 if device.type == "cuda" else (4 if args.quick else 10)
    cfg = stage_cfg("vae", OUR_CHANNELS, 1, args.batch, amp, cl, comp, steps)
    cfg.train.log_every = steps // 2  # the second half's rate: first steps carry warm-up costs
    only = step_rate(store, cfg, device, warmup, args.seconds, max_steps)
    if device.type == "cuda":
        with tempfile.TemporaryDirectory() as tmp:
            train(store, tmp, cfg, device=str(device))  # warm-up run (allocator, cudnn autotune, compile)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train(store, tmp, cfg, device=str(device))
        full_wall = time.perf_counter() - t0
        rate = json.loads((Path(tmp) / "train_log.jsonl").read_text().splitlines()[-1])["images_per_s"]
    results["loader"] = {"store": str(store.path), "size": int(store.meta["patch_size"]), "steps": steps,
                         "train_images_per_s": rate, "step_only_images_per_s": only["images_per_s"],
                         "ratio": rate / only["images_per_s"], "train_wall_s": full_wall,
                         "amp": only["amp"]}

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"training throughput, batch {args.batch}, {results['device']} "
                    f"({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)")
    for col in ("model", "size", "params", "precision", "img/s", "vs MONAI KL", "vs fp32 eager", "peak GiB"):
        t.add_column(col)
    for r in rows:
        prec = r["amp"] + (" +channels_last" if r["channels_last"] else "")
        prec += " +compile" if r["compile"] else ""
        t.add_row(r["model"], f"{r['size']}²", f"{r['params'] / 1e6:.2f} M", prec, f"{r['images_per_s']:.3g}",
                  f"{r.get('ratio_vs_monai_kl', float('nan')):.2f}",
                  f"{r.get('ratio_vs_fp32_eager', float('nan')):.2f}",
                  "" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}")
    lo = results["loader"]
    t.add_row("vae train() + PatchBatches", f"{lo['size']}²", "", lo["amp"],
              f"{lo['train_images_per_s']:.3g}",
              "", f"{lo['ratio']:.2f} of step-only", "")
    Console(width=150).print(t)
    out = args.out / ("bench_train_quick.json" if args.quick else "bench_train.json")
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Training throughput: `medvae train` against a bare PyTorch loop (the goal), and a model table.

**Trainer vs bare loop** (the default; the goal of issue #20: ratio >= 0.95, quiet and loaded).
Same ConvVAE, same batch, in the same process, run in turn (bare, trainer, bare, trainer, ...):

- bare loop: the model's ``encode`` / ``decode_logits``, a hand-written Gaussian NLL (the model's
  learned per-channel sigma) + KL, ``backward``, ``torch.optim.Adam`` (the trainer's betas and
  learning rate), on batches gathered from the train split held in memory as float32;
- trainer: ``medvae.training.trainer.train`` on the same store (its loader reading the memmap,
  logging every ``log_every`` steps, the NaN guard, gradient clipping, LR and KL schedules:
  the trainer's defaults), timed from outside as the *marginal* cost of a step: the wall time of
  a run of N2 steps minus that of a run of N1 steps (start-up, the final validation and
  checkpoint cancel), so everything a step costs is counted and nothing the step does not cost.
  The bare loop is timed the same way (N2 - N1 steps after N1).
- ``quiet``: nothing else started; ``loaded``: a second job started by the benchmark itself (a
  busy process spinning on one core, ``--load-procs``) runs during both measurements.
Each condition prints images/s of both and the median of the per-pair ratios trainer / bare.

**Model table** (``--table``): ConvVAE, VAE–GAN (critic on) and MONAI AutoencoderKL at 128² and
256² through the trainer's own step on random tensors (model throughput, ratio vs MONAI KL).

Writes bench_out/bench_train.json (``_quick`` with ``--quick``). Run:
``.venv/bin/python benchmarks/bench_train.py [--quick] [--size 32] [--channels 32 64 128 256]``
(``--channels default``: the patch-size default of ``ModelConfig``). CPU paths (#20): ``--amp bf16``,
``--compile`` (the warm-up's wall time, compilation included, is printed), ``--threads N``,
``--interop-threads N``; ``--conditions quiet`` for one condition.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from medvae.config import TrainStageConfig  # noqa: E402
from medvae.data.store import open_store, store_complete  # noqa: E402
from medvae.devices import select_device  # noqa: E402
from medvae.models import build_model  # noqa: E402
from medvae.training.distributed import DistInfo  # noqa: E402
from medvae.training.tasks import ReconstructTask  # noqa: E402
from medvae.training.trainer import _Trainer, resolve_config, train  # noqa: E402
from tests.factories import patch_store  # noqa: E402

OUR_CHANNELS = (32, 64, 128, 256)


def random_store(path: Path, size: int, n: int) -> object:
    """A store of ``n`` random patches (smooth blobs) of ``size``², 7/8 in the train split."""
    if store_complete(path):
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
    model = {"name": name, "latent_dim": 128, "res_units": res_units}
    if channels is not None:  # None: the patch-size default
        model["channels"] = list(channels)
    return TrainStageConfig.model_validate({
        "model": model,
        "train": {"batch_size": batch, "max_steps": steps, "warmup_steps": 0, "disc_start": 0,
                  "amp": amp, "channels_last": channels_last, "compile": compile_, "checkpoint_every": 10**6,
                  "log_every": 10**6, "val_batches": 1, "max_bad_steps": 10**6},
    })


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- trainer vs bare loop
def trainer_cfg(channels, batch: int, steps: int, amp: str = "auto", channels_last: bool = True,
                compile_: bool = False) -> TrainStageConfig:
    """The trainer's defaults (log_every, grad_clip, schedules, NaN guard) with ``steps`` and ``batch``."""
    model = {"name": "vae"} if channels is None else {"name": "vae", "channels": list(channels)}
    return TrainStageConfig.model_validate({"model": model, "train": {
        "batch_size": batch, "max_steps": steps, "amp": amp, "channels_last": channels_last, "compile": compile_}})


def autocast(device, amp_dtype):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def bare_loop(store, cfg: TrainStageConfig, device, steps: int, amp_dtype=None, channels_last: bool = False,
              compile_: bool = False) -> list[float]:
    """A plain PyTorch loop on the trainer's model and optimizer settings: the clock after every step.

    Batches: a random permutation of the train split, gathered from a float32 copy in memory.
    """
    cfg = resolve_config(cfg, store)
    t = cfg.train
    torch.manual_seed(t.seed)
    model = build_model(cfg.model).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_:
        model.encoder.compile()
        model.decoder.compile()
    model.train()
    data = torch.from_numpy(np.asarray(store.patches[store.select("train")], dtype=np.float32)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=t.lr, betas=tuple(t.betas))
    b, half_log_2pi = t.batch_size, 0.5 * math.log(2 * math.pi)
    perm = torch.randperm(len(data), device=device)
    clock, pos = [], 0
    for _ in range(steps):
        if pos + b > len(data):
            perm, pos = torch.randperm(len(data), device=device), 0
        x = data[perm[pos:pos + b]]
        pos += b
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            mu, logvar = model.encode(x)
            mu, logvar = mu.float(), logvar.float()
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            x_hat = torch.sigmoid(model.decode_logits(z).float())
        log_sigma = model.likelihood.log_sigma.clamp(math.log(1e-3), 0.0).view(1, -1, 1, 1)
        nll = (0.5 * ((x - x_hat) * torch.exp(-log_sigma)) ** 2 + log_sigma + half_log_2pi).flatten(1).sum(1).mean()
        kl = (0.5 * (mu * mu + torch.exp(logvar) - 1.0 - logvar)).sum(1).mean()
        loss = nll + kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        clock.append(time.perf_counter())
    return clock


def trainer_wall(store, cfg: TrainStageConfig, device, steps: int) -> float:
    """Wall seconds of a whole ``train()`` of ``steps`` steps (set-up, final validation, checkpoint)."""
    cfg = cfg.model_copy(deep=True)
    cfg.train.max_steps = steps
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = train(store, tmp, cfg, device=str(device))
        sync(device)
        wall = time.perf_counter() - t0
    assert summary["step"] == steps and summary["bad_steps"] == 0, summary
    return wall


@contextlib.contextmanager
def busy_neighbours(n: int):
    """``n`` processes spinning on a core each (a second job on the machine) while the block runs."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5)
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def compare(store, cfg, device, n1: int, n2: int, repeats: int, load: int) -> dict:
    """Marginal images/s of bare loop and trainer over steps n1..n2, ``repeats`` pairs, in turn."""
    b = cfg.train.batch_size
    amp_dtype = resolve_amp_dtype(cfg, device)
    channels_last = cfg.train.channels_last and device.type == "cuda"
    bare, ours, ratios = [], [], []
    with busy_neighbours(load) if load else contextlib.nullcontext():
        # warm-up, untimed: a whole run of each (allocator, oneDNN primitive caches, page cache; with
        # --compile the compilation: its wall time is reported as warmup_trainer_s / warmup_bare_s)
        warm_trainer = trainer_wall(store, cfg, device, n1)
        t0 = time.perf_counter()
        bare_loop(store, cfg, device, n2, amp_dtype, channels_last, cfg.train.compile)
        warm_bare = time.perf_counter() - t0
        for _ in range(repeats):
            clock = bare_loop(store, cfg, device, n2, amp_dtype, channels_last, cfg.train.compile)
            bare.append((n2 - n1) * b / (clock[n2 - 1] - clock[n1 - 1]))
            w1 = trainer_wall(store, cfg, device, n1)
            w2 = trainer_wall(store, cfg, device, n2)
            ours.append((n2 - n1) * b / max(w2 - w1, 1e-9))
            ratios.append(ours[-1] / bare[-1])
            print(f"  {'loaded' if load else 'quiet'}: bare {bare[-1]:7.1f} img/s, medvae train {ours[-1]:7.1f} "
                  f"img/s, ratio {ratios[-1]:.3f}", flush=True)
    return {"bare_images_per_s": statistics.median(bare), "trainer_images_per_s": statistics.median(ours),
            "ratio_median": statistics.median(ratios), "ratios": ratios, "bare_all": bare, "trainer_all": ours,
            "busy_processes": load, "warmup_trainer_s": warm_trainer, "warmup_bare_s": warm_bare,
            "warmup_trainer_steps": n1, "warmup_bare_steps": n2}


def resolve_amp_dtype(cfg: TrainStageConfig, device):
    from medvae.training.runtime import resolve_amp

    return resolve_amp(cfg.train.amp, device)


# --------------------------------------------------------------------------- model table (--table)
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


def step_rate(store, cfg: TrainStageConfig, device, warmup: int, min_seconds: float, max_steps: int,
              task=None) -> dict:
    """images/s of the trainer's step on one pre-made random batch on ``device`` (``task``: the training task,
    a ReconstructTask when None)."""
    from medvae.data.loader import Batch

    cfg = resolve_config(cfg, store)
    task = ReconstructTask(store, cfg.train.seed) if task is None else task
    with tempfile.TemporaryDirectory() as tmp:
        tr = _Trainer(store, Path(tmp), cfg, device, DistInfo(), task, resume=False)
        b = cfg.train.batch_size
        x = torch.rand(b, cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size, device=device)
        if tr.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        batch = Batch(x, None, np.arange(b))
        tr.model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            tr._train_step(batch)
            tr.step += 1
        sync(device)
        n, t0 = 0, time.perf_counter()
        while n < max_steps and (n < 2 or time.perf_counter() - t0 < min_seconds):
            tr._train_step(batch)
            tr.step += 1
            n += 1
        sync(device)
        dt = time.perf_counter() - t0
        tr._settle()  # the device path's skip decisions: counted into bad_steps
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return {"params": n_params(tr.model), "steps": n, "images_per_s": n * b / dt, "peak_gib": peak,
                "amp": str(tr.amp_dtype).replace("torch.", "") if tr.amp_dtype else "fp32",
                "channels_last": tr.channels_last, "compile": cfg.train.compile, "bad_steps": tr.bad_steps}


def model_table(args, device, results) -> None:
    rows = results["rows"] = []
    precisions = [("off", False, False)]
    if device.type == "cuda":
        precisions += [("bf16", True, False)] + ([] if args.no_compile else [("bf16", True, True)])
    warmup, max_steps = ((1, 20) if args.quick else (3, 200)) if device.type != "cuda" else (10, 10**6)
    batch = args.table_batch or (64 if device.type != "cpu" else 8)
    for size in args.sizes:
        store = random_store(args.out / f"bench_train_store_{size}", size, max(4 * batch, 64))
        kl_chs, kl_res, kl_p, our_p = matched_monai_kl(size)
        results[f"monai_kl_match_{size}"] = {"channels": list(kl_chs), "res_units": kl_res,
                                             "params": kl_p, "convvae_params": our_p}
        models = [("vae", OUR_CHANNELS, 1), ("vaegan", OUR_CHANNELS, 1), ("monai-kl", kl_chs, kl_res)]
        for amp, cl, comp in precisions:
            for name, chs, res in models:
                cfg = stage_cfg(name, chs, res, batch, amp, cl, comp, 10**9)
                r = step_rate(store, cfg, device, warmup, args.seconds, max_steps)
                r.update(model=name, size=size, channels=list(chs), res_units=res)
                rows.append(r)
                print(f"{name:9s} {size}² {r['amp']:5s} cl={cl!s:5s} compile={comp!s:5s} "
                      f"{r['params'] / 1e6:6.2f} M params  {r['images_per_s']:8.3g} img/s", flush=True)
        for r in rows:
            same = [q for q in rows if q["size"] == r["size"] and q["amp"] == r["amp"]
                    and q["compile"] == r["compile"] and q["model"] == "monai-kl"]
            if same:
                r["ratio_vs_monai_kl"] = r["images_per_s"] / same[0]["images_per_s"]


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few steps and repeats: checks the path in a minute")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=32, help="patch size of the comparison (default 32)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--channels", nargs="+", default=[str(c) for c in OUR_CHANNELS],
                    help="ConvVAE widths of the comparison; 'default': the patch-size default")
    ap.add_argument("--steps", type=int, nargs=2, default=None, metavar=("N1", "N2"),
                    help="the marginal steps N1..N2 (default 10 40; --quick 3 8)")
    ap.add_argument("--repeats", type=int, default=None, help="pairs per condition (default 5; --quick 1)")
    ap.add_argument("--load-procs", type=int, default=1, help="busy processes of the loaded condition")
    ap.add_argument("--conditions", nargs="+", default=["quiet", "loaded"], choices=["quiet", "loaded"])
    ap.add_argument("--amp", default="auto", help="the trainer's amp (the bare loop follows it)")
    ap.add_argument("--compile", action="store_true",
                    help="train.compile on (the bare loop compiles encoder and decoder too); the warm-up's wall "
                         "time, compilation included, is printed")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--interop-threads", type=int, default=None, help="torch.set_num_interop_threads")
    ap.add_argument("--table", action="store_true", help="also the model table at --sizes")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--table-batch", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=10.0, help="minimum timed seconds per table row")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows on CUDA")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out")
    args = ap.parse_args()
    if args.interop_threads:
        torch.set_num_interop_threads(args.interop_threads)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    n1, n2 = args.steps or ((3, 8) if args.quick else (10, 40))
    repeats = args.repeats or (1 if args.quick else 5)
    if args.quick:
        args.seconds = 2.0
    args.out.mkdir(parents=True, exist_ok=True)
    channels = None if args.channels == ["default"] else tuple(int(c) for c in args.channels)

    results = {"machine": platform.node(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
               "torch": torch.__version__, "load_average_before": os.getloadavg()}
    store = random_store(args.out / f"bench_train_store_{args.size}_cmp", args.size, max(40 * args.batch, 512))
    cfg = trainer_cfg(channels, args.batch, n2, amp=args.amp, compile_=args.compile)
    params = n_params(build_model(resolve_config(cfg, store).model))
    results["comparison"] = cmp = {"size": args.size, "batch": args.batch, "params": params, "steps": [n1, n2],
                                   "channels": None if channels is None else list(channels), "amp": args.amp,
                                   "compile": args.compile, "interop_threads": torch.get_num_interop_threads()}
    print(f"ConvVAE {args.size}², {params / 1e6:.2f} M parameters, batch {args.batch}, marginal steps {n1}..{n2}, "
          f"{repeats} pair(s) per condition, {torch.get_num_threads()} torch threads, amp {args.amp}, "
          f"compile {args.compile}", flush=True)
    for cond in args.conditions:
        cmp[cond] = compare(store, cfg, device, n1, n2, repeats, args.load_procs if cond == "loaded" else 0)
    if args.table:
        model_table(args, device, results)
    results["load_average_after"] = os.getloadavg()

    print(f"\nmedvae train vs a bare PyTorch loop: ConvVAE {args.size}² ({params / 1e6:.2f} M), batch {args.batch}, "
          f"{results['device']} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)")
    print(f"{'condition':<10} {'bare img/s':>11} {'train img/s':>12} {'ratio (median)':>15}  goal >= 0.95")
    for cond in args.conditions:
        c = cmp[cond]
        label = cond if cond == "quiet" else f"loaded ({c['busy_processes']} busy)"
        print(f"{label:<10} {c['bare_images_per_s']:>11.1f} {c['trainer_images_per_s']:>12.1f} "
              f"{c['ratio_median']:>15.3f}  (pairs: {', '.join(f'{r:.3f}' for r in c['ratios'])})")
        print(f"{'':<10} warm-up: trainer {c['warmup_trainer_s']:.1f} s ({n1} steps), bare loop "
              f"{c['warmup_bare_s']:.1f} s ({n2} steps)")
    for r in results.get("rows", []):
        print(f"{r['model']:9s} {r['size']}² {r['amp']:5s} {r['params'] / 1e6:6.2f} M {r['images_per_s']:8.3g} img/s"
              f"  vs MONAI KL {r.get('ratio_vs_monai_kl', float('nan')):.2f}")
    print(f"load average before/after: {results['load_average_before']} / {results['load_average_after']}")
    out = args.out / ("bench_train_quick.json" if args.quick else "bench_train.json")
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

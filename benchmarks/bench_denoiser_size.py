"""The self-supervised default network: n2v as `medvae train --task denoise --objective n2v` runs it (posterior
on, (a, b) calibrated, 1/64 of the pixels masked) with three networks — 32/64/128/256 with GroupNorm (the default
before), 16/32/64 with GroupNorm (the default now) and 16/32/64 without normalization (``model.norm_groups: 0``) —
on bench_selfsupervised.py's fluorescence image at one photon level, ``--steps`` steps of 16 64² tiles of the whole
noisy image.

Prints per network: the train step's images/s measured alone (forward + backward + Adam on one batch, after
warm-up), the minutes 1,500 such steps take, the wall time of the whole training (validation and checkpoints
included), PSNR / SSIM on the right half (applied alone, as the bench scores), and the interior mean of the output
for flat noisy 256² images at 0.05, 0.2 and 0.5 (a network that keeps levels returns them). The table in
docs/denoising.md came from this script's first version (``--steps 1500 --photons 20``). Run:
``.venv/bin/python benchmarks/bench_denoiser_size.py --image STARDIST_WHEEL [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_selfsupervised as B  # noqa: E402

from medvae.config import TrainStageConfig  # noqa: E402
from medvae.models import build_model  # noqa: E402
from medvae.pipeline import train_stage  # noqa: E402
from medvae.training.checkpoint import load_model  # noqa: E402
from medvae.training.rundir import RunDir  # noqa: E402

NETWORKS = {"32/64/128/256, GroupNorm (before)": {"channels": [32, 64, 128, 256]},
            "16/32/64, GroupNorm (default)": {},
            "16/32/64, no normalization": {"norm_groups": 0}}


def step_rate(cfg: TrainStageConfig, batch: int = 16, steps: int = 10) -> float:
    """Images/s of one training step of ``cfg``'s network alone (L2 on its output; the cost is the network's)."""
    model = build_model(cfg.model.model_copy(update={"image_size": 64}))
    opt = torch.optim.AdamW(model.parameters())
    x = torch.rand(batch, 1, 64, 64)
    for i in range(steps + 3):
        if i == 3:
            t0 = time.perf_counter()
        model(x).x_hat.float().mean().backward()
        opt.step()
        opt.zero_grad()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", default=None, help="a 2D fluorescence TIFF, or the stardist wheel")
    ap.add_argument("--photons", type=float, default=20.0)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="10 steps: checks the script only")
    ap.add_argument("--out", type=Path, default=Path("bench_out/denoiser_size"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = 10 if args.quick else args.steps
    clean, source = B.load_clean(args.image)
    noisy = B.simulate(clean, args.photons, seed=101)
    w = clean.shape[1]
    out = args.out / f"steps{steps}-{args.photons:g}"
    store = B._store(out / "store", B.tiles(noisy, 64, 32), 16, f"size-{args.photons:g}")
    rows = []
    for i, (name, model) in enumerate(NETWORKS.items()):
        train = {**B._train_cfg(steps), "checkpoint_every": max(steps // 6, 1)}
        cfg = TrainStageConfig.model_validate({"task": "denoise", "objective": "n2v", "model": model, "train": train})
        rate = step_rate(cfg)
        t0 = time.perf_counter()
        train_stage(store, out / f"run-{i}", cfg, device="cpu", resume=True)
        wall = time.perf_counter() - t0
        net, _ = load_model(RunDir(out / f"run-{i}").checkpoint("best"), device="cpu")
        with torch.no_grad():
            den = net.denoise(torch.from_numpy(noisy[:, w // 2:])[None, None])[0, 0].numpy()
            flat = {}
            for level in (0.05, 0.2, 0.5):
                f = B.simulate(np.full((256, 256), level, np.float32), args.photons, seed=3)
                flat[level] = float(net.denoise(torch.from_numpy(f)[None, None])[0, 0, 8:-8, 8:-8].mean())
        rows.append({"network": name, "img_per_s": rate, "min_per_1500_steps": 1500 * 16 / rate / 60,
                     "train_wall_s": wall, **B.scores(den, clean[:, w // 2:]), "flat": flat})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{source}, {args.photons:g} photons, {steps} steps, {args.threads} threads\n")
    print("| network | img/s (step) | 1,500 steps (min) | train wall s | PSNR / SSIM | flat 0.05 / 0.2 / 0.5 → |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['network']} | {r['img_per_s']:.0f} | {r['min_per_1500_steps']:.1f} | {r['train_wall_s']:.0f} | "
              f"{r['psnr']:.2f} / {r['ssim']:.3f} | " + " / ".join(f"{v:.3f}" for v in r["flat"].values()) + " |")
    (out / "bench_denoiser_size.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

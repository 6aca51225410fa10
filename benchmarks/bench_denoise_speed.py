"""`medvae denoise` throughput on 512² CPU slices against non-local means (the speed goal).

Writes a 16-slice 512² int16 NIfTI (noisy phantom-like disks in HU), trains nothing (weights do not
change the cost), and times the whole `medvae denoise` path (read, normalize, model, map back,
atomic NIfTI write) per slice in fp32 (amp off) with 1 torch thread and with all threads, and with
1 thread in bf16 and in the default precision (amp auto: bf16 on a CPU with AMX), against scikit-image's
non-local means (fast mode, σ estimated: the classical baseline of `medvae evaluate`) on the same
slice. Prints seconds per slice and the ratio medvae / NLM (goal ≤ 1.0 with one thread). Run:
``.venv/bin/python benchmarks/bench_denoise_speed.py [--run RUN]`` (RUN: a trained denoise run;
default: a fresh 2-step run of the bench_denoise model on a tiny store).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # medvae and tests.factories of this checkout

from medvae.config import DenoiseConfig, TrainStageConfig  # noqa: E402
from medvae.denoising import classical  # noqa: E402
from medvae.denoising.apply import denoise_scans  # noqa: E402
from medvae.pipeline import train_stage  # noqa: E402
from tests.factories import patch_store  # noqa: E402


def tiny_run(tmp: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (24, 1, 128, 128)).astype(np.float32)
    store = patch_store(tmp / "store", x, patient_id="P", split=["train"] * 16 + ["val"] * 8, source="bench",
                        content_hash="speed", normalization={"ct": {"low": -160.0, "high": 240.0, "unit": "HU"}},
                        spacing={"ct": [0.8, 0.8]})
    cfg = TrainStageConfig.model_validate({
        "task": "denoise", "noise": {"kind": "gaussian"},
        "model": {"name": "dae", "channels": [16, 32, 64], "res_units": 1, "likelihood": "l2"},
        "train": {"batch_size": 8, "max_steps": 2, "checkpoint_every": 2, "val_batches": 1, "amp": "off"}})
    train_stage(store, tmp / "run", cfg, device="cpu")
    return tmp / "run"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=None)
    ap.add_argument("--slices", type=int, default=16)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_denoise_speed_"))
    run = args.run or tiny_run(tmp)
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:512, :512]
    body = ((yy - 256) ** 2 / 200 ** 2 + (xx - 256) ** 2 / 240 ** 2 < 1) * 1000.0 - 1000.0
    vol = np.stack([body + 40 + rng.normal(0, 40, (512, 512)) for _ in range(args.slices)], -1).astype(np.int16)
    src = tmp / "scan.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.8, 2.5, 1.0])), src)
    rows = []
    runs = [(threads, "off") for threads in sorted({1, os.cpu_count() or 1})]
    has_amp = "amp" in DenoiseConfig.model_fields  # a checkout from before the option: fp32 only
    if has_amp:
        runs += [(1, "bf16"), (1, "auto")]  # auto, the default: bf16 where the CPU has AMX / AVX-512 BF16
    for threads, amp in runs:
        torch.set_num_threads(threads)
        cfg = DenoiseConfig(amp=amp) if has_amp else DenoiseConfig()
        dst = tmp / f"out_{threads}_{amp}.nii.gz"
        denoise_scans(run, src, tmp / f"warm_{threads}_{amp}.nii.gz", cfg, device="cpu")  # warm-up
        t0 = time.perf_counter()
        denoise_scans(run, src, dst, cfg, device="cpu")
        label = f"medvae denoise, {threads} thread(s), amp {amp}"
        if amp == "auto":  # what auto resolved to on this CPU
            from medvae.training.runtime import precision_name, resolve_amp

            label += f" ({precision_name(resolve_amp(amp, torch.device('cpu')))})"
        rows.append((label, (time.perf_counter() - t0) / args.slices))
    x01 = ((vol[..., 0].T.astype(np.float32) + 160) / 400).clip(0, 1)
    nlm = classical.seconds_per_slice("nlm", x01, repeats=3)
    print(f"{'method':<46} s / 512² slice   method / NLM (goal <= 1.0 with 1 thread, fp32)")
    for name, sec in [*rows, ("non-local means (scikit-image, 1 thread)", nlm)]:
        print(f"{name:<46} {sec:>10.3f}   {sec / nlm:>8.2f}")


if __name__ == "__main__":
    main()

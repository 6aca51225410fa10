"""Low-dose CT from the user's own scans: which objective to train, against BM3D / NLM / TV (issue #29 item 7).

Data (``--data``):

- ``real``: the real CT slices pydicom and pydicom-data ship (no download; ``bench_denoise.PYDICOM_CT``): train on
  one CQ500 head slice (``693_UNCI``) and ``CT_small``, validate (best.pt) on a Pancreas-CT slice
  (``explicit_VR-UN``), test on another patient's head slice (``J2K_pixelrep_mismatch``); native resolution,
  abdominal window, 128² tiles (stride 32).
- ``phantom``: the phantom cohort's CT (6 patients at 256², split by patient as ``medvae discover`` does).

Test: the test split's non-overlapping 128² tiles (at most 48, evenly spaced), each corrupted once per dose
(5, 11.2, 25 % of ``ct_photons``; the ``ct-lowdose`` simulator: Poisson counts on parallel-beam projections,
filtered back-projection) with a fixed seed; every method gets the same noisy tiles and is scored against the
normal-dose tile (PSNR / SSIM on [0, 1], outputs clipped).

Methods (one network, ``--channels``, for every trained arm; best.pt as ``medvae evaluate`` uses it):

- ``supervised``: the dae trained on the normal-dose train slices with simulated low dose over the whole dose
  range (the ``ct_lowdose`` pipeline's objective), flips on;
- ``noise2noise``: the same, its target a second, independent low-dose simulation of the same slice
  (``noise.target: noisy``);
- ``n2v`` and ``n2v-box`` (only low-dose scans, no normal dose): n2v trained per dose on the noisy test tiles
  themselves (the product's self-supervised defaults, no posterior: the Poisson–Gaussian model is not CT's);
  ``n2v-box`` also hides the 3 x 3 square around each masked pixel (``blindspot.struct: box``, 1/64 of the pixels
  masked), where filtered back-projection correlates the noise;
- references in the same run: the noisy input and Noise2Self-tuned TV / NLM and BM3D
  (``medvae.denoising.classical``).

Prints the table (PSNR dB per dose and method, best − BM3D) and the wall times; writes
``--out``/bench_ct_denoise_<data>.json. Run: ``.venv/bin/python benchmarks/bench_ct_denoise.py --data real``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # medvae and tests.factories of this checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_denoise import pydicom_ct_store  # noqa: E402

from medvae.config import NoiseConfig, PrepareConfig, TrainStageConfig  # noqa: E402
from medvae.data.discover import discover  # noqa: E402
from medvae.data.manifest import write_manifest  # noqa: E402
from medvae.data.prepare import prepare  # noqa: E402
from medvae.data.store import even_positions, open_store  # noqa: E402
from medvae.denoising import classical  # noqa: E402
from medvae.denoising.evaluate import EVAL_SEED, _medvae, _scores  # noqa: E402
from medvae.denoising.noise import step_generator  # noqa: E402
from medvae.denoising.supervised import DenoiseTask  # noqa: E402
from medvae.pipeline import train_stage  # noqa: E402
from medvae.training.checkpoint import load_model  # noqa: E402
from medvae.training.rundir import RunDir  # noqa: E402
from tests.factories import patch_store, phantom_cohort  # noqa: E402

DOSES = (0.05, 0.112, 0.25)
CLASSICAL = ("tv", "nlm", "bm3d")


def clean_store(data: str, root: Path):
    """The normal-dose store of ``data`` (module docstring), 128² tiles."""
    if data == "real":
        return open_store(pydicom_ct_store(root))
    scans = root / "scans-phantom"
    phantom_cohort(scans, ct_patients=6, microscopy_stacks=0, seed=0, ct_size=256, ct_slices=None)  # cached
    manifest = root / "phantom-ct.csv"
    write_manifest(discover(scans, modality="ct"), manifest)
    return open_store(prepare(manifest, root / "phantom-ct", PrepareConfig(mode="tile", stride=64)).path)


def held_out_tiles(store, n: int = 48) -> tuple[np.ndarray, dict[float, np.ndarray]]:
    """The test split's non-overlapping tiles (clean) and their noisy copies per dose (one fixed draw)."""
    idx = store.index
    rows = np.flatnonzero((idx["split"].astype(str) == "test") & (idx["y"] % 128 == 0) & (idx["x"] % 128 == 0))
    rows = rows[even_positions(len(rows), n)] if len(rows) > n else rows
    clean = store.get(rows).astype(np.float32)
    task = DenoiseTask(store, NoiseConfig(kind="ct-lowdose"), 0)
    noisy = {d: task.corrupt(torch.from_numpy(clean), rows, step_generator(EVAL_SEED, i),
                             torch.full((len(rows),), d))[0].numpy() for i, d in enumerate(DOSES)}
    return clean, noisy


def _train(steps: int, batch: int) -> dict:
    return {"batch_size": batch, "max_steps": steps, "lr": 1e-3, "warmup_steps": 50,
            "checkpoint_every": max(steps // 10, 1), "log_every": 50, "val_batches": 4, "betas": [0.9, 0.99],
            "amp": "off"}


def supervised_cfg(steps: int, channels: list[int], batch: int, target: str) -> TrainStageConfig:
    return TrainStageConfig.model_validate({
        "task": "denoise", "noise": {"kind": "ct-lowdose", "crop": 64, "flips": True, "target": target},
        "model": {"name": "dae", "channels": channels, "res_units": 1, "likelihood": "l2", "fixed_scale": 0.1},
        "train": _train(steps, batch)})


def n2v_cfg(steps: int, batch: int, struct: str) -> TrainStageConfig:
    # n2v masks 1/16 of the pixels (bench_selfsupervised's short-budget setting); the box 1/64 (N2V's), so its
    # 3 x 3 squares of random values cover 14 % of the input (at 1/16: 56 %, refused by check_config; 22 dB measured)
    fraction = 1 / 64 if struct == "box" else 1 / 16
    return TrainStageConfig.model_validate({
        "task": "denoise", "objective": "n2v", "posterior": False, "noise": {"crop": 64},
        "blindspot": {"fraction": fraction, "struct": struct, "struct_length": 3}, "train": _train(steps, batch)})


def apply(run: Path, noisy: np.ndarray) -> np.ndarray:
    """best.pt on the noisy tiles, as ``medvae evaluate`` applies it."""
    model, _ = load_model(RunDir(run).checkpoint("best"), device="cpu")
    return _medvae(model, noisy, torch.device("cpu"), 16)


def scores(out: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    """Mean PSNR / SSIM / MAE over the tiles, as ``medvae evaluate`` scores them (outputs clipped to [0, 1])."""
    return {k: float(v.mean()) for k, v in _scores(out, clean).items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", choices=("real", "phantom"), default="real")
    ap.add_argument("--steps", type=int, default=3000, help="supervised / noise2noise steps")
    ap.add_argument("--n2v-steps", type=int, default=500, help="n2v steps per dose")
    ap.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--methods", nargs="+", default=["supervised", "noise2noise", "n2v", "n2v-box"])
    ap.add_argument("--out", type=Path, default=Path("bench_out/ct_denoise"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out / args.data
    out.mkdir(parents=True, exist_ok=True)
    store = clean_store(args.data, out)
    clean, noisy = held_out_tiles(store)
    rows: dict[str, dict] = {str(d): {"noisy": scores(noisy[d], clean)} for d in DOSES}
    seconds: dict[str, float] = {}
    for m in CLASSICAL:
        if classical.available(m):
            t0 = time.perf_counter()
            for d in DOSES:
                rows[str(d)][m] = scores(classical.denoise(m, noisy[d]), clean)
            seconds[m] = time.perf_counter() - t0
    for method in args.methods:
        t0 = time.perf_counter()
        if method in ("supervised", "noise2noise"):
            run = out / "runs" / method
            cfg = supervised_cfg(args.steps, args.channels, args.batch, "clean" if method == "supervised" else "noisy")
            train_stage(store.path, run, cfg, device="auto", resume=True)
            for d in DOSES:
                rows[str(d)][method] = scores(apply(run, noisy[d]), clean)
        else:  # n2v per dose on the noisy test tiles themselves (a store of them, nothing else)
            for d in DOSES:
                n = len(noisy[d])
                lowdose = patch_store(out / f"lowdose-{d}", noisy[d], patient_id=["test"] * n, modality="ct",
                                      split=["train"] * n, content_hash=f"ct-lowdose-test-{args.data}-{d}")
                run = out / "runs" / f"{method}-{d}"
                batch = min(args.batch, n * 15 // 16)  # 1/16 of the tiles held out (best.pt); one real slice has 12
                train_stage(lowdose.path, run, n2v_cfg(args.n2v_steps, batch, "box" if method == "n2v-box" else "none"),
                            device="auto", resume=True)
                rows[str(d)][method] = scores(apply(run, noisy[d]), clean)
        seconds[method] = time.perf_counter() - t0
        print(f"{method}: {seconds[method]:.0f} s", flush=True)
    methods = [m for m in rows[str(DOSES[0])] if m != "noisy"]
    print(f"\n{args.data} CT, {len(clean)} test tiles of 128², PSNR dB / SSIM")
    print("| dose | noisy | " + " | ".join(methods) + " | best trained − bm3d |")
    for d in DOSES:
        r = rows[str(d)]
        trained = [m for m in methods if m not in CLASSICAL]
        gap = max(r[m]["psnr"] for m in trained) - r["bm3d"]["psnr"] if trained and "bm3d" in r else float("nan")
        print(f"| {d} | {r['noisy']['psnr']:.2f} | " + " | ".join(f"{r[m]['psnr']:.2f} / {r[m]['ssim']:.3f}"
                                                             for m in methods) + f" | {gap:+.2f} |")
    print("wall s: " + ", ".join(f"{m} {s:.0f}" for m, s in seconds.items()))
    machine = {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads(),
               "cuda": torch.cuda.is_available()}
    path = args.out / f"bench_ct_denoise_{args.data}.json"
    path.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                "test_tiles": len(clean), "psnr_ssim": rows, "seconds": seconds}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Synthetic dataset throughput: samples/s written to disk, time split into decode / audit / write.

A randomly initialised ConvVAE (build_model) and a synthetic CT store stand in for a trained run
(the cost of generation does not depend on the weights). For 128² and 256² patches it runs
``medvae.synthesis.generate.generate`` end to end (NIfTI + PNG per sample, audit against the store's train
split) and reports samples/s, the share of each phase, and, as the reference measured in the
same run, the in-memory rate of ``medvae.synthesis.sampling.sample_images`` (the seeded prior
latents and the decoding that generation uses; no audit, no files): the ratio says what the audit
and writing cost on top. Goal on CPU: writing <= 30% of the time.

    python benchmarks/bench_generate.py [--quick] [--device auto|cpu|cuda] [--out bench_out]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # medvae and tests.factories of this checkout

from medvae.config import GenerateConfig, parse_model_config  # noqa: E402
from medvae.devices import select_device  # noqa: E402
from medvae.models import build_model  # noqa: E402
from medvae.synthesis.generate import generate  # noqa: E402
from medvae.synthesis.sampling import sample_images  # noqa: E402
from medvae.training.checkpoint import save_checkpoint  # noqa: E402
from medvae.training.rundir import RunDir  # noqa: E402
from tests.factories import patch_store  # noqa: E402


def make_store(path: Path, size: int, n_patients: int, per_patient: int):
    """Smooth random CT-like patches ([0, 1], float16) of several train patients."""
    rng = np.random.default_rng(0)
    n = n_patients * per_patient
    low = rng.random((n, 1, size // 16, size // 16)).astype(np.float32)
    x = torch.nn.functional.interpolate(torch.from_numpy(low), size=size, mode="bilinear").numpy()
    x = np.clip(x + 0.03 * rng.standard_normal(x.shape).astype(np.float32), 0, 1)
    return patch_store(path, x, patient_id=np.repeat([f"P{i:03d}" for i in range(n_patients)], per_patient),
                       slice_index=np.tile(np.arange(per_patient), n_patients), source="bench",
                       normalization={"ct": {"low": -160.0, "high": 240.0, "unit": "HU"}},
                       spacing={"ct": [0.7, 0.7]}, content_hash=f"bench{size}")


def make_run(root: Path, size: int, n_train: int) -> Path:
    store = make_store(root / f"store{size}", size, n_patients=8, per_patient=max(n_train // 8, 2))
    cfg = parse_model_config(dict(name="vae", image_size=size, latent_dim=128))
    torch.manual_seed(0)
    model = build_model(cfg)
    run = RunDir(root / f"run{size}")
    save_checkpoint(run.checkpoint_path("best"),
                    {"model_config": cfg.model_dump(mode="json"), "model_state": model.state_dict(),
                     "store_hash": store.content_hash, "step": 0})
    run.write_info({"store": str(store.path), "store_hash": store.content_hash, "model": "vae", "status": "done",
                    "step": 0})
    return run.path


@torch.inference_mode()
def decode_only(run: Path, n: int, batch: int, device: torch.device) -> float:
    """Reference: samples/s of sample_images in memory (no audit, no files)."""
    from medvae.training.checkpoint import load_model

    model, _ = load_model(RunDir(run).checkpoint("best"), device=device)
    sample_images(model, min(batch, n), seed=1, batch_size=batch)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    sample_images(model, n, seed=0, batch_size=batch)  # returns on the CPU, as generation copies its batches
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small n and store (seconds)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)
    device = select_device(args.device)
    on_gpu = device.type == "cuda"
    plan = {128: (64 if args.quick else 1024, 256 if args.quick else 4000),
            256: (16 if args.quick else 256, 128 if args.quick else 1000)}
    if on_gpu and not args.quick:
        plan = {128: (8192, 20000), 256: (2048, 5000)}
    rows = []
    root = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    try:
        for size, (n, n_train) in plan.items():
            run = make_run(root, size, n_train)
            batch = 256 if on_gpu else 64
            ref = decode_only(run, n, batch, device)
            s = generate(run, root / f"gen{size}", GenerateConfig(n=n, batch_size=batch), device=str(device))
            tm = s["timings_s"]
            work = tm["decode"] + tm["audit"] + tm["write"]
            rows.append({"size": size, "n": n, "train_patches": s["audit"]["train_patches"],
                         "device": str(device), "samples_per_s": round(n / tm["total"], 1),
                         "decode_only_samples_per_s": round(ref, 1),
                         "ratio_vs_decode_only": round(n / tm["total"] / ref, 3),
                         "decode_s": tm["decode"], "audit_s": tm["audit"], "write_s": tm["write"],
                         "total_s": tm["total"], "write_share": round(tm["write"] / work, 3),
                         "decode_share": round(tm["decode"] / work, 3),
                         "audit_share": round(tm["audit"] / work, 3),
                         "files_written": s["counts"]["written_files"]})
    finally:
        shutil.rmtree(root, ignore_errors=True)

    head = f"{'size':>5} {'n':>6} {'train':>6} {'samples/s':>10} {'decode-only/s':>14} {'ratio':>6} " \
           f"{'decode':>8} {'audit':>8} {'write':>8} {'write %':>8}"
    print(f"generate benchmark on {device} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(head)
    for r in rows:
        print(f"{r['size']:>5} {r['n']:>6} {r['train_patches']:>6} {r['samples_per_s']:>10.1f} "
              f"{r['decode_only_samples_per_s']:>14.1f} {r['ratio_vs_decode_only']:>6.2f} "
              f"{r['decode_s']:>7.2f}s "
              f"{r['audit_s']:>7.2f}s {r['write_s']:>7.2f}s {100 * r['write_share']:>7.1f}%")
    goal = all(r["write_share"] <= 0.30 for r in rows)
    print(f"goal (CPU): writing <= 30% of the time: {'met' if goal else 'NOT met'}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generate.json").write_text(json.dumps({"rows": rows, "quick": args.quick, "write_goal_met": goal},
                                                  indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

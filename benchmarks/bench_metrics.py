"""Benchmark of medvae.metrics and `medvae evaluate` on CPU, against references in the same run.

1. SSIM over N pairs of 128² images: ours (batched, float32) vs scikit-image's
   ``structural_similarity`` in a Python loop (the way one uses it). scikit-image is timed on a
   subset and extrapolated to N pairs (it is linear in the number of pairs); the script says so.
2. Unbiased MMD² for N x N feature vectors of dimension 512 (blockwise), with the peak RSS of
   the process before and after (the kernel matrix is never held whole); plus the permutation
   test on the same data.
3. A full `evaluate` of an N-patch test split (10 patients, 128², default ConvVAE and
   EvaluateConfig) on CPU.

Usage: python benchmarks/bench_metrics.py [--quick] [--skip-evaluate]
Prints a table and writes bench_out/bench_metrics.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medvae.metrics import distances as D  # noqa: E402
from medvae.metrics import images as M  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bench_mmd(n: int, dim: int = 512) -> dict:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, dim, generator=g)
    Y = torch.randn(n, dim, generator=g) + 0.05
    rss0 = peak_rss_mb()
    t = time.perf_counter()
    val = D.mmd2(X, Y)
    secs = time.perf_counter() - t
    rss1 = peak_rss_mb()
    t = time.perf_counter()
    _, p = D.mmd_test(X, Y, permutations=200)
    secs_test = time.perf_counter() - t
    return {"n": n, "dim": dim, "mmd2": val, "seconds": secs, "peak_rss_mb_before": rss0,
            "peak_rss_mb_after": rss1, "inputs_mb": 2 * n * dim * 4 / 2**20,
            "full_kernel_matrix_mb": (2 * n) ** 2 * 4 / 2**20,
            "test_seconds_200_permutations": secs_test, "test_p_value": p, "goal_seconds": 30}


def bench_ssim(n: int, n_ref: int) -> dict:
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 128, 128, generator=g)
    y = (x + 0.1 * torch.randn(n, 1, 128, 128, generator=g)).clamp(0, 1)
    M.ssim(x[:64], y[:64])  # warm-up (allocator, window matrices)
    t = time.perf_counter()
    ours = M.ssim(x, y)
    secs = time.perf_counter() - t
    xs, ys = x[:n_ref, 0].double().numpy(), y[:n_ref, 0].double().numpy()
    t = time.perf_counter()
    ref = [structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=1.0) for a, b in zip(xs, ys)]
    ref_secs = (time.perf_counter() - t) * n / n_ref
    return {"pairs": n, "ours_seconds": secs, "skimage_pairs_timed": n_ref, "skimage_seconds_extrapolated": ref_secs,
            "speedup": ref_secs / secs, "max_abs_diff": float(np.abs(ours[:n_ref].numpy() - ref).max()),
            "goal_speedup": 20}


def bench_evaluate(n: int, patients: int = 10, quick: bool = False) -> dict:
    from medvae.config import EvaluateConfig, parse_model_config
    from medvae.evaluation.evaluate import run_evaluation
    from medvae.models import build_model
    from medvae.report.reportdir import ReportDir
    from medvae.training.checkpoint import save_checkpoint
    from medvae.training.rundir import RunDir
    from tests.factories import patch_store

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:128, :128] / 128.0
    cy, cx, r = rng.uniform(0.3, 0.7, (3, n, 1, 1))
    r = 0.1 + 0.2 * r
    imgs = (((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) * 0.6 + 0.2 + 0.02 * rng.standard_normal((n, 128, 128)))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = patch_store(tmp / "store", imgs[:, None].clip(0, 1),
                            patient_id=[f"PANCREAS_{i % patients + 1:04d}" for i in range(n)], split="test",
                            source="bench", content_hash="bench",
                            normalization={"ct": {"low": -160.0, "high": 240.0, "unit": "HU"}})
        cfg = parse_model_config({})  # the default ConvVAE (128², latent 128); timing does not depend on training
        torch.manual_seed(0)
        save_checkpoint(RunDir(tmp / "run").checkpoint_path("best"), {
            "model_config": cfg.model_dump(mode="json"), "model_state": build_model(cfg).state_dict(),
            "store_hash": "bench", "step": 0})
        # --quick: fewer IWAE samples and MMD samples (IWAE costs patients x 8 x k decodes).
        ecfg = EvaluateConfig(iwae_k=8, mmd_samples=200, mmd_permutations=100) if quick else EvaluateConfig()
        t = time.perf_counter()
        run_evaluation(tmp / "run", store, tmp / "report", ecfg, device="cpu")
        secs = time.perf_counter() - t
        html_mb = ReportDir(tmp / "report").html.stat().st_size / 2**20
    return {"patches": n, "patients": patients, "seconds": secs, "patches_per_second": n / secs,
            "config": ecfg.model_dump(), "report_html_mb": html_mb}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test, ~1 min)")
    ap.add_argument("--skip-evaluate", action="store_true")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.quick
    res = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()},
           "quick": q}
    res["mmd"] = bench_mmd(2000 if q else 10_000)
    print(f"mmd done: {res['mmd']['seconds']:.1f} s", flush=True)
    res["ssim"] = bench_ssim(1000 if q else 10_000, 50 if q else 300)
    print(f"ssim done: {res['ssim']['speedup']:.1f}x", flush=True)
    if not args.skip_evaluate:
        res["evaluate"] = bench_evaluate(200 if q else 5000, patients=4 if q else 10, quick=q)

    s, m = res["ssim"], res["mmd"]
    rows = [("SSIM, %d pairs 128² (ours)" % s["pairs"], f"{s['ours_seconds']:.2f} s", ""),
            ("SSIM, scikit-image loop (%d timed, extrapolated)" % s["skimage_pairs_timed"],
             f"{s['skimage_seconds_extrapolated']:.2f} s", f"{s['speedup']:.1f}x faster (goal 20x)"),
            ("MMD², %d x %d x %d" % (m["n"], m["n"], m["dim"]), f"{m['seconds']:.2f} s",
             f"peak RSS {m['peak_rss_mb_after']:.0f} MB (inputs {m['inputs_mb']:.0f} MB; goal < 30 s)"),
            ("MMD² permutation test, 200 permutations", f"{m['test_seconds_200_permutations']:.2f} s", "")]
    if "evaluate" in res:
        e = res["evaluate"]
        rows.append((f"evaluate, {e['patches']}-patch test split (CPU)", f"{e['seconds']:.1f} s",
                     f"{e['patches_per_second']:.1f} patches/s"))
    w = max(len(r[0]) for r in rows)
    print(f"torch threads: {torch.get_num_threads()}")
    for name, val, note in rows:
        print(f"{name:<{w}}  {val:>10}  {note}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_metrics.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

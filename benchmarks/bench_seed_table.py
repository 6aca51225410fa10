"""The seed paper's comparison table on Fashion-MNIST (or MNIST): one pipeline run, then the table.

Runs ``pipelines/fashion_mnist.yaml`` (discover the IDX files -> prepare at 32² -> train VAE,
VAE–GAN and MONAI AutoencoderKL -> evaluate all three on the 10,000 test images with
``--compare`` -> generate) into ``bench_out/seed_table/``, then prints per model the seed paper's
six metrics with 95% confidence intervals (mean ± 1.96·sd/√n over the test images; MMD² with
its permutation p-value instead), the wall time of every stage and the ratio of the total to the
one-hour CPU budget the pipeline is sized for. Writes ``bench_out/bench_seed_table.json``.

``--quick``: 100 steps per model and a light evaluation (IWAE k = 8 on 200 images, 256 MMD
samples): checks the whole path in minutes; its numbers are not the table's.
Run: ``.venv/bin/python benchmarks/bench_seed_table.py [--quick] [--steps N] [--device cuda]``.
Fashion-MNIST: ``apt-get install dataset-fashion-mnist`` (files in /usr/share/datasets/fashion-mnist).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUDGET_S = 3600.0  # what the CPU pipeline is sized for (three models on 2 cores)
ROWS = (("mmd2_pixel", "MMD² (pixels)"), ("mmd2_randconv", "MMD² (random conv)"), ("ssim", "SSIM"),
        ("iwae", "IWAE log p(x) [nats]"), ("mse", "reconstruction MSE"), ("elbo", "ELBO [nats]"),
        ("kl", "KL [nats]"))
# sample metrics on the store's feature network, per prior (N(0, I) and the Gaussian mixture), with the
# real-vs-real floor at the same n
SAMPLE_ROWS = tuple((f"{k}@{prior}", f"{k.upper() if k in ('fid', 'kid') else k} · {label}")
                    for prior, label in (("standard", "N(0, I)"), ("gmm", "mixture"), ("real", "real floor"))
                    for k in ("fid", "kid", "precision", "recall", "density", "coverage"))


def configure(pipeline: str, quick: bool, steps: int | None, device: str | None, out: Path) -> Path:
    """The pipeline YAML with the benchmark's overrides, written into ``out``."""
    from medvae.pipeline import load_pipeline, pipeline_path

    cfg = load_pipeline(pipeline_path(pipeline))
    for stage in cfg.models.values():
        if quick:
            stage.train.max_steps, stage.train.checkpoint_every = 100, 50
            stage.train.disc_start, stage.train.beta_warmup_steps = 30, 30
        if steps:
            stage.train.max_steps = steps
        if stage.model.name == "vaegan":  # a shortened run: the critic joins after a third of the
            t = stage.train             # steps at the latest, so the VAE–GAN is never just the VAE
            t.disc_start = min(t.disc_start, max(1, t.max_steps // 3))
    if quick:
        cfg.evaluate.iwae_k, cfg.evaluate.iwae_max_patches, cfg.evaluate.mmd_samples = 8, 200, 256
        cfg.evaluate.mmd_permutations = 50
    if device:
        cfg.device = device
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def cell(summary: dict, run: str, metric: str) -> str:
    """``mean ± CI95`` of a per-image metric, or ``MMD² (p)`` of a cohort one, for one run."""
    if run == summary["run"]:
        res = {k: summary.get(k) for k in ("per_modality", "cohort", "sample_quality")}
    else:
        res = summary["compare"]["results"][run]
    mod = sorted(res["per_modality"])[0]
    if "@" in metric:
        name, prior = metric.split("@")
        q = (res.get("sample_quality") or {}).get(mod, {}).get(prior)
        if not q or q.get(name) is None:
            return "–"
        return f"{q[name]:.4g} ± {q['kid_sd']:.2g}" if name == "kid" else f"{q[name]:.4g}"
    if metric.startswith("mmd2"):
        c = res["cohort"][mod]
        p = c.get(metric.replace("mmd2", "mmd_p"))
        return f"{c[metric]:.4f} (p={p:.3f})" if c[metric] is not None and p is not None else "–"
    s = res["per_modality"][mod]["metrics"][metric]
    if s["mean"] is None:
        return "–"
    half = 1.96 * (s["sd"] or 0.0) / math.sqrt(max(s["n"], 1))
    return f"{s['mean']:.4g} ± {half:.2g} (n={s['n']})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default="fashion_mnist", help="fashion_mnist | mnist | a YAML path")
    ap.add_argument("--scans", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out")
    ap.add_argument("--quick", action="store_true", help="100 steps per model, light evaluation")
    ap.add_argument("--steps", type=int, default=None, help="training steps per model (overrides the YAML)")
    ap.add_argument("--device", default=None, help="auto | cpu | cuda (default: the YAML's)")
    args = ap.parse_args()
    if not args.scans.is_dir():
        sys.exit(f"{args.scans}: not found; `apt-get install dataset-fashion-mnist` or pass --scans DIR")

    from medvae.pipeline import PipelineDir, run_pipeline
    from medvae.report.reportdir import ReportDir

    name = "seed_table_quick" if args.quick else "seed_table"
    work = args.out / name
    yaml_path = configure(args.pipeline, args.quick, args.steps, args.device, work)
    t0 = time.perf_counter()
    run = PipelineDir(work / "run")
    state = run_pipeline(yaml_path, args.scans, run.path)
    wall = time.perf_counter() - t0
    summary = json.loads(ReportDir(run.report).summary.read_text())
    runs = summary["compare"]["runs"] if "compare" in summary else [summary["run"]]
    stages = {k: v.get("seconds") for k, v in state.items() if isinstance(v, dict) and "seconds" in v}

    import torch

    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "load_average": os.getloadavg()}
    width = max(len(r) for _, r in ROWS + SAMPLE_ROWS) + 2
    n_test = summary["per_modality"][sorted(summary["per_modality"])[0]]["n_patches"]
    print(f"\nseed table: {args.pipeline} test split, {n_test} images; 95% CI = mean ± 1.96 sd/sqrt(n)")
    print("metric".ljust(width) + "".join(r.ljust(34) for r in runs))
    table = {}
    for key, label in ROWS + SAMPLE_ROWS:
        cells = [cell(summary, r, key) for r in runs]
        table[key] = dict(zip(runs, cells))
        print(label.ljust(width) + "".join(c.ljust(34) for c in cells))
    print("\nmarkdown:\n| metric | " + " | ".join(runs) + " |\n|---|" + "---|" * len(runs))
    for key, label in ROWS + SAMPLE_ROWS:
        print(f"| {label} | " + " | ".join(table[key][r] for r in runs) + " |")
    print("\nstage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))
    print(f"wall time {wall:.0f} s (stages already done are skipped); sum of stages {sum(stages.values()):.0f} s "
          f"= {sum(stages.values()) / BUDGET_S:.2f} x the one-hour CPU budget")
    print(f"machine: {machine}")
    result = {"pipeline": args.pipeline, "quick": args.quick, "wall_s": wall, "stages_s": stages, "table": table,
              "budget_s": BUDGET_S, "machine": machine, "report": state["paths"]["report"]}
    (args.out / f"bench_{name}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

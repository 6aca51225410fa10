"""The utility study on real and phantom data: prints its table (metric ± 95% CI per label budget and
arm, paired differences), the verdict sentences and the wall time.

- ``--study fmnist``: the ``utility:`` section of ``pipelines/fashion_mnist.yaml`` (10 and 100 labels
  per class, an unconditional VAE–GAN learned from every train image, neighbours synthesis, a MONAI
  classifier, five arms) on a Fashion-MNIST store, by default the one ``bench_seed_table.py``
  prepared (``bench_out/seed_table/run/store``);
- ``--study demo``: a joint image + mask generator per cell with neighbours synthesis and a MONAI
  BasicUNet on the demo cohort's CT at 25 % of the patients (the store ``make demo`` wrote,
  ``demo_out/run/store``), sized for a 2-core CPU (:data:`DEMO`).

The study resumes: re-running after an interruption continues with the unfinished (fraction, seed, arm).
Run: ``.venv/bin/python benchmarks/bench_utility.py --study fmnist|demo [--store DIR] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO = {  # 128² CT with the phantom pancreas labels; generators as small as the demo's models
    "task": "segment", "model": "vae", "fractions": [0.25], "seeds": 3, "generator_steps": 300,
    "synthesis": "neighbours", "per_image": 3, "downstream_steps": 200, "batch_size": 16, "lr": 2e-3,
    "generator": {"model": {"name": "vae", "latent_dim": 64, "channels": [8, 16, 32, 64], "likelihood": "gaussian"},
                  "train": {"batch_size": 16, "lr": 2e-3, "warmup_steps": 20, "beta_warmup_steps": 150,
                            "checkpoint_every": 100, "log_every": 20}},
}


def budget_label(b: dict) -> str:
    return f"{b['labels_per_class']} per class" if b["labels_per_class"] is not None else f"{b['fraction']:g}"


def table(summary: dict) -> str:
    """Markdown: one row per (metric, budget), one column per arm and paired difference."""
    arms, diffs = summary["arms"], summary["paired_differences"]
    cols = [*arms, *(f"Δ {d}" for d in diffs)]

    def cell(c: dict | None) -> str:
        if not c or c["mean"] is None:
            return "–"
        return f"{c['mean']:.4g}" + (f" ± {c['ci_high'] - c['mean']:.2g}" if c["ci_high"] is not None else "")

    lines = ["| metric | label budget | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for metric in summary["metrics"]:
        for b in summary["budgets"]:
            vals = [cell(arms[a].get(b["key"], {}).get(metric)) for a in arms]
            vals += [cell(diffs[d].get(b["key"], {}).get(metric)) for d in diffs]
            lines.append(f"| {metric} | {budget_label(b)} | " + " | ".join(vals) + " |")
    kept = summary.get("filter", {})
    if kept:
        lines += ["", "| label budget | candidates | kept | flagged by the audit | label fidelity |",
                  "|---|---|---|---|---|"]
        for b in summary["budgets"]:
            k = kept.get(b["key"])
            if k:
                lines.append(f"| {budget_label(b)} | {cell(k['candidates'])} | {cell(k['kept_fraction'])} | "
                             f"{cell(k['flagged'])} | {cell(k['fidelity'])} |")
    return "\n".join(lines)


def verdict_lines(summary: dict) -> list[str]:
    """The study's verdict: per budget, its sentence and the command that trains the best arm."""
    return [line for b in summary["verdict"]["budgets"] for line in (b["sentence"], "  " + b["command"])]


def print_study(summary: dict, title: str, wall: float, out: Path, record: str) -> None:
    """Print the study's table, verdict and wall time; write ``out/record`` with the wall time."""
    print(f"\n{title} ({summary['n_test']} real test patches); mean ± 95% CI half-width over {summary['seeds']} "
          "seeds\n")
    print(table(summary))
    print("\n" + "\n".join(verdict_lines(summary)))
    print(f"\nwall time {wall:.0f} s (finished arms are skipped on a re-run); {os.cpu_count()} CPUs; report: "
          f"{out / 'report.html'}")
    (out / record).write_text(json.dumps({"wall_s": wall, "study": title}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", choices=("fmnist", "demo"), required=True)
    ap.add_argument("--store", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--generator-run", type=Path, default=None,
                    help="fmnist: the unconditional VAE-GAN run of the store (default: the pipeline's models/vaegan)")
    args = ap.parse_args()

    from medvae.config import UtilityConfig
    from medvae.data.store import store_complete
    from medvae.downstream.study import run_utility
    from medvae.pipeline import PipelineDir, load_pipeline, pipeline_path

    if args.study == "fmnist":
        cfg = load_pipeline(pipeline_path("fashion_mnist")).utility
        seed_table = PipelineDir(ROOT / "bench_out" / "seed_table" / "run")
        store = args.store or seed_table.store
        out = args.out or seed_table.utility
        run = args.generator_run or seed_table.model("vaegan")
        cfg = cfg.model_copy(update={"generator_run": str(run)})
    else:
        cfg = UtilityConfig.model_validate(DEMO)
        store = args.store or PipelineDir(ROOT / "demo_out" / "run").store
        out = args.out or ROOT / "bench_out" / "utility_demo"
    if not store_complete(store):
        sys.exit(f"{store}: no patch store; run bench_seed_table.py (fmnist) or `make demo` (demo) first, or --store")
    t0 = time.perf_counter()
    summary = run_utility(store, out, cfg, device=args.device)
    wall = time.perf_counter() - t0
    print_study(summary, f"utility study '{args.study}' on {store}", wall, Path(out), "bench_utility.json")

if __name__ == "__main__":
    main()

"""Benchmark of `medvae evaluate` on an image set, stage by stage (issue #26 item 5; goal: <= 60 s in all).

Builds once (cached under ``--root``) a 32² image-set store of ~2,000 train, 200 val and 1,000 test images with
their classes (Fashion-MNIST from /usr/share/datasets/fashion-mnist when installed: ``apt-get install
dataset-fashion-mnist``; else random discs with a class per radius), trains a small vae for 100 steps, then
runs the evaluation in a fresh process and prints each stage's seconds, the total and its ratio to the goal.

Stages are timed by wrapping the evaluation's functions (so the same wrappers time older code): per-patch
metrics (IWAE apart), IWAE, prior samples, cohort MMD, sample quality (the store's feature network; trained
once and cached in STORE/features/, so a first run includes its training: ``--fresh-features``), the other
splits, figures and the report.

Usage:
    python benchmarks/bench_evaluate.py [--root bench_out/evaluate] [--ref /path/to/other/worktree]

``--ref`` evaluates the same run with the code of another checkout (PYTHONPATH switched) in the same run of
the benchmark, before this one, and prints before -> after.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
GOAL_S = 60.0
SPLITS = {"train": 2000, "val": 200, "test": 1000}
# (stage label, module, attribute): the functions each stage's time is spent in; IWAE runs inside per-patch
# metrics and is subtracted from it, the feature network inside sample quality.
STAGES = (("per-patch metrics", "medvae.evaluation.evaluate", "patch_metrics"),
          ("IWAE", "medvae.metrics.elbo", "iwae_log_likelihood"),
          ("prior samples", "medvae.evaluation.evaluate", "prior_samples"),
          ("cohort MMD", "medvae.evaluation.evaluate", "cohort_metrics"),
          ("sample quality", "medvae.evaluation.evaluate", "sample_quality"),
          ("other splits", "medvae.evaluation.evaluate", "split_stats"),
          ("report", "medvae.evaluation.evaluate", "write_report"))


def _idx(path: Path) -> np.ndarray:
    raw = gzip.open(path).read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _images() -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """``(N, 1, 32, 32)`` float32 in [0, 1], class names per image, class list, source; N = sum(SPLITS)."""
    import torch
    import torch.nn.functional as F

    n = sum(SPLITS.values())
    if (FMNIST / "t10k-images-idx3-ubyte.gz").exists():
        names = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
        train = _idx(FMNIST / "train-images-idx3-ubyte.gz")[: n - SPLITS["test"]]
        test = _idx(FMNIST / "t10k-images-idx3-ubyte.gz")[: SPLITS["test"]]
        ltrain = _idx(FMNIST / "train-labels-idx1-ubyte.gz")[: n - SPLITS["test"]]
        ltest = _idx(FMNIST / "t10k-labels-idx1-ubyte.gz")[: SPLITS["test"]]
        x = torch.from_numpy(np.concatenate([train, test])[:, None].astype(np.float32) / 255)
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1).numpy()
        return x, [names[i] for i in np.concatenate([ltrain, ltest])], names, "fashion-mnist"
    sys.path.insert(0, str(REPO))
    from tests.factories import disc_images

    x = disc_images(n, 32, seed=0)
    area = (x > 0.5).mean((1, 2, 3))
    cls = np.digitize(area, np.quantile(area, [0.25, 0.5, 0.75]))
    names = ["r0", "r1", "r2", "r3"]
    return x, [names[i] for i in cls], names, "discs"


def build(root: Path) -> tuple[Path, Path, str]:
    """The store and the trained run under ``root`` (made once)."""
    store, run = root / "store", root / "run"
    source_file = root / "source.txt"
    if not (store / "store.json").exists():
        sys.path.insert(0, str(REPO))
        from tests.factories import patch_store

        x, classes, names, source = _images()
        n = len(x)
        patch_store(store, x, classes=classes, class_names=names, modality="image", source=source,
                    split=[s for s, k in SPLITS.items() for _ in range(k)],
                    patient_id=[f"img{i:05d}" for i in range(n)], slice_index=[0] * n)
        source_file.write_text(source)
    if not (run / "checkpoints").exists():
        cfg = root / "train.yaml"
        cfg.write_text(  # pipelines/fashion_mnist.yaml's small vae
            "model: {name: vae, latent_dim: 64, channels: [16, 32, 64], res_units: 1, likelihood: bernoulli}\n"
            "train: {batch_size: 64, max_steps: 100, lr: 1.0e-3, warmup_steps: 50, checkpoint_every: 50}\n")
        subprocess.run([sys.executable, "-m", "medvae", "train", str(store), "--out", str(run), "--config",
                        str(cfg), "--device", "cpu"], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return store, run, source_file.read_text().strip()


def worker(store: str, run: str, out: str) -> None:
    """Evaluate in this process (its PYTHONPATH picks the code) and print the stage times as JSON."""
    import importlib

    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    spent: dict[str, float] = {label: 0.0 for label, _, _ in STAGES}
    active: list[str] = []  # the stages running now: a stage inside another (the other splits' per-patch
    #                         metrics) is the outer one's time, except IWAE, which per-patch metrics subtracts

    def timed(label, fn):
        def wrapper(*a, **kw):
            if active and label != "IWAE":
                return fn(*a, **kw)
            active.append(label)
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[label] += time.perf_counter() - t
                active.pop()
        return wrapper

    for label, mod, attr in STAGES:
        m = importlib.import_module(mod)
        if hasattr(m, attr):
            setattr(m, attr, timed(label, getattr(m, attr)))
    from medvae.evaluation.evaluate import run_evaluation

    t = time.perf_counter()
    summary = run_evaluation(run, store, out, device="cpu")
    total = time.perf_counter() - t
    spent["per-patch metrics"] -= spent["IWAE"]  # the first split's IWAE runs inside its per-patch metrics
    spent["figures + rest"] = total - sum(spent.values())
    print("BENCH " + json.dumps({"total": total, "stages": spent, "timings": summary.get("timings")}))


def evaluate(code: Path, store: Path, run: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    res = subprocess.run([sys.executable, __file__, "--worker", str(store), str(run), str(out)], env=env,
                         check=True, capture_output=True, text=True)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("BENCH ")][-1]
    return json.loads(line[6:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=REPO / "bench_out" / "evaluate")
    ap.add_argument("--ref", type=Path, help="another checkout to time first (before -> after)")
    ap.add_argument("--fresh-features", action="store_true", help="drop the cached feature network first")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    store, run, source = build(args.root)
    if args.fresh_features:
        shutil.rmtree(store / "features", ignore_errors=True)
    elif not (store / "features").exists():  # train the feature network once, outside the timed runs
        subprocess.run([sys.executable, "-c", "import sys; from medvae.config import EvaluateConfig; "
                        "from medvae.data.store import open_store; from medvae.evaluation.features import feature_net; "
                        "feature_net(open_store(sys.argv[1]), EvaluateConfig().feature_steps)", str(store)],
                       check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    load = os.getloadavg()[0]
    runs = {}
    if args.ref:
        runs["before"] = evaluate(args.ref, store, run, args.root / "report-ref")
    runs["after"] = evaluate(REPO, store, run, args.root / "report")
    print(f"`medvae evaluate` on {SPLITS['test']} 32² test images ({source}; store of {sum(SPLITS.values())}), "
          f"{os.cpu_count()} cores, load average {load:.2f} at the start")
    labels = list(runs["after"]["stages"])
    print(f"{'stage':<20}" + "".join(f"{k:>10}" for k in runs))
    for label in labels + ["total"]:
        vals = [r["total"] if label == "total" else r["stages"].get(label, 0.0) for r in runs.values()]
        print(f"{label:<20}" + "".join(f"{v:>9.2f}s" for v in vals))
    for k, r in runs.items():
        print(f"{k}: {r['total']:.1f} s = {r['total'] / GOAL_S:.2f}x the {GOAL_S:.0f} s goal")
    if "before" in runs:
        print(f"speed-up: {runs['before']['total'] / runs['after']['total']:.2f}x")
        for name in ("metrics.csv",):
            a = (args.root / "report-ref" / name).read_bytes()
            b = (args.root / "report" / name).read_bytes()
            print(f"{name} identical to before: {a == b}")


if __name__ == "__main__":
    main()

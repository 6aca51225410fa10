"""Few labels, many images: the utility study's semi-supervised arms side by side with the supervised and
synthetic ones, on real data and the phantom cohort (issue #27). Prints the study's table, the verdict and
the wall time; re-running resumes (finished arms are skipped).

- ``--study fmnist``: Fashion-MNIST (the Debian package ``dataset-fashion-mnist``; a 32² store made with
  ``medvae discover /usr/share/datasets/fashion-mnist`` + ``medvae prepare --patch-size 32 --mode pad``),
  10 labels per class (``--budgets 10,100`` for both), 3 seeds, scored on the 10,000 test images.
- ``--study digits``: scikit-learn's ``load_digits`` (1,797 real 8×8 handwritten digits, stratified 60 / 10 /
  30 % train / val / test by seed 0), written as a MedMNIST-style npz and prepared at 32² (``--mode resize``)
  into ``--work`` (the store is made once).
- ``--study pancreas``: segmentation of the phantom pancreas on the demo cohort's CT (the store ``make demo``
  writes, or ``--store``), 25 % of the patients, 3 seeds.

Every arm trains the same MONAI network for the same steps on the same real batches (``medvae.downstream``);
the semi-supervised arms also learn from the unlabelled train images (every train image without its label).
Run: ``.venv/bin/python benchmarks/bench_semisupervised.py --study fmnist --store DIR [--out DIR]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLASSIFY_ARMS = ["real", "real+classical", "pseudo", "fixmatch", "latent", "m2", "real+synthetic",
                 "pseudo+synthetic", "fixmatch+synthetic"]
# pipelines/fashion_mnist.yaml's small model and downstream budget; the generator learns from every train image
SMALL_VAE = {"model": {"name": "vae", "latent_dim": 64, "channels": [16, 32, 64], "res_units": 1,
                       "likelihood": "bernoulli"},
             "train": {"batch_size": 64, "lr": 1e-3, "warmup_steps": 50, "beta_warmup_steps": 300,
                       "checkpoint_every": 250, "log_every": 50, "val_batches": 4}}
STUDIES = {
    "fmnist": {"task": "classify", "labels_per_class": [10], "seeds": 3, "arms": CLASSIFY_ARMS,
               "generator_steps": 1500, "generator": SMALL_VAE, "synthesis": "neighbours", "per_image": 10,
               "downstream_steps": 600, "batch_size": 64},
    "digits": {"task": "classify", "labels_per_class": [10], "seeds": 3, "arms": CLASSIFY_ARMS,
               "generator_steps": 1000, "generator": SMALL_VAE, "synthesis": "neighbours", "per_image": 10,
               "downstream_steps": 600, "batch_size": 64},
    "pancreas": {"task": "segment", "model": "vae", "fractions": [0.25], "seeds": 3,
                 "arms": ["real", "real+classical", "pseudo", "fixmatch", "real+synthetic", "pseudo+synthetic"],
                 "generator_steps": 300, "synthesis": "neighbours", "per_image": 3, "downstream_steps": 200,
                 "batch_size": 16, "lr": 2e-3,
                 "generator": {"model": {"name": "vae", "latent_dim": 64, "channels": [8, 16, 32, 64],
                                         "likelihood": "gaussian"},
                               "train": {"batch_size": 16, "lr": 2e-3, "warmup_steps": 20, "beta_warmup_steps": 150,
                                         "checkpoint_every": 100, "log_every": 20}}},
}


def digits_store(work: Path) -> Path:
    """scikit-learn's digits as a prepared 32² store under ``work`` (made once)."""
    import numpy as np
    from sklearn.datasets import load_digits

    from medvae.data.store import store_complete

    store = work / "digits_store"
    if store_complete(store):
        return store
    d = load_digits()
    x, y = (d.images / 16 * 255).round().astype(np.uint8), d.target.astype(np.int64)
    rng, split = np.random.default_rng(0), np.empty(len(y), dtype=object)
    for c in range(10):  # stratified 60 / 10 / 30 %
        idx = rng.permutation(np.flatnonzero(y == c))
        a, b = round(0.6 * len(idx)), round(0.7 * len(idx))
        split[idx[:a]], split[idx[a:b]], split[idx[b:]] = "train", "val", "test"
    (work / "digits_npz").mkdir(parents=True, exist_ok=True)
    np.savez(work / "digits_npz" / "digits.npz", **{f"{s}_images": x[split == s] for s in ("train", "val", "test")},
             **{f"{s}_labels": y[split == s][:, None] for s in ("train", "val", "test")})
    medvae = [sys.executable, "-m", "medvae"]
    subprocess.run([*medvae, "discover", str(work / "digits_npz"), "--out", str(work / "digits.csv")], check=True)
    subprocess.run([*medvae, "prepare", str(work / "digits.csv"), "--out", str(store), "--patch-size", "32",
                    "--mode", "resize", "--workers", "1"], check=True)
    return store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", choices=sorted(STUDIES), required=True)
    ap.add_argument("--store", type=Path, default=None, help="fmnist / pancreas: the prepared store")
    ap.add_argument("--work", type=Path, default=ROOT / "bench_out" / "semisupervised")
    ap.add_argument("--out", type=Path, default=None, help="study directory (default WORK/<study>)")
    ap.add_argument("--budgets", default=None, help="labels per class, e.g. 10,100 (classification)")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--arms", default=None, help="comma-separated arms (default: the study's); a study grows by arms")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    from medvae.config import UtilityConfig
    from medvae.data.store import store_complete
    from medvae.downstream.study import run_utility
    from medvae.pipeline import PipelineDir

    spec = dict(STUDIES[args.study])
    if args.budgets:
        spec["labels_per_class"] = [int(b) for b in args.budgets.split(",")]
    if args.seeds:
        spec["seeds"] = args.seeds
    if args.arms:
        spec["arms"] = args.arms.split(",")
    if args.study == "digits":
        store = args.store or digits_store(args.work)
    elif args.study == "pancreas":
        store = args.store or PipelineDir(ROOT / "demo_out" / "run").store
    else:
        store = args.store
    if store is None or not store_complete(store):
        sys.exit(f"{store}: no patch store; give --store (see this file's docstring)")
    out = args.out or args.work / args.study
    t0 = time.perf_counter()
    summary = run_utility(store, out, UtilityConfig.model_validate(spec), device=args.device,
                          progress=lambda done, total, what: print(f"[{time.perf_counter() - t0:7.0f} s] "
                                                                  f"{done}/{total} {what}", flush=True))
    wall = time.perf_counter() - t0
    from benchmarks.bench_utility import print_study

    print_study(summary, args.study, wall, Path(out), "bench_semisupervised.json")

if __name__ == "__main__":
    main()

"""Denoising: medvae (dae) against the noisy input and the classical denoisers, and the speed goal.

Three datasets, each trained and evaluated in the same run on this machine (CPU unless a GPU is
present):

- ``phantom-microscopy``: the phantom cohort's fluorescence stacks, 128² tiles, Poisson–Gaussian
  noise in the stacks' counts;
- ``phantom-ct``: the phantom cohort's CT, whole slices resized to 128², low-dose CT noise;
- ``pydicom-ct`` (only with ``--only pydicom-ct``): real CT slices that pydicom and pydicom-data ship (a CQ500
  head slice and ``CT_small`` for training, a Pancreas-CT slice for validation, another patient's head slice
  for test), native resolution in 128² tiles, low-dose CT noise (``bench_ct_denoise.py`` compares the CT
  objectives on them);
- ``skimage-cell``: scikit-image's bundled ``data.cell()`` microscopy image as the clean
  reference (the only bundled microscopy image that needs no download), 128² tiles from disjoint
  regions for train / val / test, Gaussian noise.

Each row: PSNR / SSIM per method and noise level (``medvae evaluate``'s denoise tables), medvae −
best classical in dB (goal ≥ +1 dB), and seconds per 512² slice per method (goal: medvae ≤ NLM).
Writes bench_out/bench_denoise.json and the reports under bench_out/denoise/. Run:
``.venv/bin/python benchmarks/bench_denoise.py [--steps N] [--quick]``.
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

from medvae.config import EvaluateConfig, PrepareConfig, TrainStageConfig  # noqa: E402
from medvae.data.discover import discover  # noqa: E402
from medvae.data.manifest import write_manifest  # noqa: E402
from medvae.data.prepare import prepare  # noqa: E402
from medvae.evaluation.evaluate import run_evaluation  # noqa: E402
from medvae.pipeline import train_stage  # noqa: E402
from tests.factories import patch_store, phantom_cohort  # noqa: E402

OUT = Path("bench_out/denoise")


def cell_store(path: Path):
    """skimage.data.cell() tiled: x < 360 train, 360..440 val, x >= 440 test (disjoint regions)."""
    from skimage.data import cell

    img = cell().astype(np.float32)
    h, w = img.shape
    tiles, where = [], {"split": [], "y": [], "x": []}
    regions = {"train": (0, 360, 16), "val": (330, 460, 64), "test": (420, w, 32)}
    for split, (x0, x1, stride) in regions.items():
        for y in range(0, h - 128 + 1, stride):
            for x in range(x0, x1 - 128 + 1, stride):
                tiles.append(img[y:y + 128, x:x + 128] / 255.0)
                for k, v in (("split", split), ("y", y), ("x", x)):
                    where[k].append(v)
    return patch_store(path, np.stack(tiles)[:, None], patient_id=[f"cell-{s}" for s in where["split"]],
                       modality="microscopy", slice_index=0, source="skimage.data.cell", **where,
                       content_hash="skimage-cell-v1",
                       normalization={"microscopy": {"low": 0.0, "high": 255.0, "unit": "counts"}},
                       spacing={"microscopy": [1.0, 1.0]})


def phantom_stores(root: Path, only=None) -> dict[str, Path]:
    scans = root / "scans"
    phantom_cohort(scans, ct_patients=6, microscopy_stacks=6, seed=0, ct_size=256, ct_slices=None)  # cached
    stores = {}
    for name, modality, cfg in (("phantom-microscopy", "microscopy", PrepareConfig(mode="tile", stride=64)),
                                ("phantom-ct", "ct", PrepareConfig(mode="resize", slice_step=2))):
        if only and name not in only:
            continue
        manifest = root / f"{name}.csv"
        write_manifest(discover(scans, modality=modality), manifest)
        stores[name] = prepare(manifest, root / name, cfg).path
    return stores


# paths in site-packages. Not CT_small for validation: its one 128² tile (a whole small head) chose a 100-step
# checkpoint 3.5 dB worse on the test slice than the 1,000-step one (its val PSNR fell below the noisy input's)
PYDICOM_CT = {"train": ["data_store/data/693_UNCI.dcm", "pydicom/data/test_files/CT_small.dcm"],
              "val": ["data_store/data/explicit_VR-UN.dcm"],
              "test": ["pydicom/data/test_files/J2K_pixelrep_mismatch.dcm"]}


def pydicom_ct_store(root: Path) -> Path:
    """The real CT slices of PYDICOM_CT, one folder per file, through discover and prepare (128² tiles)."""
    import shutil
    import site

    base = next(Path(p) for p in site.getsitepackages() if (Path(p) / "data_store").is_dir())
    scans, split_of = root / "scans-pydicom-ct", {}
    for split, files in PYDICOM_CT.items():
        for f in files:
            folder = scans / Path(f).stem
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy2(base / f, folder / Path(f).name)  # its mtime too: prepare's digest, the store stays
            split_of[folder.name] = split
    rows = discover(scans, modality="ct")
    for r in rows:
        r.split = split_of[Path(r.path).name]  # a DICOM row's path is its series folder
    manifest = root / "pydicom-ct.csv"
    write_manifest(rows, manifest)
    return prepare(manifest, root / "pydicom-ct", PrepareConfig(mode="tile", patch_size=128, stride=32)).path


def model_cfg(kind: str, steps: int) -> TrainStageConfig:
    return TrainStageConfig.model_validate({
        "task": "denoise", "noise": {"kind": kind, "crop": 64},
        "model": {"name": "dae", "channels": [16, 32, 64], "res_units": 1, "likelihood": "l2",
                  "fixed_scale": 0.1},
        "train": {"batch_size": 16, "max_steps": steps, "lr": 1e-3, "warmup_steps": 50, "checkpoint_every": 100,
                  "log_every": 25, "val_batches": 4, "betas": [0.9, 0.99], "amp": "off"},
    })


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--quick", action="store_true", help="20 steps, 16 patches: checks the script only")
    ap.add_argument("--only", nargs="*", default=None, help="datasets to run (default: all three)")
    ap.add_argument("--out", type=Path, default=OUT, help="working directory (stores, runs, reports)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fair against single-threaded NLM)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps, n_eval = (20, 16) if args.quick else (args.steps, 48)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    stores = phantom_stores(out, args.only) if not args.only or set(args.only) - {"skimage-cell", "pydicom-ct"} else {}
    if not args.only or "skimage-cell" in args.only:
        stores["skimage-cell"] = cell_store(out / "skimage-cell").path
    if args.only and "pydicom-ct" in args.only:
        stores["pydicom-ct"] = pydicom_ct_store(out)
    kinds = {"phantom-microscopy": "poisson-gaussian", "phantom-ct": "ct-lowdose", "skimage-cell": "gaussian",
             "pydicom-ct": "ct-lowdose"}
    results = {}
    for name, store in stores.items():
        if args.only and name not in args.only:
            continue
        run = out / "runs" / name
        t0 = time.perf_counter()
        summary = train_stage(store, run, model_cfg(kinds[name], steps), device="auto", resume=True)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        rep = run_evaluation(run, store, out / "reports" / name, EvaluateConfig(split="test", denoise_patches=n_eval))
        results[name] = {"noise": kinds[name], "train_steps": summary["step"], "train_seconds": round(train_s, 1),
                         "eval_seconds": round(time.perf_counter() - t0, 1), "levels": rep["levels"],
                         "per_modality": rep["per_modality"], "gap_db": rep["medvae_minus_best_classical_psnr"],
                         "seconds_per_512_slice": rep["seconds_per_512_slice"]}
        print(f"\n== {name} ({kinds[name]}), {summary['step']} steps in {train_s:.0f} s")
        for mod, by_level in rep["per_modality"].items():
            for level, by_method in by_level.items():
                cells = "  ".join(f"{m} {v['psnr']['mean']:.2f}/{v['ssim']['mean']:.3f}" for m, v in by_method.items())
                print(f"  {mod} {rep['level_name']}={float(level):.4g}: {cells}  gap "
                      f"{rep['medvae_minus_best_classical_psnr'][mod][level]:+.2f} dB")
        print("  s/512² slice: " + ", ".join(f"{m} {s:.3f}" for m, s in rep["seconds_per_512_slice"].items()))
    machine = {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads(),
               "cuda": torch.cuda.is_available()}
    path = out / ("bench_denoise_quick.json" if args.quick else "bench_denoise.json")
    path.write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

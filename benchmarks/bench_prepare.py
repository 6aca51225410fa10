"""Throughput of `medvae prepare` against bare decoding, its start-up, and the patch loader.

On a phantom cohort of 512x512 DICOM series (default 3 patients x 150 slices, cached in
bench_out/), measures in the same run:

- bare read (the reference: decoding is the floor for any ingestion): ``pydicom.dcmread(f).pixel_array``
  over every file of the series, plus ``np.asarray(nibabel.load(label).dataobj)`` of the label NIfTIs;
- medvae's DICOM reader alone (``read_dicom_series``: headers, geometry, decode, HU rescale) and
  the label NIfTIs it carries: each as a ratio to its bare read;
- ``prepare`` (resize mode, 128², labels carried) with --workers 1 and 2: slices/s, the ratio
  prepare time / bare read time (goal <= 2.0 with 1 worker), the speed-up of 2 workers over 1
  (goal >= 1.7), and what --workers 1 spends beyond the two readers (normalization, resize, patch
  selection, store writing: medvae.data);
- start-up (``--startup``, in fresh processes, median of 5): ``medvae prepare --help`` and
  ``medvae prepare`` of one small series (20 slices of 256²), whole-process wall seconds (goal <= 1.5);
- loader: ``PatchBatches`` random batches of 256 patches of 128² (float16 memmap -> float32
  tensors) from a tile-mode store of the same cohort, against the same gathers from an in-memory
  numpy array (the reference); goal >= 20,000 patches/s.

Prints a table and writes bench_out/bench_prepare.json. ``--quick``: 2 patients x 40 slices.
Run: ``.venv/bin/python benchmarks/bench_prepare.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cohort(out: Path, patients: int, slices: int) -> dict:
    from tests.factories import phantom_cohort

    t = time.perf_counter()
    s = phantom_cohort(out / f"phantom_{patients}x{slices}", ct_patients=patients, microscopy_stacks=0, seed=0,
                       ct_size=512, ct_slices=slices)  # written once, then reused
    print(f"phantom cohort ready in {time.perf_counter() - t:.1f} s")
    return s


def dicom_files(series: list[str]) -> list[Path]:
    return [f for s in series for f in sorted(Path(s).iterdir()) if f.suffix == ".dcm"]


def bare_read(files: list[Path]) -> float:
    import pydicom

    t = time.perf_counter()
    for f in files:
        pydicom.dcmread(f).pixel_array  # noqa: B018 -- decoding is the point
    return time.perf_counter() - t


def bare_labels(labels: list[str]) -> float:
    """``nibabel.load(p).dataobj`` as stored (gzip inflate + decode), the floor for reading a label map."""
    import nibabel as nib

    t = time.perf_counter()
    for p in labels:
        np.asarray(nib.load(p).dataobj)
    return time.perf_counter() - t


def startup(out: Path, repeats: int = 5) -> dict:
    """Median whole-process wall seconds of `medvae prepare --help` and of a prepare of one small series."""
    import statistics
    import subprocess

    from medvae.data.manifest import ManifestRow, write_manifest
    from medvae.io.phantoms import write_phantom_cohort

    d = out / "startup_series"
    if not (d / "manifest.csv").is_file():
        s = write_phantom_cohort(d, ct_patients=1, microscopy_stacks=0, seed=0, ct_size=256, ct_slices=20)
        write_manifest([ManifestRow(c["patient_id"], "ct", "dicom", c["series"], c["label"], split="train")
                        for c in s["ct"]], d / "manifest.csv")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmds = {"prepare --help": ["prepare", "--help"],
            "prepare of one series (20 x 256², 64², labels)": ["prepare", str(d / "manifest.csv"), "--out",
                                                               str(d / "store"), "--patch-size", "64"]}
    res = {}
    for name, argv in cmds.items():
        walls = []
        for _ in range(repeats + 1):  # the first run warms the page cache
            shutil.rmtree(d / "store", ignore_errors=True)
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "medvae", *argv], env=env, check=True, capture_output=True)
            walls.append(time.perf_counter() - t)
        res[name] = statistics.median(walls[1:])
    return res


def reader_read(series: list[str], labels: list[str]) -> tuple[float, float]:
    """medvae's own readers alone, as prepare calls them: (DICOM series via read_dicom_series, label NIfTIs via
    read_nifti in their stored dtype: medvae.data.normalize's label read, not the float32 Volume of load_volume)."""
    from medvae.io import load_volume
    from medvae.io.nifti import read_nifti

    t = time.perf_counter()
    for s in series:
        load_volume(s)
    t_img = time.perf_counter() - t
    t = time.perf_counter()
    for lab in labels:
        read_nifti(lab, keep_dtype=True)
    return t_img, time.perf_counter() - t


def time_prepare(manifest: Path, out: Path, workers: int, mode: str = "resize") -> tuple[float, object]:
    from medvae.config import PrepareConfig
    from medvae.data.prepare import prepare

    shutil.rmtree(out, ignore_errors=True)
    cfg = PrepareConfig(patch_size=128, mode=mode, workers=workers)
    t = time.perf_counter()
    store = prepare(manifest, out, cfg)
    return time.perf_counter() - t, store


def loader_rate(store, batch: int, min_seconds: float) -> tuple[float, float, int]:
    """(PatchBatches patches/s, in-memory reference patches/s, patches read)."""
    import torch

    from medvae.data.loader import PatchBatches

    pb = PatchBatches(store, None, batch, seed=0)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < min_seconds:
        for x in pb:
            n += x.x.shape[0]
    ours = n / (time.perf_counter() - t)
    mem = np.asarray(store.patches)  # reference: the whole store in RAM, same gathers
    rng = np.random.default_rng(0)
    m, t = 0, time.perf_counter()
    while time.perf_counter() - t < min_seconds:
        for rows in np.array_split(rng.permutation(len(mem)), max(1, len(mem) // batch)):
            torch.from_numpy(mem[rows]).float()
            m += len(rows)
    return ours, m / (time.perf_counter() - t), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 patients x 40 slices")
    ap.add_argument("--patients", type=int, default=3)
    ap.add_argument("--slices", type=int, default=150)
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each; the best is reported")
    ap.add_argument("--startup", action="store_true", help="only the start-up rows (fresh processes)")
    args = ap.parse_args()
    if args.startup:
        args.out.mkdir(parents=True, exist_ok=True)
        res = startup(args.out)
        for name, sec in res.items():
            print(f"{name:<52} {sec:6.2f} s   goal <= 1.5 s")
        (args.out / "bench_prepare_startup.json").write_text(json.dumps(res, indent=2))
        return
    if args.quick:
        args.patients, args.slices, args.repeats = 2, 40, 1
    args.out.mkdir(parents=True, exist_ok=True)

    from medvae.data.manifest import ManifestRow, write_manifest

    s = cohort(args.out, args.patients, args.slices)
    series = [c["series"] for c in s["ct"]]
    rows = [ManifestRow(c["patient_id"], "ct", "dicom", c["series"], c["label"], split="train") for c in s["ct"]]
    manifest = write_manifest(rows, args.out / f"bench_manifest_{args.patients}x{args.slices}.csv")
    files = dicom_files(series)
    n_slices = len(files)
    for f in files:  # warm the page cache so both sides decode from memory
        f.read_bytes()

    results = {"machine": platform.node(), "cpus": os.cpu_count(), "patients": args.patients,
               "slices": n_slices, "matrix": 512, "load_average_before": os.getloadavg()}
    labels = [c["label"] for c in s["ct"]]
    bare_dcm = min(bare_read(files) for _ in range(args.repeats))
    bare_lab = min(bare_labels(labels) for _ in range(args.repeats))
    bare = bare_dcm + bare_lab
    results.update(bare_dicom_s=bare_dcm, bare_labels_s=bare_lab, bare_read_s=bare)
    results["bare_read_slices_per_s"] = n_slices / bare
    reads = [reader_read(series, labels) for _ in range(args.repeats)]
    results["medvae_read_dicom_series_s"] = min(r[0] for r in reads)
    results["medvae_read_labels_s"] = min(r[1] for r in reads)
    for w in (1, 2):  # imports, reader construction, the worker processes' start (reported apart)
        results[f"prepare_w{w}_cold_s"] = time_prepare(manifest, args.out / "bench_store_warmup", w)[0]
    for workers in (1, 2):
        dt = min(time_prepare(manifest, args.out / f"bench_store_w{workers}", workers)[0]
                 for _ in range(args.repeats))
        results[f"prepare_w{workers}_s"] = dt
        results[f"prepare_w{workers}_slices_per_s"] = n_slices / dt
        results[f"prepare_w{workers}_ratio_to_bare"] = dt / bare
    results["prepare_w2_speedup_over_w1"] = results["prepare_w1_s"] / results["prepare_w2_s"]
    dt_tile, tile_store = time_prepare(manifest, args.out / "bench_store_tile", 2, mode="tile")
    results["tile_store_patches"] = len(tile_store)
    ours, ref, n = loader_rate(tile_store, 256, 1.0 if args.quick else 3.0)
    results.update(loader_patches_per_s=ours, loader_reference_in_memory_patches_per_s=ref,
                   loader_ratio_to_in_memory=ours / ref, loader_goal_patches_per_s=20000)
    shutil.rmtree(args.out / "bench_store_warmup", ignore_errors=True)
    results["load_average_after"] = os.getloadavg()

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"prepare / loader throughput ({args.patients} x {args.slices} slices of 512², "
                    f"{os.cpu_count()} CPUs)")
    for col in ("what", "time s", "rate", "ratio", "goal"):
        t.add_column(col)
    t.add_row("bare pydicom dcmread().pixel_array", f"{bare_dcm:.2f}", f"{n_slices / bare_dcm:.0f} slices/s", "", "")
    t.add_row("bare nibabel dataobj of the labels", f"{bare_lab:.2f}", "", "", "")
    t.add_row("bare read: the two together (reference)", f"{bare:.2f}", f"{n_slices / bare:.0f} slices/s", "1.00", "")
    for key, what, floor in (("medvae_read_dicom_series_s", "medvae read_dicom_series alone (in prepare)", bare_dcm),
                             ("medvae_read_labels_s", "label NIfTIs via read_nifti (in prepare)", bare_lab)):
        t.add_row(what, f"{results[key]:.2f}", f"{n_slices / results[key]:.0f} slices/s",
                  f"{results[key] / floor:.2f} of its bare read", "")
    for w in (1, 2):
        t.add_row(f"medvae prepare --workers {w} (resize 128)", f"{results[f'prepare_w{w}_s']:.2f}",
                  f"{results[f'prepare_w{w}_slices_per_s']:.0f} slices/s",
                  f"{results[f'prepare_w{w}_ratio_to_bare']:.2f}", "<= 2.0" if w == 1 else "")
    t.add_row("  --workers 2 speed-up over --workers 1", "", "", f"{results['prepare_w2_speedup_over_w1']:.2f}x",
              ">= 1.7x")
    rest = results["prepare_w1_s"] - results["medvae_read_dicom_series_s"] - results["medvae_read_labels_s"]
    results["prepare_w1_beyond_readers_s"] = rest
    t.add_row("  of which beyond the readers (w1: transforms, resize, store)", f"{rest:.2f}", "",
              f"{rest / bare:.2f}", "")
    t.add_row("in-memory numpy gather (reference)", "", f"{ref:,.0f} patches/s", "1.00", "")
    t.add_row(f"PatchBatches 256 x 128² ({len(tile_store)} patch store)", "", f"{ours:,.0f} patches/s",
              f"{ours / ref:.2f}", ">= 20,000/s")
    Console(width=150).print(t)
    print(f"load average before/after: {results['load_average_before']} / {results['load_average_after']}")
    out = args.out / ("bench_prepare_quick.json" if args.quick else "bench_prepare.json")
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

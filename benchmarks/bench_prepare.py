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
  selection, store writing: medvae.data). Wall times only hold on a quiet machine, so the same
  run also gives the 1-worker ratio in CPU seconds of the process, and the 2-worker speed-up its
  work items would have on two idle cores (each item's CPU seconds, list-scheduled as the pool
  queues them: an estimate, without the processes' start and pickling);
- start-up (``--startup``, in fresh processes, median of 5): ``medvae prepare --help`` and
  ``medvae prepare`` of one small series (20 slices of 256²), whole-process wall seconds and CPU
  seconds (user + system; goal: <= 1.0 s beyond decoding the series, about 0.01 s);
- loader: ``PatchBatches`` random batches of 256 patches of 128² (float16 memmap -> float32
  tensors) from a tile-mode store of the same cohort, against the same gathers from an in-memory
  numpy array (the reference); goal >= 20,000 patches/s.

``--baseline DIR``: a checkout of another revision (a folder holding its ``medvae`` package, e.g.
``git archive REV medvae | tar -x -C DIR``) timed in the same run: the readers, prepare and the
start-up of each tree run in fresh processes, alternately, in every round (``--rounds``), and the
best of each is reported, so both trees meet the same load.

Prints a table and writes bench_out/bench_prepare.json. ``--quick``: 2 patients x 40 slices.
Run: ``.venv/bin/python benchmarks/bench_prepare.py [--quick] [--baseline DIR]``.
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
# the medvae package timed: this tree, or --baseline's in the processes that time it (run_tree)
TREE = Path(os.environ.get("MEDVAE_BENCH_TREE", ROOT))
sys.path[:0] = [str(TREE), str(ROOT)]  # ROOT: tests.factories (the cohort), in the parent only


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


def startup(out: Path, repeats: int = 5, tree: Path = ROOT) -> dict:
    """Median whole-process wall seconds of `medvae prepare --help` and of a prepare of one small series,
    with the ``medvae`` package of ``tree``."""
    import statistics
    import subprocess

    from medvae.data.manifest import ManifestRow, write_manifest
    from medvae.io.phantoms import write_phantom_cohort

    d = out / "startup_series"
    if not (d / "manifest.csv").is_file():
        s = write_phantom_cohort(d, ct_patients=1, microscopy_stacks=0, seed=0, ct_size=256, ct_slices=20)
        write_manifest([ManifestRow(c["patient_id"], "ct", "dicom", c["series"], c["label"], split="train")
                        for c in s["ct"]], d / "manifest.csv")
    env = {**os.environ, "PYTHONPATH": str(tree)}  # and cwd=tree: `-m` puts the working directory first
    cmds = {"prepare --help": ["prepare", "--help"],
            "prepare of one series (20 x 256², 64², labels)": ["prepare", str(d / "manifest.csv"), "--out",
                                                               str(d / "store"), "--patch-size", "64"]}
    import resource

    res = {}
    for name, argv in cmds.items():
        walls, cpus = [], []
        for _ in range(repeats + 1):  # the first run warms the page cache
            shutil.rmtree(d / "store", ignore_errors=True)
            t, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run([sys.executable, "-m", "medvae", *argv], env=env, check=True, capture_output=True,
                           cwd=tree)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            walls.append(time.perf_counter() - t)
            cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        res[name] = statistics.median(walls[1:])
        res[f"{name}, CPU s"] = statistics.median(cpus[1:])  # user + system: what a loaded machine inflates least
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


def tree_times(manifest: Path, series: list[str], labels: list[str], out: Path, repeats: int) -> dict:
    """In this process (the tree on sys.path): the readers, then prepare with 1 and 2 workers after a cold run
    of each (imports, the worker processes' start), best of ``repeats``; the 1-worker runs also in CPU seconds
    of this process, and the 2-worker wall time their items would take on two idle cores (:func:`item_schedule`)."""
    res = {}
    reads = [reader_read(series, labels) for _ in range(repeats)]
    res["read_dicom_series_s"], res["read_labels_s"] = min(r[0] for r in reads), min(r[1] for r in reads)
    for w in (1, 2):
        res[f"prepare_w{w}_cold_s"] = time_prepare(manifest, out / "bench_store_warmup", w)[0]
        res[f"prepare_w{w}_s"] = min(time_prepare(manifest, out / f"bench_store_w{w}", w)[0] for _ in range(repeats))
    shutil.rmtree(out / "bench_store_warmup", ignore_errors=True)
    runs = [item_schedule(manifest, out / "bench_store_items") for _ in range(repeats)]
    best = min(runs, key=lambda r: r["prepare_w1_cpu_s"])
    res.update(best)
    res["bare_cpu_s"] = min(bare_cpu(series, labels) for _ in range(repeats))
    return res


def bare_cpu(series: list[str], labels: list[str]) -> float:
    """CPU seconds of this process for the bare read (as :func:`bare_read` + :func:`bare_labels`)."""
    c = time.process_time()
    bare_read(dicom_files(series))
    bare_labels(labels)
    return time.process_time() - c


def item_schedule(manifest: Path, out: Path, workers: int = 2) -> dict:
    """A 1-worker prepare timed item by item (CPU seconds of this process), and the wall time its items would
    take on ``workers`` idle cores: a list schedule in submission order, a series' slice items queued when its
    first item ends, plus the parent's own CPU seconds (hashing, assembling the store). An estimate that a
    loaded machine cannot measure: it leaves out the processes' start and the pickling between them."""
    import heapq

    import medvae.data.prepare as prep

    items: list[tuple[str, int, float, object]] = []  # (kind, volume, cpu s, result)
    originals = {name: getattr(prep, name) for name in ("start_volume", "prepare_chunk", "process_volume")
                 if hasattr(prep, name)}

    def timed(name, fn):
        def run(*args, **kwargs):
            c = time.process_time()
            result = fn(*args, **kwargs)
            vol = args[0].position if name == "prepare_chunk" else args[0]
            items.append((name, vol, time.process_time() - c, result))
            return result
        return run

    for name, fn in originals.items():
        setattr(prep, name, timed(name, fn))
    try:
        c = time.process_time()
        time_prepare(manifest, out, 1)
        total = time.process_time() - c
    finally:
        for name, fn in originals.items():
            setattr(prep, name, fn)
    shutil.rmtree(out, ignore_errors=True)
    parent = total - sum(i[2] for i in items)
    firsts = [i for i in items if i[0] != "prepare_chunk"]
    chunks = {}
    for i in items:
        if i[0] == "prepare_chunk":
            chunks.setdefault(i[1], []).append(i[2])
    queue = [(0.0, n, i[2], i[1]) for n, i in enumerate(firsts)]  # (ready at, order, seconds, volume)
    free = [0.0] * workers
    order = len(queue)
    end = 0.0
    while queue:
        queue.sort()
        ready, _, sec, vol = queue.pop(0)
        start = max(heapq.heappop(free), ready)
        heapq.heappush(free, start + sec)
        end = max(end, start + sec)
        for c_sec in chunks.pop(vol, []) if vol >= 0 else []:  # a first item: its slice items follow
            queue.append((start + sec, order, c_sec, -1))
            order += 1
    return {"prepare_w1_cpu_s": total, "items": len(items), "item_cpu_s": total - parent, "parent_cpu_s": parent,
            "prepare_w2_estimated_s": end + parent, "prepare_w2_estimated_speedup": total / (end + parent)}


def run_tree(tree: Path, manifest: Path, series: list[str], labels: list[str], out: Path, repeats: int) -> dict:
    """:func:`tree_times` in a fresh process that imports ``tree``'s medvae."""
    import subprocess

    args = json.dumps({"manifest": str(manifest), "series": series, "labels": labels, "out": str(out),
                       "repeats": repeats})
    env = {**os.environ, "MEDVAE_BENCH_TREE": str(tree)}
    done = subprocess.run([sys.executable, __file__, "--tree-times", args], env=env, check=True,
                          capture_output=True, text=True)
    res = json.loads(done.stdout.strip().splitlines()[-1])
    assert res.pop("medvae") == str(tree / "medvae" / "__init__.py"), "timed another tree's medvae"
    return res


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
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each per round; the best is reported")
    ap.add_argument("--rounds", type=int, default=2, help="rounds, each timing every tree once (alternating)")
    ap.add_argument("--baseline", type=Path, default=None, help="a checkout of another revision, timed alike")
    ap.add_argument("--startup", action="store_true", help="only the start-up rows (fresh processes)")
    ap.add_argument("--tree-times", default=None, help=argparse.SUPPRESS)  # the worker side of run_tree
    args = ap.parse_args()
    if args.tree_times:
        a = json.loads(args.tree_times)
        import medvae

        res = tree_times(Path(a["manifest"]), a["series"], a["labels"], Path(a["out"]), a["repeats"])
        print(json.dumps({**res, "medvae": medvae.__file__}))
        return
    trees = {"this tree": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    if args.startup:
        args.out.mkdir(parents=True, exist_ok=True)
        res = {name: startup(args.out, tree=tree) for name, tree in trees.items()}
        for name, rows in res.items():
            for what, sec in rows.items():
                print(f"{name:<10} {what:<60} {sec:6.2f} s   goal <= 1.0 s beyond decoding")
        res["load_average_after"] = os.getloadavg()
        print(f"load average after: {res['load_average_after']}")
        (args.out / "bench_prepare_startup.json").write_text(json.dumps(res, indent=2))
        return
    if args.quick:
        args.patients, args.slices, args.repeats, args.rounds = 2, 40, 1, 1
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
               "slices": n_slices, "matrix": 512, "load_average_before": os.getloadavg(),
               "trees": {k: str(v) for k, v in trees.items()}}
    labels = [c["label"] for c in s["ct"]]
    bare_dcm, bare_lab, per_tree = [], [], {name: [] for name in trees}
    for _ in range(args.rounds):  # every round: the bare read, then each tree in its own process
        bare_dcm += [bare_read(files) for _ in range(args.repeats)]
        bare_lab += [bare_labels(labels) for _ in range(args.repeats)]
        for name, tree in trees.items():
            per_tree[name].append(run_tree(tree, manifest, series, labels, args.out / name.replace(" ", "_"),
                                           args.repeats))
    bare_dcm, bare_lab = min(bare_dcm), min(bare_lab)
    bare = bare_dcm + bare_lab
    results.update(bare_dicom_s=bare_dcm, bare_labels_s=bare_lab, bare_read_s=bare)
    results["bare_read_slices_per_s"] = n_slices / bare
    for name, runs in per_tree.items():
        r = {k: min(run[k] for run in runs) for k in runs[0]}
        r["prepare_w1_ratio_to_bare"] = r["prepare_w1_s"] / bare
        r["prepare_w2_ratio_to_bare"] = r["prepare_w2_s"] / bare
        r["prepare_w2_speedup_over_w1"] = r["prepare_w1_s"] / r["prepare_w2_s"]
        r["prepare_w1_beyond_readers_s"] = r["prepare_w1_s"] - r["read_dicom_series_s"] - r["read_labels_s"]
        r["prepare_w1_cpu_ratio_to_bare"] = r["prepare_w1_cpu_s"] / r["bare_cpu_s"]
        results[name] = r
    store_dir = args.out / "this_tree" / "bench_store_w2"
    from medvae.data.store import open_store

    dt_tile, tile_store = time_prepare(manifest, args.out / "bench_store_tile", 2, mode="tile")
    results["tile_store_patches"] = len(tile_store)
    ours, ref, n = loader_rate(tile_store, 256, 1.0 if args.quick else 3.0)
    results.update(loader_patches_per_s=ours, loader_reference_in_memory_patches_per_s=ref,
                   loader_ratio_to_in_memory=ours / ref, loader_goal_patches_per_s=20000)
    results["store_patches"] = len(open_store(store_dir))
    results["load_average_after"] = os.getloadavg()

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"prepare / loader throughput ({args.patients} x {args.slices} slices of 512², "
                    f"{os.cpu_count()} CPUs, best of {args.rounds} rounds x {args.repeats})")
    for col in ("what", "time s", "rate", "ratio", "goal"):
        t.add_column(col)
    t.add_row("bare pydicom dcmread().pixel_array", f"{bare_dcm:.2f}", f"{n_slices / bare_dcm:.0f} slices/s", "", "")
    t.add_row("bare nibabel dataobj of the labels", f"{bare_lab:.2f}", "", "", "")
    t.add_row("bare read: the two together (reference)", f"{bare:.2f}", f"{n_slices / bare:.0f} slices/s", "1.00", "")
    for name in trees:
        r = results[name]
        for key, what, floor in (("read_dicom_series_s", "read_dicom_series alone", bare_dcm),
                                 ("read_labels_s", "label NIfTIs via read_nifti", bare_lab)):
            t.add_row(f"{name}: {what}", f"{r[key]:.2f}", f"{n_slices / r[key]:.0f} slices/s",
                      f"{r[key] / floor:.2f} of its bare read", "")
        for w in (1, 2):
            t.add_row(f"{name}: prepare --workers {w} (resize 128)", f"{r[f'prepare_w{w}_s']:.2f}",
                      f"{n_slices / r[f'prepare_w{w}_s']:.0f} slices/s", f"{r[f'prepare_w{w}_ratio_to_bare']:.2f}",
                      "<= 2.0" if w == 1 else "")
        t.add_row(f"{name}:   --workers 2 speed-up over --workers 1", "", "",
                  f"{r['prepare_w2_speedup_over_w1']:.2f}x", ">= 1.7x")
        t.add_row(f"{name}:   the same, from its items' CPU s on 2 idle cores ({r['items']} items)",
                  f"{r['prepare_w2_estimated_s']:.2f}", "", f"{r['prepare_w2_estimated_speedup']:.2f}x", ">= 1.7x")
        t.add_row(f"{name}: prepare --workers 1, CPU s of the process / bare read's", f"{r['prepare_w1_cpu_s']:.2f}",
                  "", f"{r['prepare_w1_cpu_ratio_to_bare']:.2f} ({r['bare_cpu_s']:.2f} s)", "<= 2.0")
        t.add_row(f"{name}:   w1 beyond the readers (transforms, resize, store)",
                  f"{r['prepare_w1_beyond_readers_s']:.2f}", "", f"{r['prepare_w1_beyond_readers_s'] / bare:.2f}", "")
    t.add_row("in-memory numpy gather (reference)", "", f"{ref:,.0f} patches/s", "1.00", "")
    t.add_row(f"PatchBatches 256 x 128² ({len(tile_store)} patch store)", "", f"{ours:,.0f} patches/s",
              f"{ours / ref:.2f}", ">= 20,000/s")
    Console(width=160).print(t)
    print(f"load average before/after: {results['load_average_before']} / {results['load_average_after']}")
    out = args.out / ("bench_prepare_quick.json" if args.quick else "bench_prepare.json")
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

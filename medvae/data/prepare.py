"""``medvae prepare``: manifest -> patch store (parallel per volume), shards and merging.

Entry points (re-exported by ``medvae.data.store``): ``prepare``, ``merge_stores``, ``prepare_cli``.

- Rows with ``status=problem`` are skipped and reported; a volume that fails to load (corrupt
  file, label on another grid, ...) is reported with its file name and the rest still processed.
- Each volume is one task (``--workers N`` processes); a task writes its patches as its own
  ``.npy`` chunk in ``STORE/.prepare-<pid>/``, and the parent copies the chunks, in manifest
  order, into the memory-mapped ``patches.npy`` (``np.lib.format.open_memmap``), so neither side
  ever holds the whole store in memory. ``store.json`` is removed first and written last.
- Content hash: SHA-256 over the format version, the config (less ``workers``), and for each
  usable manifest row its patient id, modality, split, format and, for the image and label paths,
  the resolved path plus size and mtime (ns) of every file (a DICOM directory: each file in it).
  Contents are not read, so hashing 80 patients takes milliseconds; touching a file rebuilds.
- ``--shard i/N`` (1-based) keeps the usable rows at positions ``p`` (manifest order, problem rows
  excluded) with ``p % N == i - 1``. ``merge_stores`` puts the shards' volumes back in manifest
  order, so a merged store has the same patches, index and content hash as a single ``prepare``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from medvae.config import PrepareConfig
from medvae.data.store import (
    FORMAT_VERSION,
    PatchStore,
    open_store,
    to_stored,
    write_index,
)
from medvae.errors import ConfigError, InputError, MedvaeError, StoreError
from medvae.files import atomic_path, sha256_json, write_json

log = logging.getLogger("medvae.prepare")


# --------------------------------------------------------------------------- inputs and hashing
def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"i/N"`` -> ``(i, N)`` with ``1 <= i <= N``; None stays None."""
    if shard is None or isinstance(shard, tuple):
        return shard
    try:
        i, n = (int(s) for s in str(shard).split("/"))
    except ValueError:
        raise ConfigError(f"--shard {shard!r}: expected i/N, e.g. 1/4") from None
    if not 1 <= i <= n:
        raise ConfigError(f"--shard {shard!r}: need 1 <= i <= N")
    return i, n


def _resolve(p: str | None, base: Path) -> str:
    if not p:
        return ""
    path = Path(p)
    return str(path if path.is_absolute() else (base / path))


def _stat_entries(path: str) -> list:
    p = Path(path)
    if p.is_dir():
        return sorted([e.name, e.stat().st_size, e.stat().st_mtime_ns] for e in os.scandir(p) if e.is_file())
    if p.exists():
        st = p.stat()
        return [[p.name, st.st_size, st.st_mtime_ns]]
    return [["missing"]]


def _row_task(row, base: Path) -> dict:
    return {"patient_id": str(row.patient_id), "modality": str(row.modality), "split": str(row.split),
            "format": str(row.format), "path": _resolve(row.path, base), "label_path": _resolve(row.label_path, base)}


def _digest(task: dict) -> str:
    stats = {k: _stat_entries(task[k]) for k in ("path", "label_path") if task[k]}
    return sha256_json([task, stats])


def content_hash(digests: list[str], config: PrepareConfig, shard: tuple[int, int] | None = None) -> str:
    """Hash of the inputs (one digest per usable manifest row, in order) and the config."""
    cfg = config.model_dump(mode="json")
    cfg.pop("workers", None)  # how many processes ran does not change the result
    return sha256_json({"format_version": FORMAT_VERSION, "config": cfg, "inputs": digests,
                        "shard": list(shard) if shard else None})


# --------------------------------------------------------------------------- one volume (in a worker)
def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


@functools.lru_cache(maxsize=16)
def _chain(modality: str, config_json: str, with_label: bool, fmt: str):
    """One transform chain per kind of volume and process (building LoadImaged instantiates MONAI's readers)."""
    from medvae.data.transforms import build_transforms

    return build_transforms(modality, PrepareConfig.model_validate_json(config_json), with_label=with_label, fmt=fmt)


def process_volume(k: int, task: dict, config: dict, tmpdir: str) -> dict:
    """Load, normalize and cut one volume; write its chunk(s); return its index rows and constants.

    Never raises: a failure comes back as ``{"k": k, "error": "<file>: <what>"}``.
    """
    import torch

    from medvae.data.patches import extract_patches

    try:
        cfg = PrepareConfig(**config)
        with_label = bool(task["label_path"])
        data = {"image": task["path"], **({"label": task["label_path"]} if with_label else {})}
        d = _chain(task["modality"], cfg.model_dump_json(), with_label, task["format"])(data)
        image = torch.as_tensor(d["image"]).float()
        label = torch.as_tensor(d["label"]) if with_label else None
        if label is not None and label.shape[1:] != image.shape[1:]:
            raise InputError(f"{task['label_path']}: label shape {tuple(label.shape[1:])} differs from the "
                             f"image's {tuple(image.shape[1:])} ({task['path']}); check the label belongs to it")
        p = extract_patches(image, d["foreground"], cfg, tuple(d["spacing"][1:]), label)
        chunk = Path(tmpdir) / f"{k:06d}"
        np.save(f"{chunk}.patches.npy", to_stored(p.images, cfg.dtype))
        if p.labels is not None:
            np.save(f"{chunk}.labels.npy", p.labels)
        return {"k": k, "n": len(p), "error": None, "chunk": str(chunk), "has_label": p.labels is not None,
                "channels": int(image.shape[0]), "slice_index": p.slice_index, "y": p.y, "x": p.x,
                "foreground_fraction": p.foreground_fraction, "normalization": d["normalization"],
                "spacing": list(p.spacing), "n_slices": int(image.shape[1])}
    except Exception as err:  # noqa: BLE001 -- one bad volume must not stop the cohort
        log.debug("volume %s failed", task["path"], exc_info=True)
        what = str(err) if isinstance(err, MedvaeError) else f"{type(err).__name__}: {err}"
        if task["path"] not in what:
            what = f"{task['path']}: {what}"
        return {"k": k, "error": what}


# --------------------------------------------------------------------------- prepare
def prepare(manifest_path: str | os.PathLike, out: str | os.PathLike, config: PrepareConfig | None = None,
            shard: str | tuple[int, int] | None = None) -> PatchStore:
    """Build (or reuse, when inputs and config are unchanged) the patch store ``out``.

    Raises:
        InputError: the manifest is unreadable, or no volume yields any patch.
    """
    from medvae.data.manifest import read_manifest

    config = config or PrepareConfig()
    if config.mode == "tile" and config.stride is not None and config.stride < 1:
        raise ConfigError(f"stride {config.stride}: the tile stride must be a positive number of pixels")
    manifest_path, out = Path(manifest_path), Path(out)
    rows = read_manifest(manifest_path)
    problems = [f"{r.patient_id}: {r.problem or 'status=problem'} (skipped)" for r in rows if r.status == "problem"]
    if problems:  # discovery already explained each; one line here, the full list in store.json
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        log.warning("manifest %s: skipping %d problem row(s): %s", manifest_path.name, len(problems), shown)
    usable = [r for r in rows if r.status != "problem"]
    shard = parse_shard(shard)
    positions = list(range(len(usable)))
    if shard:
        positions = [p for p in positions if p % shard[1] == shard[0] - 1]
    tasks = {p: _row_task(usable[p], manifest_path.parent) for p in positions}
    digests = {p: _digest(t) for p, t in tasks.items()}
    chash = content_hash([digests[p] for p in positions], config, shard)
    if (out / "store.json").is_file():
        try:
            existing = open_store(out)
        except StoreError:
            existing = None
        if existing is not None and existing.content_hash == chash:
            log.info("%s: up to date (same inputs and config), reusing %d patches", out, len(existing))
            return existing
    if not tasks:
        raise InputError(f"{manifest_path}: no usable rows{' in shard %d/%d' % shard if shard else ''}; "
                         "fix the problems listed or rerun `medvae discover`")
    results = _run_tasks(tasks, config, out)
    failed = [r["error"] for r in results if r["error"]]
    for f in failed:
        log.error("skipped volume: %s", f)
    done = [dict(r, position=r["k"], digest=digests[r["k"]], **tasks[r["k"]]) for r in results if not r["error"]]
    meta = {"config": config.model_dump(mode="json"), "content_hash": chash, "shard": list(shard) if shard else None,
            "problems": problems + failed}
    try:
        return _assemble(out, done, meta, config.dtype)
    finally:
        shutil.rmtree(out / f".prepare-{os.getpid()}", ignore_errors=True)


def _run_tasks(tasks: dict[int, dict], config: PrepareConfig, out: Path) -> list[dict]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".prepare-*"):  # left by a crashed run
        shutil.rmtree(stale, ignore_errors=True)
    tmpdir = out / f".prepare-{os.getpid()}"
    tmpdir.mkdir()
    cfg = config.model_dump(mode="json")
    workers = max(1, min(int(config.workers), len(tasks)))
    results = []
    columns = (TextColumn("prepare"), BarColumn(), MofNCompleteColumn(), TextColumn("volumes"), TimeRemainingColumn())
    with Progress(*columns, transient=True, disable=not sys.stderr.isatty()) as bar:
        job = bar.add_task("prepare", total=len(tasks))
        if workers == 1:
            for k, t in tasks.items():
                results.append(process_volume(k, t, cfg, str(tmpdir)))
                bar.advance(job)
        else:
            import multiprocessing as mp

            ctx = mp.get_context("forkserver")  # no fork of a parent holding OpenMP/torch threads
            ctx.set_forkserver_preload(["medvae.data.prepare", "medvae.data.transforms", "medvae.data.patches"])
            threads = max(1, (os.cpu_count() or 1) // workers)
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as ex:
                futures = {ex.submit(process_volume, k, t, cfg, str(tmpdir)): k for k, t in tasks.items()}
                for fut in as_completed(futures):
                    try:
                        results.append(fut.result())
                    except BrokenProcessPool:  # a worker was killed (out of memory?): report, keep the rest
                        k = futures[fut]
                        results.append({"k": k, "error": f"{tasks[k]['path']}: worker process died while "
                                        "processing it (out of memory? try fewer --workers)"})
                    bar.advance(job)
    return sorted(results, key=lambda r: r["k"])


def _assemble(out: Path, volumes: list[dict], meta: dict, dtype: str) -> PatchStore:
    """Write patches.npy / labels.npy (memmap, chunk by chunk), index.csv, then store.json.

    ``volumes``: one dict per volume in store order with ``chunk`` (path prefix of its ``.npy``
    files, or a ``(store, start)`` pair when merging), ``n``, ``has_label`` and index columns.
    """
    volumes = [v for v in volumes if v["n"] > 0]
    if not volumes:
        raise InputError(f"{out}: no patches: every volume failed or was filtered out as background "
                         "(see the messages above; lower foreground_threshold if the scans are mostly empty)")
    channels = {v["channels"] for v in volumes}
    if len(channels) != 1:
        raise InputError(f"{out}: volumes have different channel counts {sorted(channels)}; "
                         "prepare them into separate stores")
    size = int(meta["config"]["patch_size"])
    n_total, c = sum(v["n"] for v in volumes), channels.pop()
    (out / "store.json").unlink(missing_ok=True)  # incomplete from here until the end
    any_label = any(v["has_label"] for v in volumes)
    store_dtype = np.uint16 if dtype == "uint16" else np.float16
    with contextlib.ExitStack() as stack:
        tmp_p = stack.enter_context(atomic_path(out / "patches.npy"))
        pm = np.lib.format.open_memmap(tmp_p, mode="w+", dtype=store_dtype, shape=(n_total, c, size, size))
        lm = None
        if any_label:
            tmp_l = stack.enter_context(atomic_path(out / "labels.npy"))
            lm = np.lib.format.open_memmap(tmp_l, mode="w+", dtype=np.uint8, shape=(n_total, 1, size, size))
        start = 0
        for v in volumes:
            v["first_row"] = start
            pm[start : start + v["n"]] = _chunk(v, "patches")
            if lm is not None and v["has_label"]:
                lm[start : start + v["n"]] = _chunk(v, "labels")
            start += v["n"]
        for m in (pm, lm):
            if m is not None:
                m.flush()
        del pm, lm  # close the maps before the renames
    if not any_label:
        (out / "labels.npy").unlink(missing_ok=True)
    index = {col: np.concatenate([np.full(v["n"], v[col], dtype=object) for v in volumes])
             for col in ("patient_id", "modality", "split")}
    for col in ("slice_index", "y", "x", "foreground_fraction"):
        index[col] = np.concatenate([np.asarray(v[col]) for v in volumes])
    index["source"] = np.concatenate([np.full(v["n"], v["path"], dtype=object) for v in volumes])
    index["has_label"] = np.concatenate([np.full(v["n"], int(v["has_label"])) for v in volumes])
    write_index(out / "index.csv", index)
    per_volume = [{"position": v["position"], "digest": v["digest"], "patient_id": v["patient_id"],
                   "modality": v["modality"], "split": v["split"], "format": v["format"], "path": v["path"],
                   "label_path": v["label_path"], "n_slices": v["n_slices"], "channels": v["channels"],
                   "n": v["n"], "first_row": v["first_row"], "has_label": v["has_label"], "spacing": v["spacing"],
                   **{k: v["normalization"][k] for k in ("low", "high", "unit")}} for v in volumes]
    mods = sorted({v["modality"] for v in volumes})
    norm = {m: {"low": float(np.median([v["normalization"]["low"] for v in volumes if v["modality"] == m])),
                "high": float(np.median([v["normalization"]["high"] for v in volumes if v["modality"] == m])),
                "unit": next(v["normalization"]["unit"] for v in volumes if v["modality"] == m)} for m in mods}
    spacing = {m: [float(np.median([v["spacing"][a] for v in volumes if v["modality"] == m])) for a in (0, 1)]
               for m in mods}
    write_json(out / "store.json", {
        "format_version": FORMAT_VERSION, "config": meta["config"], "content_hash": meta["content_hash"],
        "n_patches": n_total, "patch_size": size, "channels": c, "dtype": dtype,
        "normalization": norm, "spacing": spacing, "volumes": per_volume, "shard": meta.get("shard"),
        "problems": meta.get("problems", []), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    return open_store(out)


def _chunk(v: dict, kind: str) -> np.ndarray:
    src = v["chunk"]
    if isinstance(src, tuple):  # merging: (PatchStore, first row)
        store, first = src
        arr = store.patches if kind == "patches" else store.labels
        return arr[first : first + v["n"]]
    return np.load(f"{src}.{kind}.npy", mmap_mode="r")


# --------------------------------------------------------------------------- merge
def merge_stores(parts: list[str | os.PathLike], out: str | os.PathLike) -> PatchStore:
    """Join shard stores (same config) into ``out``, volumes in manifest order.

    Raises:
        StoreError: a part is incomplete, the parts' configs differ, or two parts hold the same volume.
    """
    out = Path(out)
    stores = [open_store(p) for p in parts]
    if not stores:
        raise ConfigError("--merge: give the shard stores to join")
    cfgs = {sha256_json({k: v for k, v in s.meta["config"].items() if k != "workers"}) for s in stores}
    if len(cfgs) != 1:
        raise StoreError(f"--merge: {', '.join(map(str, parts))} were prepared with different configs; "
                         "prepare all shards with the same settings")
    volumes, problems = [], []
    for s in stores:
        problems += s.meta.get("problems", [])
        for v in s.meta.get("volumes", []):
            volumes.append(dict(v, chunk=(s, v["first_row"]), normalization={k: v[k] for k in ("low", "high", "unit")},
                                **{c: s.index[c][v["first_row"] : v["first_row"] + v["n"]]
                                   for c in ("slice_index", "y", "x", "foreground_fraction")}))
    volumes.sort(key=lambda v: v["position"])
    seen = [v["position"] for v in volumes]
    if len(set(seen)) != len(seen):
        raise StoreError(f"--merge: the parts overlap (the same manifest row in two of {[str(p) for p in parts]})")
    config = PrepareConfig(**stores[0].meta["config"])
    chash = content_hash([v["digest"] for v in volumes], config)
    if out.resolve() in [s.path.resolve() for s in stores]:
        raise ConfigError(f"--out {out}: must not be one of the parts being merged")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"config": stores[0].meta["config"], "content_hash": chash, "problems": problems}
    return _assemble(out, volumes, meta, stores[0].meta["dtype"])

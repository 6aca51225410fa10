"""``medvae prepare``: manifest -> patch store (parallel by volume and by slice range), shards and merging.

Entry points: ``prepare``, ``merge_stores`` (the store format itself is ``medvae.data.store``).

- 2D image-set rows (``format`` image | idx | npz) go through
  :func:`medvae.data.image_patches.image_set_patches` instead of the MONAI volume chain: one task
  per row, vectorized over its images, each image its own patient with its class.
- Rows with ``status=problem`` are skipped and reported; a volume that fails to load (corrupt
  file, label on another grid, ...) is reported with its file name and the rest still processed.
- Work items (``--workers N`` processes, or this process with 1): a whole volume, or, for a CT
  DICOM series of native single-frame files, a range of its slices (``medvae.data.prepare_work``:
  the ranges depend on the series alone, so the store is byte for byte the same with any number
  of workers). An item writes its patches as its own ``.npy`` chunk in ``STORE/.prepare-<pid>/``,
  and the parent copies the chunks, in manifest and slice order, into the memory-mapped
  ``patches.npy`` (``np.lib.format.open_memmap``), so neither side ever holds the whole store in
  memory. ``store.json`` is removed first and written last.
- Tasks, results and the content hash are in ``medvae.data.prepare_tasks``. Content hash: SHA-256 over
  the format version, the config (less ``workers``), and for each
  usable manifest row its patient id, modality, split, format and, for the image and label paths,
  the resolved path plus size and mtime (ns) of every file (a DICOM directory: each file in it).
  Contents are not read, so hashing 80 patients takes milliseconds; touching a file rebuilds.
- ``--shard i/N`` (1-based) keeps the usable rows at positions ``p`` (manifest order, problem rows
  excluded) with ``p % N == i - 1``. ``merge_stores`` puts the shards' volumes back in manifest
  order, so a merged store has the same patches, index and content hash as a single ``prepare``.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import shutil
import sys
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from medvae.config import PrepareConfig
from medvae.data.manifest import read_manifest
from medvae.data.prepare_tasks import INDEX_ARRAYS, PreparedVolume, VolumeTask, content_hash, parse_shard
from medvae.data.prepare_work import (
    PatchChunk,
    SeriesChunks,
    combine_chunks,
    prepare_chunk,
    process_volume,
    start_volume,
)
from medvae.data.store import (
    PatchStore,
    begin_store,
    open_store,
    store_complete,
    write_index,
    write_store_json,
)
from medvae.errors import ConfigError, InputError, StoreError
from medvae.files import atomic_path, sha256_json
from medvae.io.images2d import convert_channels

log = logging.getLogger(__name__)


def _init_worker(threads: int) -> None:
    """A worker's torch threads (the cores shared among the workers), where the forkserver loaded torch."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(max(1, threads))


class _InProcess(Executor):
    """``--workers 1``: each item runs when it is submitted, in this process (nothing pickled)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        fut: Future = Future()
        fut.set_result(fn(*args, **kwargs))  # the items never raise
        return fut


# --------------------------------------------------------------------------- prepare
def prepare(manifest_path: str | os.PathLike, out: str | os.PathLike, config: PrepareConfig | None = None,
            shard: str | tuple[int, int] | None = None) -> PatchStore:
    """Build (or reuse, when inputs and config are unchanged) the patch store ``out``.

    Raises:
        InputError: the manifest is unreadable, or no volume yields any patch.
    """
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
    tasks = {p: VolumeTask.from_row(usable[p], manifest_path.parent) for p in positions}
    digests = {p: t.digest() for p, t in tasks.items()}
    chash = content_hash([digests[p] for p in positions], config, shard)
    if store_complete(out):
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
    results = _run_tasks(tasks, digests, config, out)
    failed = [r for r in results if isinstance(r, str)]
    for f in failed:
        log.error("skipped volume: %s", f)
    done = [r for r in results if not isinstance(r, str)]
    meta = {"config": config.model_dump(mode="json"), "content_hash": chash, "shard": list(shard) if shard else None,
            "problems": problems + failed}
    try:
        return _assemble(out, done, meta, config.dtype)
    finally:
        shutil.rmtree(out / f".prepare-{os.getpid()}", ignore_errors=True)


def _run_tasks(tasks: dict[int, VolumeTask], digests: dict[int, str], config: PrepareConfig,
               out: Path) -> list[PreparedVolume | str]:
    """Every task's result (a PreparedVolume or an error message), in position order."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".prepare-*"):  # left by a crashed run
        shutil.rmtree(stale, ignore_errors=True)
    tmpdir = out / f".prepare-{os.getpid()}"
    tmpdir.mkdir()
    cfg = config.model_dump(mode="json")
    workers = max(1, min(int(config.workers) or os.cpu_count() or 1, len(tasks)))  # 0: one per core
    columns = (TextColumn("prepare"), BarColumn(), MofNCompleteColumn(), TextColumn("volumes"), TimeRemainingColumn())
    with Progress(*columns, transient=True, disable=not sys.stderr.isatty()) as bar, contextlib.ExitStack() as stack:
        job = bar.add_task("prepare", total=len(tasks))
        if workers == 1:
            ex: Executor = _InProcess()
        else:
            ctx = mp.get_context("forkserver")  # no fork of a parent holding OpenMP/torch threads
            ctx.set_forkserver_preload(["medvae.data.prepare_work", "medvae.data.normalize", "medvae.data.patches",
                                        "medvae.io", "medvae.io.dicom_pixels", "PIL.Image"])
            threads = max(1, (os.cpu_count() or 1) // workers)
            ex = stack.enter_context(ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                                         initargs=(threads,)))
        results = _drive(ex, tasks, digests, cfg, str(tmpdir), lambda: bar.advance(job))
    return [results[k] for k in sorted(results)]


def _drive(ex: Executor, tasks: dict[int, VolumeTask], digests: dict[int, str], cfg: dict, tmpdir: str,
           advance) -> dict[int, PreparedVolume | str]:
    """Run every volume's items on ``ex``: its first item, then its slice items as soon as it is planned."""
    pending: dict[Future, tuple[str, int, int]] = {}
    series: dict[int, SeriesChunks] = {}
    chunks: dict[int, dict[int, PatchChunk | None]] = {}
    results: dict[int, PreparedVolume | str] = {}

    def finish(k: int, result: PreparedVolume | str) -> None:
        results[k] = result
        advance()

    def died(k: int) -> str:
        return f"{tasks[k].path}: worker process died while processing it (out of memory? try fewer --workers)"

    def submit(kind: str, k: int, i: int, fn, *args) -> None:
        try:
            pending[ex.submit(fn, *args)] = (kind, k, i)
        except BrokenProcessPool:  # a worker was killed (out of memory?): report, keep the rest
            if k not in results:
                finish(k, died(k))

    in_process = isinstance(ex, _InProcess)
    for k, t in tasks.items():
        submit("start", k, -1, start_volume, k, t, digests[k], cfg, tmpdir, in_process)
    while pending:
        done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
        for fut in done:
            kind, k, i = pending.pop(fut)
            try:
                res = fut.result()
            except BrokenProcessPool:
                res = died(k)
            if k in results:  # the volume already failed in another of its chunks
                continue
            if isinstance(res, SeriesChunks):
                series[k], chunks[k] = res, {}
                for j in range(len(res.chunks)):
                    submit("chunk", k, j, prepare_chunk, res, j, cfg, tmpdir)
            elif kind != "chunk" or isinstance(res, str):
                finish(k, res)
            else:
                chunks[k][i] = res
                if len(chunks[k]) == len(series[k].chunks):
                    parts = [chunks[k][j] for j in range(len(series[k].chunks))]
                    if any(p is None for p in parts):  # a file did not decode: the whole-volume read skips it
                        submit("whole", k, -1, process_volume, k, tasks[k], digests[k], cfg, tmpdir)
                    else:
                        finish(k, combine_chunks(series[k], parts))
    return results


def harmonize_channels(volumes: list[PreparedVolume]) -> tuple[int, list[PreparedVolume], list[str]]:
    """The store's channel count (that of most patches) and the volumes that can have it.

    Grey and RGB mix (an RGB image in a grey set): the minority is converted on copy
    (:func:`medvae.io.images2d.convert_channels`), with a warning naming each file; other counts
    (a 2-channel stack among grey ones) are left out, each with a problem line naming it.
    """
    counts: dict[int, int] = {}
    for v in volumes:
        counts[v.channels] = counts.get(v.channels, 0) + v.n
    c = max(counts, key=lambda k: (counts[k], -k))
    keep, dropped = [], []
    for v in volumes:
        if v.channels == c or {v.channels, c} == {1, 3}:
            if v.channels != c:
                log.warning("%s: %s, the store is %s; converted", v.task.path,
                            "RGB" if v.channels == 3 else "grey", "RGB" if c == 3 else "grey")
            keep.append(v)
        else:
            dropped.append(f"{v.task.path}: {v.channels} channel(s), the store's patches have {c}; "
                           "left out (prepare it into a separate store)")
            log.error("skipped volume: %s", dropped[-1])
    return c, keep, dropped


def _assemble(out: Path, volumes: list[PreparedVolume], meta: dict, dtype: str) -> PatchStore:
    """Write patches.npy / labels.npy (memmap, volume by volume), index.csv, then store.json.

    ``volumes``: in store order; ``meta``: store.json's ``config``, ``content_hash``, ``problems``
    (and ``shard``).
    """
    volumes = [v for v in volumes if v.n > 0]
    if not volumes:
        raise InputError(f"{out}: no patches: every volume failed or was filtered out as background "
                         "(see the messages above; lower foreground_threshold if the scans are mostly empty)")
    c, volumes, dropped = harmonize_channels(volumes)
    meta["problems"] = meta.get("problems", []) + dropped
    size = int(meta["config"]["patch_size"])
    n_total = sum(v.n for v in volumes)
    begin_store(out)  # incomplete from here until the end
    any_label = any(v.has_label for v in volumes)
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
            v.first_row = start
            for kind, m in (("patches", pm), ("labels", lm if v.has_label else None)):
                row = start
                for part in v.parts(kind) if m is not None else ():
                    m[row : row + len(part)] = convert_channels(part, c) if kind == "patches" else part
                    row += len(part)
            start += v.n
        for m in (pm, lm):
            if m is not None:
                m.flush()
        del pm, lm  # close the maps before the renames
    if not any_label:
        (out / "labels.npy").unlink(missing_ok=True)
    index = {col: np.concatenate([np.full(v.n, getattr(v.task, col), dtype=object) for v in volumes])
             for col in ("modality", "split")}
    index["patient_id"] = np.concatenate([v.index.get("patient_id", np.full(v.n, v.task.patient_id, dtype=object))
                                          for v in volumes])
    for col in INDEX_ARRAYS:
        index[col] = np.concatenate([np.asarray(v.index[col]) for v in volumes])
    index["source"] = np.concatenate([np.full(v.n, v.task.path, dtype=object) for v in volumes])
    index["has_label"] = np.concatenate([np.full(v.n, int(v.has_label)) for v in volumes])
    classes = list(dict.fromkeys(c for v in volumes for c in v.classes if c))
    if classes:
        index["class"] = np.concatenate([v.index.get("class", np.full(v.n, v.task.class_name, dtype=object))
                                         for v in volumes])
    write_index(out / "index.csv", index)
    by_mod = {m: [v for v in volumes if v.task.modality == m] for m in sorted({v.task.modality for v in volumes})}
    norm = {m: {"low": float(np.median([v.low for v in vs])), "high": float(np.median([v.high for v in vs])),
                "unit": vs[0].unit} for m, vs in by_mod.items()}
    spacing = {m: [float(np.median([v.spacing[a] for v in vs])) for a in (0, 1)] for m, vs in by_mod.items()}
    write_store_json(out, {**meta, "n_patches": n_total, "patch_size": size, "channels": c, "dtype": dtype,
                           "classes": classes,
                           "normalization": norm, "spacing": spacing, "volumes": [v.record() for v in volumes]})
    return open_store(out)


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
    volumes = sorted((PreparedVolume.from_record(rec, s) for s in stores for rec in s.meta.get("volumes", [])),
                     key=lambda v: v.position)
    problems = [p for s in stores for p in s.meta.get("problems", [])]
    seen = [v.position for v in volumes]
    if len(set(seen)) != len(seen):
        raise StoreError(f"--merge: the parts overlap (the same manifest row in two of {[str(p) for p in parts]})")
    config = PrepareConfig(**stores[0].meta["config"])
    chash = content_hash([v.digest for v in volumes], config)
    if out.resolve() in [s.path.resolve() for s in stores]:
        raise ConfigError(f"--out {out}: must not be one of the parts being merged")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"config": stores[0].meta["config"], "content_hash": chash, "problems": problems}
    return _assemble(out, volumes, meta, stores[0].meta["dtype"])

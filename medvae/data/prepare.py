"""``medvae prepare``: manifest -> patch store (parallel per volume), shards and merging.

Entry points: ``prepare``, ``merge_stores`` (the store format itself is ``medvae.data.store``).

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
import dataclasses
import functools
import logging
import multiprocessing as mp
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medvae.config import PrepareConfig
from medvae.data.manifest import ManifestRow, read_manifest
from medvae.data.store import (
    FORMAT_VERSION,
    PatchStore,
    begin_store,
    open_store,
    to_stored,
    write_index,
    write_store_json,
)
from medvae.errors import ConfigError, InputError, MedvaeError, StoreError
from medvae.files import atomic_path, sha256_json

log = logging.getLogger("medvae.prepare")

_INDEX_ARRAYS = ("slice_index", "y", "x", "foreground_fraction")


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


@dataclass(frozen=True)
class VolumeTask:
    """One usable manifest row, paths resolved against the manifest's folder."""

    patient_id: str
    modality: str
    split: str
    format: str
    path: str
    label_path: str

    @classmethod
    def from_row(cls, row: ManifestRow, base: Path) -> VolumeTask:
        return cls(str(row.patient_id), str(row.modality), str(row.split), str(row.format),
                   _resolve(row.path, base), _resolve(row.label_path, base))

    def digest(self) -> str:
        """Hash of the row and of the size and mtime of every input file (contents are not read)."""
        stats = {k: _stat_entries(getattr(self, k)) for k in ("path", "label_path") if getattr(self, k)}
        return sha256_json([dataclasses.asdict(self), stats])


@dataclass
class PreparedVolume:
    """One volume's patches, ready to be copied into the store, and what store.json keeps of it.

    ``source`` is where its arrays are: the path prefix of the worker's ``.npy`` chunk files, or
    ``(store, first row)`` when merging shards. ``first_row`` is set when the store is assembled.
    """

    task: VolumeTask
    position: int  # among the usable manifest rows: the store's volume order
    digest: str
    source: str | tuple[PatchStore, int]
    n: int
    channels: int
    n_slices: int
    has_label: bool
    spacing: list[float]  # in-plane (sy, sx) of a patch pixel
    low: float
    high: float
    unit: str
    index: dict[str, np.ndarray]  # the _INDEX_ARRAYS columns, length n
    first_row: int = 0

    def record(self) -> dict:
        """The volume's entry in store.json's ``volumes``."""
        return {"position": self.position, "digest": self.digest, **dataclasses.asdict(self.task),
                "n_slices": self.n_slices, "channels": self.channels, "n": self.n, "first_row": self.first_row,
                "has_label": self.has_label, "spacing": self.spacing, "low": self.low, "high": self.high,
                "unit": self.unit}

    @classmethod
    def from_record(cls, rec: dict, store: PatchStore) -> PreparedVolume:
        """A volume of an existing (shard) store, its arrays read from that store when merging."""
        rows = slice(rec["first_row"], rec["first_row"] + rec["n"])
        task = VolumeTask(**{f.name: rec[f.name] for f in dataclasses.fields(VolumeTask)})
        return cls(task, rec["position"], rec["digest"], (store, rec["first_row"]), rec["n"], rec["channels"],
                   rec["n_slices"], rec["has_label"], list(rec["spacing"]), rec["low"], rec["high"], rec["unit"],
                   {c: store.index[c][rows] for c in _INDEX_ARRAYS})

    def arrays(self, kind: str) -> np.ndarray:
        """``patches`` or ``labels`` of this volume (memory-mapped)."""
        if isinstance(self.source, tuple):
            store, first = self.source
            arr = store.patches if kind == "patches" else store.labels
            return arr[first : first + self.n]
        return np.load(f"{self.source}.{kind}.npy", mmap_mode="r")


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


def content_hash(digests: list[str], config: PrepareConfig, shard: tuple[int, int] | None = None) -> str:
    """Hash of the inputs (one digest per usable manifest row, in order) and the config."""
    cfg = config.model_dump(mode="json")
    cfg.pop("workers", None)  # how many processes ran does not change the result
    return sha256_json({"format_version": FORMAT_VERSION, "config": cfg, "inputs": digests,
                        "shard": list(shard) if shard else None})


# --------------------------------------------------------------------------- one volume (in a worker)
# torch, MONAI and the patch cutter are imported inside the worker functions, not at module level:
# importing them takes seconds (1.7 s for torch alone), and a store that is up to date, a merge,
# or the parent of a multi-worker run never needs them.
def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


@functools.lru_cache(maxsize=16)
def _chain(modality: str, config_json: str, with_label: bool):
    """One transform chain per kind of volume and process (building LoadImaged instantiates MONAI's readers)."""
    from medvae.data.transforms import build_transforms

    return build_transforms(modality, PrepareConfig.model_validate_json(config_json), with_label=with_label)


def process_volume(position: int, task: VolumeTask, digest: str, config: dict,
                   tmpdir: str) -> PreparedVolume | str:
    """Load, normalize and cut one volume; write its chunk(s) to ``tmpdir``.

    Never raises: a failure comes back as the message ``"<file>: <what>"``.
    """
    import torch

    from medvae.data.patches import extract_patches

    try:
        cfg = PrepareConfig(**config)
        with_label = bool(task.label_path)
        data = {"image": task.path, **({"label": task.label_path} if with_label else {})}
        d = _chain(task.modality, cfg.model_dump_json(), with_label)(data)
        image = torch.as_tensor(d["image"]).float()
        label = torch.as_tensor(d["label"]) if with_label else None
        if label is not None and label.shape[1:] != image.shape[1:]:
            raise InputError(f"{task.label_path}: label shape {tuple(label.shape[1:])} differs from the "
                             f"image's {tuple(image.shape[1:])} ({task.path}); check the label belongs to it")
        p = extract_patches(image, d["foreground"], cfg, tuple(d["spacing"][1:]), label)
        chunk = str(Path(tmpdir) / f"{position:06d}")
        np.save(f"{chunk}.patches.npy", to_stored(p.images, cfg.dtype))
        if p.labels is not None:
            np.save(f"{chunk}.labels.npy", p.labels)
        norm = d["normalization"]
        return PreparedVolume(task, position, digest, chunk, len(p), int(image.shape[0]), int(image.shape[1]),
                              p.labels is not None, list(p.spacing), norm["low"], norm["high"], norm["unit"],
                              {c: getattr(p, c) for c in _INDEX_ARRAYS})
    except Exception as err:  # noqa: BLE001 -- one bad volume must not stop the cohort
        log.debug("volume %s failed", task.path, exc_info=True)
        what = str(err) if isinstance(err, MedvaeError) else f"{type(err).__name__}: {err}"
        return what if task.path in what else f"{task.path}: {what}"


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
    workers = max(1, min(int(config.workers), len(tasks)))
    results: dict[int, PreparedVolume | str] = {}
    columns = (TextColumn("prepare"), BarColumn(), MofNCompleteColumn(), TextColumn("volumes"), TimeRemainingColumn())
    with Progress(*columns, transient=True, disable=not sys.stderr.isatty()) as bar:
        job = bar.add_task("prepare", total=len(tasks))
        if workers == 1:
            for k, t in tasks.items():
                results[k] = process_volume(k, t, digests[k], cfg, str(tmpdir))
                bar.advance(job)
        else:
            ctx = mp.get_context("forkserver")  # no fork of a parent holding OpenMP/torch threads
            ctx.set_forkserver_preload(["medvae.data.prepare", "medvae.data.transforms", "medvae.data.patches"])
            threads = max(1, (os.cpu_count() or 1) // workers)
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as ex:
                futures = {ex.submit(process_volume, k, t, digests[k], cfg, str(tmpdir)): k for k, t in tasks.items()}
                for fut in as_completed(futures):
                    k = futures[fut]
                    try:
                        results[k] = fut.result()
                    except BrokenProcessPool:  # a worker was killed (out of memory?): report, keep the rest
                        results[k] = (f"{tasks[k].path}: worker process died while processing it "
                                      "(out of memory? try fewer --workers)")
                    bar.advance(job)
    return [results[k] for k in sorted(results)]


def _assemble(out: Path, volumes: list[PreparedVolume], meta: dict, dtype: str) -> PatchStore:
    """Write patches.npy / labels.npy (memmap, volume by volume), index.csv, then store.json.

    ``volumes``: in store order; ``meta``: store.json's ``config``, ``content_hash``, ``problems``
    (and ``shard``).
    """
    volumes = [v for v in volumes if v.n > 0]
    if not volumes:
        raise InputError(f"{out}: no patches: every volume failed or was filtered out as background "
                         "(see the messages above; lower foreground_threshold if the scans are mostly empty)")
    channels = {v.channels for v in volumes}
    if len(channels) != 1:
        raise InputError(f"{out}: volumes have different channel counts {sorted(channels)}; "
                         "prepare them into separate stores")
    size = int(meta["config"]["patch_size"])
    n_total, c = sum(v.n for v in volumes), channels.pop()
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
            pm[start : start + v.n] = v.arrays("patches")
            if lm is not None and v.has_label:
                lm[start : start + v.n] = v.arrays("labels")
            start += v.n
        for m in (pm, lm):
            if m is not None:
                m.flush()
        del pm, lm  # close the maps before the renames
    if not any_label:
        (out / "labels.npy").unlink(missing_ok=True)
    index = {col: np.concatenate([np.full(v.n, getattr(v.task, col), dtype=object) for v in volumes])
             for col in ("patient_id", "modality", "split")}
    for col in _INDEX_ARRAYS:
        index[col] = np.concatenate([np.asarray(v.index[col]) for v in volumes])
    index["source"] = np.concatenate([np.full(v.n, v.task.path, dtype=object) for v in volumes])
    index["has_label"] = np.concatenate([np.full(v.n, int(v.has_label)) for v in volumes])
    write_index(out / "index.csv", index)
    by_mod = {m: [v for v in volumes if v.task.modality == m] for m in sorted({v.task.modality for v in volumes})}
    norm = {m: {"low": float(np.median([v.low for v in vs])), "high": float(np.median([v.high for v in vs])),
                "unit": vs[0].unit} for m, vs in by_mod.items()}
    spacing = {m: [float(np.median([v.spacing[a] for v in vs])) for a in (0, 1)] for m, vs in by_mod.items()}
    write_store_json(out, {**meta, "n_patches": n_total, "patch_size": size, "channels": c, "dtype": dtype,
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

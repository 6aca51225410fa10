"""The on-disk patch store: memory-mapped ``patches.npy`` + ``index.csv`` + ``store.json`` (last).

Layout of a store directory (the "Patch store" contract of docs/architecture.md)::

    patches.npy   (N, C, H, W) in [0, 1], float16 or uint16 (x * 65535), memory-mapped
    labels.npy    (N, 1, H, W) uint8, only when at least one volume has a label map
    index.csv     patient_id, modality, split, slice_index, y, x, foreground_fraction, source,
                  has_label, then ``class`` (a class name per patch) when the store has classes
    store.json    format_version, config, content_hash, n_patches, patch_size, channels, dtype,
                  normalization {modality: {low, high, unit}}, spacing {modality: [sy, sx]},
                  volumes [per-volume constants], created, problems, classes [names, in label order]

A store is complete only when ``store.json`` exists: it is written last (atomically, by
:func:`write_store_json`, the one writer of it), and removed first when a store is rebuilt
(:func:`begin_store`), so a crash mid-write leaves a store that ``open_store`` refuses.
Building a store from a manifest (``prepare``, ``merge_stores``) lives in
``medvae.data.prepare``, which imports this module (never the other way round). A store made from
another store (a utility cell's subset or synthetic store, generation's augmented store) is written
by :func:`write_derived_store`, which decides once what carries over (``DERIVED_META``, the index
columns, the label maps).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from medvae.errors import StoreError
from medvae.files import atomic_open, atomic_path, write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STORE_JSON = "store.json"  # written last: a store is complete once it exists
INDEX_COLUMNS = ("patient_id", "modality", "split", "slice_index", "y", "x", "foreground_fraction", "source")
_INT_COLUMNS = ("slice_index", "y", "x", "has_label")
_FLOAT_COLUMNS = ("foreground_fraction",)
UINT16_SCALE = 65535.0


class PatchStore:
    """A complete patch store opened read-only; arrays stay on disk (memory-mapped).

    Attributes:
        path: the store directory.
        patches: memmap ``(N, C, H, W)``, float16 in [0, 1] or uint16 (``x * 65535``).
        labels: memmap ``(N, 1, H, W)`` uint8, or None.
        index: column name -> ``(N,)`` array (str columns as object arrays).
        meta: the ``store.json`` dict.
        content_hash: hash of the inputs and config that built the store.
    """

    def __init__(self, path: Path, patches: np.ndarray, labels: np.ndarray | None, index: dict, meta: dict):
        self.path = Path(path)
        self.patches = patches
        self.labels = labels
        self.index = index
        self.meta = meta
        self.content_hash: str = meta["content_hash"]
        self._class_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.patches.shape[0])

    def __repr__(self) -> str:
        return (f"PatchStore({str(self.path)!r}, n={len(self)}, shape={tuple(self.patches.shape[1:])}, "
                f"dtype={self.patches.dtype}, modalities={self.modalities})")

    @property
    def scale(self) -> float:
        """Divide stored values by this to get [0, 1] (65535 for uint16, 1 for float16)."""
        return UINT16_SCALE if self.patches.dtype == np.uint16 else 1.0

    def to_unit(self, raw: np.ndarray) -> np.ndarray:
        """Stored values (any shape) -> float32 in [0, 1]."""
        out = raw.astype(np.float32)
        if self.scale != 1.0:
            out *= np.float32(1.0 / self.scale)
        return out

    def get(self, idx) -> np.ndarray:
        """Patches at ``idx`` (int, slice or index array) as float32 in [0, 1].

        An index array is read in sorted order (sequential disk access) and returned in the
        order given.
        """
        if isinstance(idx, (list, np.ndarray)):
            return self.to_unit(read_rows(self.patches, idx))
        return self.to_unit(np.asarray(self.patches[idx]))

    def select(self, split: str | None = None, modality: str | None = None) -> np.ndarray:
        """Row indices (int64, ascending) of patches in ``split`` and/or ``modality`` (None = all)."""
        mask = np.ones(len(self), dtype=bool)
        if split is not None:
            mask &= self.index["split"] == split
        if modality is not None:
            mask &= self.index["modality"] == modality
        return np.flatnonzero(mask).astype(np.int64)

    @property
    def modalities(self) -> list[str]:
        return sorted(set(self.index["modality"].tolist()))

    @property
    def splits(self) -> list[str]:
        return sorted(set(self.index["split"].tolist()))

    @property
    def classes(self) -> list[str]:
        """Class names in label order (``store.json`` ``classes``); empty when the store has none."""
        return list(self.meta.get("classes") or [])

    def class_ids(self, rows=None) -> np.ndarray:
        """int64 class ids (positions in :attr:`classes`) of ``rows`` (all when None); -1 where none."""
        names = self.index.get("class")
        n = len(self) if rows is None else len(np.asarray(rows))
        if names is None or not self.classes:
            return np.full(n, -1, dtype=np.int64)
        if self._class_ids is None:
            lut = {c: i for i, c in enumerate(self.classes)}
            uniq, inv = np.unique(names.astype(str), return_inverse=True)
            self._class_ids = np.asarray([lut.get(u, -1) for u in uniq], dtype=np.int64)[inv]
        return self._class_ids if rows is None else self._class_ids[np.asarray(rows, dtype=np.int64)]

    def class_counts(self) -> dict[tuple[str, str], int]:
        """``(split, class name) -> patches`` (empty when the store has no classes)."""
        if "class" not in self.index:
            return {}
        pairs = np.char.add(np.char.add(self.index["split"].astype(str), "\x1f"), self.index["class"].astype(str))
        uniq, counts = np.unique(pairs, return_counts=True)
        return {tuple(u.split("\x1f", 1)): int(c) for u, c in zip(uniq.tolist(), counts.tolist())}

    def patients(self, split: str | None = None) -> list[str]:
        """Patient ids with at least one patch (in ``split``), sorted."""
        ids = self.index["patient_id"] if split is None else self.index["patient_id"][self.index["split"] == split]
        return sorted(set(ids.tolist()))

    def normalization(self, modality: str, patient_id: str | None = None) -> dict:
        """``{"low", "high", "unit"}`` mapping [0, 1] back to physical units.

        Per modality (CT: the HU window; microscopy: the median of the stacks' percentiles); with
        ``patient_id``, that volume's own constants (microscopy stacks are normalized one by one).
        """
        if patient_id is not None:
            for vol in self.meta.get("volumes", []):
                if vol["patient_id"] == patient_id and vol["modality"] == modality:
                    return {"low": vol["low"], "high": vol["high"], "unit": vol["unit"]}
            raise KeyError(f"{self.path}: no volume of patient {patient_id!r} ({modality}) in this store")
        try:
            return self.meta["normalization"][modality]
        except KeyError:
            raise KeyError(f"{self.path}: no normalization for modality {modality!r}; "
                           f"store has {sorted(self.meta.get('normalization', {}))}") from None

    def to_physical(self, x01: np.ndarray, modality: str, patient_id: str | None = None) -> np.ndarray:
        """Map values in [0, 1] back to physical units: ``low + x * (high - low)`` (HU for CT).

        Args:
            x01: array of any shape in [0, 1] (e.g. ``(B, C, H, W)`` model output).
            modality: ``ct`` | ``microscopy`` | ``mr``.
            patient_id: use this volume's own constants instead of the modality's.
        Returns: float32 array of the same shape.
        """
        norm = self.normalization(modality, patient_id)
        lo, hi = float(norm["low"]), float(norm["high"])
        return (lo + np.asarray(x01, dtype=np.float64) * (hi - lo)).astype(np.float32)

    def spacing(self, modality: str) -> tuple[float, float]:
        """In-plane ``(sy, sx)`` size of a patch pixel (mm or µm) after any resize."""
        return tuple(self.meta["spacing"][modality])


# --------------------------------------------------------------------------- reading
def even_positions(n: int, k: int) -> np.ndarray:
    """Positions (int64, ascending, distinct) of ``min(k, n)`` of ``n`` items, evenly spaced from the first
    to the last (``round(i (n - 1) / (k - 1))``, halves to even; ``k == 1``: the first): all when ``k >= n``.

    Thinning by position instead of at random keeps a subset deterministic and spread over the
    whole ordering (a patient's slices, a split's patches): ``rows[even_positions(len(rows), k)]``.
    """
    return np.unique(np.linspace(0, n - 1, max(min(k, n), 0)).round().astype(np.int64))


def read_rows(arr: np.ndarray, rows, out: np.ndarray | None = None) -> np.ndarray:
    """``arr[rows]`` read in ascending row order (sequential on a memmap), returned in ``rows`` order
    (into ``out`` when given: e.g. a pinned host buffer, sparing a copy)."""
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    raw = arr[rows[order]]
    if out is None:
        out = np.empty_like(raw)
    out[order] = raw
    return out


def read_index(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """index.csv -> column name -> array (ints, floats, or object arrays of str)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(header[: len(INDEX_COLUMNS)]) != INDEX_COLUMNS:
            raise StoreError(f"{path}: index.csv header is {header}, expected {list(INDEX_COLUMNS)}; "
                             "re-run `medvae prepare`")
        rows = list(reader)
    cols = list(zip(*rows)) if rows else [()] * len(header)
    index: dict[str, np.ndarray] = {}
    for name, values in zip(header, cols):
        if name in _INT_COLUMNS:
            index[name] = np.asarray(values, dtype=np.int64)
        elif name in _FLOAT_COLUMNS:
            index[name] = np.asarray(values, dtype=np.float32)
        else:
            index[name] = np.asarray(values, dtype=object)
    return index


def store_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a complete store: its ``store.json``, written last, exists
    (:func:`open_store` may still refuse it: a missing file, another format version)."""
    return (Path(path) / STORE_JSON).is_file()


def open_store(path: str | os.PathLike) -> PatchStore:
    """Open a complete store read-only (arrays memory-mapped).

    Raises:
        StoreError: the directory is missing, ``store.json`` is missing (an incomplete store:
            ``prepare`` was interrupted), a file is missing, or sizes / version disagree.
    """
    path = Path(path)
    if not path.is_dir():
        raise StoreError(f"{path}: no patch store here; create one with `medvae prepare manifest.csv --out {path}`")
    meta_path = path / STORE_JSON
    if not meta_path.is_file():
        raise StoreError(f"{path}: incomplete patch store (store.json missing: `medvae prepare` was interrupted "
                         "or is still running); re-run `medvae prepare`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{meta_path}: unreadable ({err}); re-run `medvae prepare`") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{meta_path}: store format version {meta.get('format_version')}, this medvae reads "
                         f"{FORMAT_VERSION}; re-run `medvae prepare`")
    for name in ("patches.npy", "index.csv"):
        if not (path / name).is_file():
            raise StoreError(f"{path / name}: missing from the store; re-run `medvae prepare`")
    try:
        patches = np.load(path / "patches.npy", mmap_mode="r")
        labels = np.load(path / "labels.npy", mmap_mode="r") if (path / "labels.npy").is_file() else None
    except (ValueError, OSError) as err:
        raise StoreError(f"{path}: patches.npy/labels.npy unreadable ({err}); re-run `medvae prepare`") from None
    index = read_index(path / "index.csv")
    n = int(meta.get("n_patches", -1))
    sizes = {"patches.npy": patches.shape[0], "index.csv": len(index["patient_id"])}
    if labels is not None:
        sizes["labels.npy"] = labels.shape[0]
    if any(s != n for s in sizes.values()):
        raise StoreError(f"{path}: store.json says {n} patches but {sizes}; re-run `medvae prepare`")
    return PatchStore(path, patches, labels, index, meta)


# --------------------------------------------------------------------------- writing
def write_index(path: str | os.PathLike, index: dict[str, np.ndarray | list]) -> None:
    """Atomically write index.csv with the contract's columns (plus any extra ones after them)."""
    names = list(INDEX_COLUMNS) + [k for k in index if k not in INDEX_COLUMNS]
    n = len(index["patient_id"])
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(names)
        cols = [index[k] for k in names]
        for i in range(n):
            w.writerow([_fmt(c[i]) for c in cols])


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.6g}"
    return str(v)


def begin_store(path: str | os.PathLike) -> Path:
    """Create the store directory and remove its ``store.json``: incomplete until :func:`write_store_json`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / STORE_JSON).unlink(missing_ok=True)
    return path


STORE_JSON_REQUIRED = ("content_hash", "n_patches", "patch_size", "channels", "dtype")


def write_store_json(path: str | os.PathLike, meta: dict) -> None:
    """Write ``store.json`` (atomically; the last file of a store): the one writer of it.

    Args:
        path: the store directory.
        meta: must hold ``STORE_JSON_REQUIRED``; ``format_version`` and ``created`` are filled in;
            ``config``, ``normalization``, ``spacing``, ``volumes``, ``problems``, ``classes`` default to empty
            and ``shard`` to None; any other key is kept.
    """
    missing = [k for k in STORE_JSON_REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"store.json for {path}: missing {missing}")
    write_json(Path(path) / STORE_JSON, {
        "format_version": FORMAT_VERSION, "config": {}, "normalization": {}, "spacing": {}, "volumes": [],
        "classes": [],
        "shard": None, "problems": [], "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **meta,
    })


def write_store(path: str | os.PathLike, patches: np.ndarray, index: dict, meta: dict,
                labels: np.ndarray | None = None) -> PatchStore:
    """Write a small store from in-memory arrays (tests, benchmarks; derived stores: :func:`write_derived_store`).

    Args:
        patches: ``(N, C, H, W)`` float in [0, 1]; stored as ``meta["dtype"]`` (default float16).
        index: the INDEX_COLUMNS as sequences of length N.
        meta: store.json keys; ``format_version``, ``n_patches``, ``patch_size``, ``channels``,
            ``dtype`` and ``created`` are filled in; ``normalization`` and ``spacing`` per modality
            and ``content_hash`` should be given (defaults: identity / 1.0 / hash of the arrays).
        labels: ``(N, 1, H, W)`` uint8 or None.
    """
    return _write_arrays(path, to_stored(np.asarray(patches), meta.get("dtype", "float16")), index, meta, labels)


def _write_arrays(path: str | os.PathLike, stored: np.ndarray, index: dict, meta: dict,
                  labels: np.ndarray | None) -> PatchStore:
    """Write ``stored`` (already in ``meta["dtype"]``), labels, index.csv, then store.json; open the store."""
    path = begin_store(path)
    dtype = meta.get("dtype", "float16")
    with atomic_path(path / "patches.npy") as tmp:
        np.save(tmp, stored)
    if labels is not None:
        with atomic_path(path / "labels.npy") as tmp:
            np.save(tmp, np.asarray(labels, dtype=np.uint8))
    else:
        (path / "labels.npy").unlink(missing_ok=True)
    write_index(path / "index.csv", index)
    modalities = sorted(set(map(str, index["modality"])))
    write_store_json(path, {
        "content_hash": hashlib.sha256(stored.tobytes()).hexdigest(),
        "normalization": {m: {"low": 0.0, "high": 1.0, "unit": "counts"} for m in modalities},
        "spacing": {m: [1.0, 1.0] for m in modalities},
        **meta,
        "n_patches": int(stored.shape[0]),
        "patch_size": int(stored.shape[-1]),
        "channels": int(stored.shape[1]),
        "dtype": dtype,
    })
    return open_store(path)


# store.json keys a derived store takes from its source: how its values map back to physical units
# (normalization, spacing, the prepare config, the volumes' own constants), what its class ids mean
# (classes) and how patches are stored (dtype)
DERIVED_META = ("config", "normalization", "spacing", "volumes", "classes", "dtype")
# index columns of an added (synthetic) patch unless given: no patient, slice or position of its own
ADDED_DEFAULTS = {"patient_id": "synthetic", "split": "train", "slice_index": -1, "y": -1, "x": -1,
                  "foreground_fraction": float("nan"), "source": "synthetic"}


def write_derived_store(path: str | os.PathLike, source: PatchStore, rows=None, *, columns: dict | None = None,
                        added: np.ndarray | None = None, added_columns: dict | None = None,
                        added_labels: np.ndarray | None = None, meta: dict | None = None) -> PatchStore:
    """A store made from ``source``: its ``rows`` as they are, then ``added`` patches. The one writer of
    every derived store: a utility cell's subset and synthetic stores, generation's augmented store.

    Args:
        path: the new store's directory.
        source: the store it derives from; its ``DERIVED_META`` keys carry over, so values map to the
            same physical units and class ids mean the same classes in both stores.
        rows: source rows kept, in this order (None: all; empty: none). Their patches are copied as
            stored (no rounding), their index columns (``has_label``, ``class`` and any extra) and label
            maps kept.
        columns: index columns of the kept rows to set or replace: name -> one value or ``len(rows)`` values.
        added: ``(S, C, H, W)`` new patches in [0, 1], already in the source's normalization.
        added_columns: their index columns: name -> one value or S values. ``modality`` is required; the
            other contract columns default to ``ADDED_DEFAULTS``, ``class`` to "" (no class).
        added_labels: ``(S, 1, H, W)`` uint8 label maps of the added patches, or None.
        meta: store.json keys on top: provenance (``augmented``, ``subset_of``, ``synthetic``) and
            ``content_hash`` (default: the hash of the stored patches).

    The index holds every column of either part (a column one part lacks is filled with "");
    ``has_label`` says whether the row has a label map in ``labels.npy``. ``labels.npy`` is written
    when every row has a label map (kept rows of a store with labels, added rows with
    ``added_labels``); when only some would, it is left out with a warning, as a store's label maps
    must cover all of its rows or say which ones they do not (never silently empty masks for
    synthetic patches). ``classes`` is the source's list, with class names of added patches that it
    lacks appended (sorted), so the source's ids stay the same.
    """
    rows = np.arange(len(source), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    dtype = source.meta.get("dtype", "float16")
    n_add = 0 if added is None else len(added)
    parts = [(len(rows), source.labels is not None), (n_add, added_labels is not None)]
    with_labels = any(n and has for n, has in parts) and all(has for n, has in parts if n)
    if not with_labels and any(n and has for n, has in parts):
        log.warning("%s: only some patches have label maps (%s), so the store is written without labels",
                    path, "the added ones" if parts[1][1] else "those of the source")

    kept = {k: np.asarray(v)[rows] for k, v in source.index.items()} if len(rows) else {}
    kept.update({k: _column(v, len(rows)) for k, v in (columns or {}).items()})
    new = {**ADDED_DEFAULTS, **(added_columns or {})} if n_add else {}
    if n_add and "modality" not in (added_columns or {}):
        raise ValueError("write_derived_store: added patches need a modality column")
    new = {k: _column(v, n_add) for k, v in new.items()}
    # has_label: whether the row has a label map in this store's labels.npy
    if with_labels and "has_label" in source.index:
        kept["has_label"] = np.asarray(source.index["has_label"])[rows]
    else:
        kept["has_label"] = np.full(len(rows), int(with_labels), np.int64)
    new["has_label"] = np.full(n_add, int(with_labels), np.int64)
    if "class" in kept or "class" in new:
        kept.setdefault("class", _column("", len(rows)))
        new.setdefault("class", _column("", n_add))
    names = list(INDEX_COLUMNS) + [k for k in (*kept, *new) if k not in INDEX_COLUMNS]
    index = {k: [*kept.get(k, [""] * len(rows)), *new.get(k, [""] * n_add)] for k in dict.fromkeys(names)}

    info = {k: source.meta[k] for k in DERIVED_META if k in source.meta}
    info["dtype"] = dtype
    if "class" in new:  # names of added patches the source does not know go after its own
        known = set(info.get("classes") or [])
        extra = sorted({str(c) for c in new["class"]} - known - {""})
        if extra:
            info["classes"] = [*(info.get("classes") or []), *extra]
    # kept patches as stored (no round trip through [0, 1]); added ones from float32, as float16 cannot hold
    # the uint16 scale
    stored = np.concatenate([read_rows(source.patches, rows),
                             to_stored(np.asarray(added if n_add else source.patches[:0], np.float32), dtype)])
    labels = None
    if with_labels:  # every part with rows has its label maps
        none = np.zeros((0, 1, *stored.shape[2:]), np.uint8)
        labels = np.concatenate([np.asarray(source.labels[rows]) if len(rows) else none,
                                 np.asarray(added_labels, np.uint8) if n_add else none])
    return _write_arrays(path, stored, index, {**info, **(meta or {})}, labels)


def _column(value, n: int) -> np.ndarray:
    """One value repeated ``n`` times, or ``n`` values, as an array."""
    if isinstance(value, (str, int, float, np.integer, np.floating)):
        return np.full(n, value, dtype=object if isinstance(value, str) else None)
    value = np.asarray(value)
    if len(value) != n:
        raise ValueError(f"index column of {len(value)} values for {n} patches")
    return value


def to_stored(x01: np.ndarray, dtype: str) -> np.ndarray:
    """Values in [0, 1] -> the store's dtype (float16, or uint16 scaled by 65535 and rounded)."""
    if dtype == "uint16":
        return np.rint(np.clip(x01, 0.0, 1.0) * UINT16_SCALE).astype(np.uint16)
    if dtype == "float16":
        return np.asarray(x01, dtype=np.float16)
    raise ValueError(f"unknown store dtype {dtype!r}")

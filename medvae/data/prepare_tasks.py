"""What prepare works on: one task per usable manifest row, its result, and the store's content hash.

- ``VolumeTask``: a usable manifest row with paths resolved; its ``digest`` hashes the row and
  the size and mtime of every input file (contents are not read).
- ``PreparedVolume``: one task's patches (in a worker's chunk file or a shard store) plus what
  store.json keeps of it (``record`` / ``from_record``).
- ``content_hash``: of the format version, the config (less ``workers``) and the digests.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medvae.config import PrepareConfig
from medvae.data.manifest import IMAGE_SET_FORMATS, ManifestRow
from medvae.data.store import FORMAT_VERSION, PatchStore
from medvae.errors import ConfigError
from medvae.files import sha256_json

INDEX_ARRAYS = ("slice_index", "y", "x", "foreground_fraction")

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
    class_name: str = ""

    @classmethod
    def from_row(cls, row: ManifestRow, base: Path) -> VolumeTask:
        return cls(str(row.patient_id), str(row.modality), str(row.split), str(row.format),
                   _resolve(row.path, base), _resolve(row.label_path, base), str(row.class_))

    def digest(self) -> str:
        """Hash of the row and of the size and mtime of every input file (contents are not read)."""
        stats = {k: _stat_entries(getattr(self, k)) for k in ("path", "label_path") if getattr(self, k)}
        return sha256_json([dataclasses.asdict(self), stats])


@dataclass
class PreparedVolume:
    """One volume's patches, ready to be copied into the store, and what store.json keeps of it.

    ``source`` is where its arrays are: the path prefix of the worker's ``.npy`` chunk files (a list
    of prefixes, in slice order, for a series prepared by slice ranges), or ``(store, first row)``
    when merging shards. ``first_row`` is set when the store is assembled.
    """

    task: VolumeTask
    position: int  # among the usable manifest rows: the store's volume order
    digest: str
    source: str | list[str] | tuple[PatchStore, int]
    n: int
    channels: int
    n_slices: int
    has_label: bool
    spacing: list[float]  # in-plane (sy, sx) of a patch pixel
    low: float
    high: float
    unit: str
    index: dict[str, np.ndarray]  # the INDEX_ARRAYS columns (image sets: + patient_id, class), length n
    first_row: int = 0
    classes: list[str] = dataclasses.field(default_factory=list)  # class names, in label order

    def record(self) -> dict:
        """The volume's entry in store.json's ``volumes``."""
        return {"position": self.position, "digest": self.digest, **dataclasses.asdict(self.task),
                "n_slices": self.n_slices, "channels": self.channels, "n": self.n, "first_row": self.first_row,
                "has_label": self.has_label, "spacing": self.spacing, "low": self.low, "high": self.high,
                "unit": self.unit, "classes": self.classes}

    @classmethod
    def from_record(cls, rec: dict, store: PatchStore) -> PreparedVolume:
        """A volume of an existing (shard) store, its arrays read from that store when merging."""
        rows = slice(rec["first_row"], rec["first_row"] + rec["n"])
        task = VolumeTask(**{f.name: rec.get(f.name, "") for f in dataclasses.fields(VolumeTask)})
        cols = list(INDEX_ARRAYS) + (["patient_id", "class"] if task.format in IMAGE_SET_FORMATS else [])
        return cls(task, rec["position"], rec["digest"], (store, rec["first_row"]), rec["n"], rec["channels"],
                   rec["n_slices"], rec["has_label"], list(rec["spacing"]), rec["low"], rec["high"], rec["unit"],
                   {c: store.index[c][rows] for c in cols}, classes=list(rec.get("classes", [])))

    def parts(self, kind: str) -> list[np.ndarray]:
        """``patches`` or ``labels`` of this volume (memory-mapped), in pieces that follow one another."""
        if isinstance(self.source, tuple):
            store, first = self.source
            arr = store.patches if kind == "patches" else store.labels
            return [arr[first : first + self.n]]
        prefixes = [self.source] if isinstance(self.source, str) else self.source
        return [np.load(f"{p}.{kind}.npy", mmap_mode="r") for p in prefixes]


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

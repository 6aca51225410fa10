"""The manifest: one CSV row per scan, problems included; patient-level, hash-based splits.

Schema (the "Manifest" contract of docs/architecture.md, explained column by column in data_manifests/README.md)::

    patient_id, modality, format, path, label_path, series_uid, split,
    n_slices, spacing_z, spacing_y, spacing_x, status, problem, class, n_images, plane

``class``, ``n_images`` and ``plane`` are optional (older manifests without them read as empty).
A 2D image set is one row per image file (``format=image``, its ``class``) or one row per IDX
file / npz split (``format=idx|npz``, ``n_images`` images, classes per image inside the file).

A row with ``status=ok`` is a usable scan; ``status=problem`` carries a readable ``problem`` and
may leave the other columns blank. A patient's split depends only on its id and the seed, so it
stays put when patients are added, and every scan of a patient shares it; small cohorts are
repaired so that every requested split gets a patient (:func:`assign_splits`).
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import get_args

from medvae.config import Modality
from medvae.errors import InputError
from medvae.files import atomic_open

MODALITIES = get_args(Modality)  # written once, as the config's Literal
FORMATS = ("dicom", "nifti", "tiff", "image", "idx", "npz")
IMAGE_SET_FORMATS = ("image", "idx", "npz")  # 2D image sets: no volume, images kept as they are
SPLITS = ("train", "val", "test")
STATUSES = ("ok", "problem")


@dataclass
class ManifestRow:
    """One scan. Numbers are None where unknown (problem rows); strings are "" where unknown."""

    patient_id: str
    modality: str = ""
    format: str = ""
    path: str = ""
    label_path: str = ""
    series_uid: str = ""
    split: str = ""
    n_slices: int | None = None
    spacing_z: float | None = None
    spacing_y: float | None = None
    spacing_x: float | None = None
    status: str = "ok"
    problem: str = ""
    class_: str = ""  # CSV column "class": the image's class name (image rows of a labelled set)
    n_images: int | None = None  # 2D images the row holds (IDX file, npz split); 1 for an image file
    plane: str = ""  # acquisition plane of a volume (axial | sagittal | coronal | oblique), "" if unknown

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def spacing(self) -> tuple[float, float, float] | None:
        """``(z, y, x)`` in mm (CT/MR) or µm (microscopy), or None if unknown."""
        s = (self.spacing_z, self.spacing_y, self.spacing_x)
        return None if any(v is None for v in s) else s  # type: ignore[return-value]


COLUMNS = tuple(f.name.rstrip("_") for f in fields(ManifestRow))  # the CSV header, in this order
OPTIONAL_COLUMNS = ("class", "n_images", "plane")  # may be absent from older manifests
_FIELD = {f.name.rstrip("_"): f.name for f in fields(ManifestRow)}


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, ".10g")
    return str(value)


def _problem(where: str, line: int, column: str, message: str) -> str:
    return f"{where}: line {line}, column '{column}': {message}"


def _check_row(row: ManifestRow, where: str, line: int) -> list[str]:
    """Every problem of one row, each naming file, line and column."""
    errs = []
    if not row.patient_id.strip():
        errs.append(_problem(where, line, "patient_id", "empty"))
    if row.status not in STATUSES:
        errs.append(_problem(where, line, "status", f"{row.status!r} is not one of {'|'.join(STATUSES)}"))
    if row.modality and row.modality not in MODALITIES:
        errs.append(
            _problem(where, line, "modality", f"{row.modality!r} is not one of {'|'.join(MODALITIES)}")
        )
    if row.format and row.format not in FORMATS:
        errs.append(_problem(where, line, "format", f"{row.format!r} is not one of {'|'.join(FORMATS)}"))
    if row.split and row.split not in SPLITS:
        errs.append(_problem(where, line, "split", f"{row.split!r} is not one of {'|'.join(SPLITS)}"))
    if row.status == "problem" and not row.problem.strip():
        errs.append(_problem(where, line, "problem", "a problem row must say what the problem is"))
    if row.status == "ok":
        for col in ("modality", "format", "path", "split"):
            if not getattr(row, col):
                errs.append(_problem(where, line, col, "required when status is ok"))
        for col in ("n_slices", "n_images"):
            v = getattr(row, col)
            if v is not None and v < 1:
                errs.append(_problem(where, line, col, f"{v} is not a positive count"))
        for col in ("spacing_z", "spacing_y", "spacing_x"):
            v = getattr(row, col)
            if v is not None and not v > 0:
                errs.append(_problem(where, line, col, f"{v} is not a positive spacing"))
    return errs


def _check_patients(rows: Sequence[ManifestRow], where: str, lines: Sequence[int]) -> list[str]:
    """A patient may have several scans but only one split."""
    seen: dict[str, tuple[str, int]] = {}
    errs = []
    for row, line in zip(rows, lines, strict=True):
        if not row.split:
            continue
        first = seen.setdefault(row.patient_id, (row.split, line))
        if first[0] != row.split:
            errs.append(
                _problem(
                    where,
                    line,
                    "split",
                    f"patient {row.patient_id} is in {row.split!r} here but "
                    f"in {first[0]!r} on line {first[1]}; a patient belongs to one split",
                )
            )
    return errs


def _parse(raw: Mapping[str, str], where: str, line: int) -> tuple[ManifestRow, list[str]]:
    values: dict = {c: (raw.get(c) or "").strip() for c in COLUMNS}
    errs = []
    for col, kind in (("n_slices", int), ("spacing_z", float), ("spacing_y", float), ("spacing_x", float),
                      ("n_images", int)):
        text = values[col]
        try:
            values[col] = kind(text) if text else None
        except ValueError:
            errs.append(
                _problem(where, line, col, f"{text!r} is not a{'n integer' if kind is int else ' number'}")
            )
            values[col] = None
    values["status"] = values["status"] or "ok"
    return ManifestRow(**{_FIELD[k]: v for k, v in values.items()}), errs


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Read and validate a manifest CSV.

    Raises:
        InputError: the file is missing or unreadable, its header lacks or adds columns, or rows
            are invalid; the message names the file and each bad line and column (first 10).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"manifest {path} does not exist; write one with `medvae discover SCANS --out {path}`"
        )
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            raws = [(reader.line_num, r) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"manifest {path} cannot be read as CSV: {err}") from None
    missing = [c for c in COLUMNS if c not in header and c not in OPTIONAL_COLUMNS]
    extra = [c for c in header if c not in COLUMNS]
    if missing or extra:
        what = "; ".join(
            s
            for s in (
                f"missing columns {missing}" if missing else "",
                f"unknown columns {extra}" if extra else "",
            )
            if s
        )
        raise InputError(f"manifest {path}: {what}; the columns are {', '.join(COLUMNS)}")
    rows, lines, errs = [], [], []
    for line, raw in raws:
        if not any((v or "").strip() for k, v in raw.items() if k is not None):
            continue  # blank line
        if None in raw:
            errs.append(
                _problem(str(path), line, "problem", f"row has {len(raw[None])} more fields than the header")
            )
        row, row_errs = _parse({k.strip(): v for k, v in raw.items() if k is not None}, str(path), line)
        errs += row_errs + _check_row(row, str(path), line)
        rows.append(row)
        lines.append(line)
    errs += _check_patients(rows, str(path), lines)
    if errs:
        more = f" (and {len(errs) - 10} more)" if len(errs) > 10 else ""
        raise InputError("invalid manifest: " + "; ".join(errs[:10]) + more)
    return rows


def write_manifest(rows: Iterable[ManifestRow], path: str | os.PathLike) -> Path:
    """Validate ``rows`` and write them atomically as CSV (the COLUMNS, in order)."""
    path = Path(path)
    rows = list(rows)
    errs = [e for i, r in enumerate(rows) for e in _check_row(r, str(path), i + 2)]
    errs += _check_patients(rows, str(path), range(2, len(rows) + 2))
    if errs:
        raise ValueError("refusing to write an invalid manifest: " + "; ".join(errs[:10]))
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in rows:
            d = asdict(row)
            writer.writerow([_fmt(d[_FIELD[c]]) for c in COLUMNS])
    return path


def _fractions(fractions) -> tuple[float, float, float]:
    if hasattr(fractions, "train"):  # SplitConfig
        fractions = (fractions.train, fractions.val, fractions.test)
    elif isinstance(fractions, Mapping):
        fractions = (fractions.get("train", 0.0), fractions.get("val", 0.0), fractions.get("test", 0.0))
    train, val, test = (float(v) for v in fractions)
    if min(train, val, test) < 0 or abs(train + val + test - 1) > 1e-6:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {train}, {val}, {test}")
    return train, val, test


def split_position(patient_id: str, seed: int) -> float:
    """Uniform in [0, 1), from SHA-256 of ``"{seed}:{patient_id}"`` (no other input)."""
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(patient_id: str, seed: int = 0, fractions=(0.7, 0.15, 0.15)) -> str:
    """The patient's split: ``train`` | ``val`` | ``test``.

    Depends only on ``patient_id``, ``seed`` and the fractions, never on the other patients, so
    adding patients moves nobody. ``fractions``: (train, val, test), a dict, or a SplitConfig.
    """
    train, val, _ = _fractions(fractions)
    pos = split_position(patient_id, seed)
    return "train" if pos < train else "val" if pos < train + val else "test"


def assign_splits(patient_ids: Iterable[str], seed: int = 0, fractions=(0.7, 0.15, 0.15),
                  fixed: Mapping[str, str] | None = None) -> dict[str, str]:
    """Splits of a whole cohort: :func:`assign_split` per patient, repaired so small cohorts get every split.

    The rule (docs/architecture.md, data_manifests/README.md): every patient starts in its hash
    split. If a split with a non-zero fraction is empty and the cohort has at least as many
    patients as such splits, the patient whose hash position lies nearest to that split's
    interval of [0, 1) moves into it (ties: the smaller id), taken only from a split that keeps at
    least one patient; splits are repaired in the order test, val, train. Patients in ``fixed``
    (a reference manifest's splits) keep theirs and count toward their split. Deterministic; when
    patients are added, only patients that were moved by a repair can change split (back to their
    hash split, once the cohort fills that split by itself); large cohorts are never repaired.

    Returns:
        patient id -> ``train`` | ``val`` | ``test`` for every id in ``patient_ids`` and ``fixed``.
    """
    fr = _fractions(fractions)
    fixed = dict(fixed or {})
    pids = sorted(set(patient_ids) - set(fixed))
    out = {p: assign_split(p, seed, fr) for p in pids}
    out.update(fixed)
    wanted = [s for s, f in zip(SPLITS, fr) if f > 0]
    if len(out) < len(wanted):
        return out
    bounds = dict(zip(SPLITS, zip((0.0, fr[0], fr[0] + fr[1]), (fr[0], fr[0] + fr[1], 1.0))))
    pos = {p: split_position(p, seed) for p in pids}
    for target in ("test", "val", "train"):
        counts = {s: sum(v == s for v in out.values()) for s in SPLITS}
        if target not in wanted or counts[target]:
            continue
        lo, hi = bounds[target]
        movable = [p for p in pids if counts[out[p]] > 1]
        if not movable:
            continue
        best = min(movable, key=lambda p: (max(lo - pos[p], pos[p] - hi, 0.0), p))
        out[best] = target
    return out

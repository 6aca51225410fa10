"""Scan-directory layouts -> manifest rows, from headers only.

Recognised, anywhere under the root (a root may hold several, as the phantom cohort does):

- TCIA / DICOM trees: ``PANCREAS_0001/<study>/<series>/*.dcm`` (any folder whose subfolders hold
  DICOM series at most two levels down counts as a folder of patients; ``PANCREAS_\\d+`` folders
  always do, even empty). Labels ``label0001.nii.gz`` -> ``PANCREAS_0001`` from ``--labels`` or a
  ``*label*`` folder next to (or inside) the tree.
- MSD: ``imagesTr/``, ``labelsTr/``, ``imagesTs/``, ``dataset.json`` (``._*`` macOS junk ignored).
- Flat NIfTI folders (one scan per file) and TIFF folders (microscopy, one stack per file).

Every scan becomes a row; a scan that cannot be used is a ``status=problem`` row with a readable
reason, never a crash. DICOM identity (names, birth dates, ids) never reaches rows or output:
only shapes, spacings, modality and the SeriesInstanceUID are taken from headers.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from medvae.config import DiscoverConfig, SplitConfig
from medvae.data.manifest import ManifestRow, assign_split, read_manifest
from medvae.errors import ConfigError, InputError
from medvae.io.dicom import default_patient_id, inspect_dicom_series
from medvae.io.nifti import inspect_nifti
from medvae.io.tiff import inspect_tiff

log = logging.getLogger(__name__)

_PATIENT_DIR = re.compile(r"PANCREAS_\d+", re.IGNORECASE)
_LABEL_STEM = re.compile(r"label_?(\d+)", re.IGNORECASE)
_JUNK = {"thumbs.db", "desktop.ini", "dicomdir"}
_DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}
_KNOWN_SIDECARS = {"dataset.json"}
_MR_WORDS = ("MR", "MRI", "T1", "T2", "FLAIR", "ADC", "DWI", "PD")


def _file_kind(p: Path) -> str | None:
    """``nifti`` | ``tiff`` | ``dicom`` | ``other``, or None for junk that is silently ignored."""
    name = p.name.lower()
    if name.startswith(".") or name in _JUNK:
        return None
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".tif", ".tiff")):
        return "tiff"
    if p.suffix.lower() in _DICOM_SUFFIXES:
        return "dicom"
    if not p.suffix or p.suffix[1:].isdigit():  # extensionless DICOM (IM0001, 1.2.840...): check the magic
        try:
            with open(p, "rb") as f:
                if f.read(132)[128:] == b"DICM":
                    return "dicom"
        except OSError:
            pass
    return "other"


@dataclass
class _Dir:
    subdirs: list[Path] = field(default_factory=list)
    files: dict[str, list[Path]] = field(
        default_factory=lambda: {"nifti": [], "tiff": [], "dicom": [], "other": []}
    )
    dicom_depth: int = -1  # deepest folder below (0 = here) that holds DICOM files; -1 none
    pure_dicom: bool = True  # no NIfTI/TIFF anywhere below
    n_files: int = 0  # any non-junk file below


def _index(root: Path) -> dict[Path, _Dir]:
    """One walk of the tree: files by kind per folder, plus bottom-up DICOM depth and purity."""
    idx: dict[Path, _Dir] = {}
    for top, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        node = idx.setdefault(Path(top), _Dir())
        node.subdirs = [Path(top) / d for d in dirs]
        for name in sorted(names):
            kind = _file_kind(Path(top) / name)
            if kind:
                node.files[kind].append(Path(top) / name)
    for path in sorted(idx, key=lambda p: len(p.parts), reverse=True):
        node = idx[path]
        children = [idx[s] for s in node.subdirs if s in idx]
        node.dicom_depth = (
            0
            if node.files["dicom"]
            else max([c.dicom_depth + 1 for c in children if c.dicom_depth >= 0], default=-1)
        )
        node.pure_dicom = (
            not node.files["nifti"] and not node.files["tiff"] and all(c.pure_dicom for c in children)
        )
        node.n_files = sum(len(v) for v in node.files.values()) + sum(c.n_files for c in children)
    return idx


@dataclass
class _Source:
    kind: str  # dicom | msd | nifti | tiff
    root: Path
    items: list[Path] = field(default_factory=list)  # DICOM patient folders or NIfTI/TIFF files


def _is_label_dir(p: Path) -> bool:
    return "label" in p.name.lower()


def _classify(d: Path, idx: dict[Path, _Dir], ignored: list[Path]) -> list[_Source]:
    """The layouts under ``d`` (the module doc lists them); unknown files go to ``ignored``."""
    node = idx[d]
    names = {s.name for s in node.subdirs}
    if "imagesTr" in names or "imagesTs" in names:
        return [_Source("msd", d)]
    ignored += [f for f in node.files["other"] if f.name.lower() not in _KNOWN_SIDECARS]
    if node.files["dicom"]:  # a series folder itself (the reader walks what is below it)
        return [_Source("dicom", d, [d])]
    sources = []
    if node.files["nifti"]:
        sources.append(_Source("nifti", d, node.files["nifti"]))
    if node.files["tiff"]:
        sources.append(_Source("tiff", d, node.files["tiff"]))
    patients, rest = [], []
    for s in node.subdirs:
        if _is_label_dir(s):  # label maps, found by the scans they belong to
            continue
        sub = idx[s]
        is_patient = _PATIENT_DIR.fullmatch(s.name) or (0 <= sub.dicom_depth <= 2 and sub.pure_dicom)
        (patients if is_patient else rest).append(s)
    if patients:  # a folder of patients: its empty subfolders are patients without scans
        patients += [s for s in rest if idx[s].n_files == 0]
        rest = [s for s in rest if idx[s].n_files > 0]
        sources.append(_Source("dicom", d, sorted(patients)))
    for s in rest:
        sources += _classify(s, idx, ignored)
    return sources


def _stem(p: Path) -> str:
    name = p.name
    for suffix in (".nii.gz", ".nii", ".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return p.stem


class _Labels:
    """Label maps by patient: same file stem, or ``label0001`` -> any id ending in number 1."""

    def __init__(self, dirs: list[Path]):
        self.by_stem: dict[str, Path] = {}
        self.by_number: dict[int, Path] = {}
        for d in dirs:
            for p in sorted(d.iterdir()) if d.is_dir() else []:
                if _file_kind(p) != "nifti":
                    continue
                self.by_stem.setdefault(_stem(p).lower(), p)
                m = _LABEL_STEM.fullmatch(_stem(p))
                if m:
                    self.by_number.setdefault(int(m.group(1)), p)
        self.used: set[Path] = set()

    def find(self, patient_id: str) -> Path | None:
        hit = self.by_stem.get(patient_id.lower())
        if hit is None:
            digits = re.findall(r"\d+", patient_id)
            hit = self.by_number.get(int(digits[-1])) if digits else None
        if hit is not None:
            self.used.add(hit)
        return hit

    @property
    def unused(self) -> list[Path]:
        return sorted(set(self.by_stem.values()) - self.used)


def _label_dirs(source: _Source, labels: Path | None, scans_root: Path) -> list[Path]:
    """``--labels``, else ``*label*`` folders inside the source folder or beside it. Beside the
    user's root itself only for DICOM trees (TCIA ships ``Pancreas-CT/`` next to its label folder)."""
    if labels is not None:
        return [labels]
    near = list(source.root.iterdir())
    if source.root != scans_root or source.kind == "dicom":
        near += list(source.root.parent.iterdir())
    return sorted({p for p in near if p.is_dir() and _is_label_dir(p) and p.name != "labelsTr"})


def _inspect(row: ManifestRow, path: Path, label: Path | None, modality: str) -> ManifestRow:
    """Fill ``row`` from the scan's header (and check its label); a failure makes it a problem row."""
    try:
        if row.format == "dicom":
            info = inspect_dicom_series(path)
        elif row.format == "nifti":
            info = inspect_nifti(path, modality=modality)
        else:
            info = inspect_tiff(path)
        notes = list(info.warnings)
        if label is not None:
            lab = inspect_nifti(label, modality=info.modality)
            if tuple(lab.shape) != tuple(info.shape):
                notes.append(
                    f"label {label.name} has shape {tuple(lab.shape)} but the scan {tuple(info.shape)}; "
                    "label not used"
                )
                label = None
    except InputError as err:
        row.status, row.problem = "problem", str(err)
        return row
    except Exception as err:  # a scan that cannot be used is a row, never a crash
        log.debug("cannot use %s", path, exc_info=True)
        row.status, row.problem = "problem", f"{path}: cannot be read ({type(err).__name__}: {err})"
        return row
    row.modality = info.modality or modality
    row.series_uid = info.series_uid
    row.n_slices = int(info.shape[0])
    row.spacing_z, row.spacing_y, row.spacing_x = (float(s) for s in info.spacing)
    row.label_path = str(label.resolve()) if label else ""
    row.problem = "; ".join(notes)
    return row


def _msd_modality(meta: dict) -> str:
    values = " ".join(str(v) for v in (meta.get("modality") or {}).values()).upper().split()
    return "mr" if any(v in _MR_WORDS for v in values) else "ct"


def _msd_rows(src: _Source, modality: str, ignored: list[Path], problems: list[ManifestRow]) -> list[tuple]:
    """``(row, path, label)`` for each image of an MSD task folder; listed-but-missing images are problems."""
    root, meta = src.root, {}
    if (root / "dataset.json").is_file():
        try:
            meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            log.warning("%s: unreadable dataset.json (%s); using the folders only", root, err)
    mod = _msd_modality(meta) if modality == "auto" else modality
    todo = []
    for part, label_dir in (("imagesTr", root / "labelsTr"), ("imagesTs", None)):
        for p in sorted((root / part).iterdir()) if (root / part).is_dir() else []:
            kind = _file_kind(p)
            if kind != "nifti":
                if kind:
                    ignored.append(p)
                continue
            pid, ext = _stem(p), p.name[len(_stem(p)) :]
            # nnU-Net names channels: imagesTr/case_0000.nii.gz goes with labelsTr/case.nii.gz.
            channel = re.fullmatch(r"(.+)_\d{4}", pid)
            if channel and label_dir is not None and (label_dir / (channel[1] + ext)).is_file():
                pid = channel[1]
            label = label_dir / (pid + ext) if label_dir is not None else None
            row = ManifestRow(pid, mod, "nifti", str(p.resolve()))
            todo.append((row, p, label if label is not None and label.is_file() else None))
    on_disk = {r.patient_id for r, _, _ in todo} | {_stem(p) for _, p, _ in todo}
    for entry in meta.get("training", []) + [{"image": t} for t in meta.get("test", [])]:
        image = entry.get("image", "") if isinstance(entry, dict) else ""
        if image and _stem(Path(image)) not in on_disk:
            problems.append(
                ManifestRow(
                    _stem(Path(image)),
                    mod,
                    "nifti",
                    str((root / image).resolve()),
                    status="problem",
                    problem=f"listed in {root / 'dataset.json'} but missing on disk",
                )
            )
    return todo


@dataclass
class Discovery:
    """What discovery found: manifest rows plus what was left aside and the reconciliation."""

    rows: list[ManifestRow]
    ignored: list[Path] = field(default_factory=list)
    unused_labels: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the reference, not found
    extra: list[str] = field(default_factory=list)  # found, not in the reference
    reference: Path | None = None


MODALITIES = ("auto", "ct", "microscopy", "mr")


def _config(modality: str, config: DiscoverConfig | None) -> DiscoverConfig:
    if modality not in MODALITIES:
        raise ConfigError(f"--modality {modality!r}: expected one of {'|'.join(MODALITIES)}")
    config = config or DiscoverConfig()
    return config if modality == "auto" else config.model_copy(update={"modality": modality})


def run_discovery(
    scans_dir, labels=None, modality: str = "auto", reference=None, config: DiscoverConfig | None = None
) -> Discovery:
    """Discover scans under ``scans_dir`` (see the module doc); the full report behind :func:`discover`."""
    cfg = _config(modality, config)
    root = Path(scans_dir)
    if not root.is_dir():
        raise InputError(
            f"{root}: {'not a directory' if root.exists() else 'no such directory'}; "
            "pass the folder that holds your scans (TCIA, MSD, NIfTI or TIFF)"
        )
    if labels is not None and not Path(labels).is_dir():
        raise InputError(f"--labels {labels}: no such directory")
    ref_rows = read_manifest(reference) if reference is not None else []
    idx = _index(root)
    ignored: list[Path] = []
    sources = _classify(root, idx, ignored)
    wanted = cfg.modality
    todo: list[tuple[ManifestRow, Path, Path | None]] = []
    rows: list[ManifestRow] = []
    unused: list[Path] = []
    for src in sources:
        if (src.kind == "tiff") != (wanted == "microscopy") and wanted != "auto":
            continue  # TIFF folders are microscopy; DICOM, MSD and NIfTI are CT/MR
        if src.kind == "msd":
            todo += _msd_rows(src, wanted, ignored, rows)
            continue
        lab = None
        if src.kind != "tiff" or labels is not None:
            lab = _Labels(_label_dirs(src, Path(labels) if labels is not None else None, root))
        for item in src.items:
            if src.kind == "dicom":
                pid, mod = default_patient_id(item), "ct" if _PATIENT_DIR.fullmatch(item.name) else ""
            elif src.kind == "tiff":
                pid, mod = _stem(item), "microscopy"
            else:
                pid, mod = _stem(item), "ct" if wanted == "auto" else wanted
            todo.append(
                (ManifestRow(pid, mod, src.kind, str(item.resolve())), item, lab.find(pid) if lab else None)
            )
        unused += lab.unused if lab else []
    for row, path, label in todo:
        row = _inspect(row, path, label, row.modality or "ct")
        if wanted != "auto" and row.ok and row.modality != wanted:
            log.info("skipping %s: modality %s, not the requested %s", path, row.modality, wanted)
            continue
        rows.append(row)
    rows.sort(key=lambda r: (r.patient_id, r.path))
    found = Discovery(rows, sorted(set(ignored)), unused, reference=Path(reference) if reference else None)
    _assign_splits(found, ref_rows, cfg.split, root)
    for p in found.ignored:
        log.debug("ignored %s: not a scan format medvae reads (DICOM, NIfTI, TIFF)", p)
    return found


def _assign_splits(found: Discovery, ref_rows: list[ManifestRow], split: SplitConfig, root: Path) -> None:
    """Hash splits per patient; the reference's split wins for patients it lists. Missing ones become rows."""
    ref = {}
    for r in ref_rows:
        ref.setdefault(r.patient_id, r)
    for row in found.rows:
        listed = ref.get(row.patient_id)
        row.split = (
            listed.split
            if listed is not None and listed.split
            else assign_split(row.patient_id, split.seed, split)
        )
    if found.reference is None:
        return
    have = {r.patient_id for r in found.rows}
    found.missing = sorted(p for p in ref if p not in have)
    found.extra = sorted(have - set(ref))
    for pid in found.missing:
        r = ref[pid]
        why = f"listed in reference {found.reference.name} but not found under {root}"
        found.rows.append(
            ManifestRow(
                pid,
                r.modality,
                r.format,
                "",
                split=r.split or assign_split(pid, split.seed, split),
                status="problem",
                problem=why + (f" (reference: {r.problem})" if r.problem else ""),
            )
        )
    found.rows.sort(key=lambda r: (r.patient_id, r.path))


def discover(
    scans_dir, labels=None, modality: str = "auto", reference=None, config: DiscoverConfig | None = None
) -> list[ManifestRow]:
    """Manifest rows for every scan under ``scans_dir`` (problems as ``status=problem`` rows).

    Args:
        scans_dir: a TCIA/DICOM tree, an MSD task folder, a NIfTI or TIFF folder, or a folder of these.
        labels: folder of label maps; default: ``*label*`` folders next to the scans.
        modality: ``auto`` or keep only ``ct`` | ``mr`` | ``microscopy`` (also the NIfTI modality).
        reference: a reference manifest: its split wins for the patients it lists; patients it lists
            that are not found become problem rows.
        config: split fractions and seed (DiscoverConfig).

    Raises:
        InputError: ``scans_dir`` (or ``labels``) is not a directory, or the reference is invalid.
    """
    return run_discovery(scans_dir, labels, modality, reference, config).rows

"""Scan-directory layouts -> manifest rows, from headers only.

The layouts (TCIA/DICOM trees, MSD task folders, flat NIfTI and TIFF folders) and the label-map
matching are in :mod:`medvae.data.layouts`; this module reads each scan's header into a row and
reconciles the rows with a reference manifest.

Every scan becomes a row; a scan that cannot be used is a ``status=problem`` row with a readable
reason, never a crash. DICOM identity (names, birth dates, ids) never reaches rows or output:
only shapes, spacings, modality and the SeriesInstanceUID are taken from headers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

from medvae.config import DiscoverConfig, SplitConfig
from medvae.data.image_sets import bulk_rows, image_set_rows, is_split_known
from medvae.data.layouts import LabelMaps, classify, index_tree, label_dirs, msd_rows, split_dirs
from medvae.data.manifest import ManifestRow, assign_split, assign_splits, read_manifest
from medvae.errors import ConfigError, InputError
from medvae.io.dicom import PATIENT_DIR, default_patient_id, inspect_dicom_series
from medvae.io.formats import scan_stem
from medvae.io.nifti import inspect_nifti
from medvae.io.tiff import inspect_tiff

log = logging.getLogger(__name__)


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
    row.plane = info.plane
    row.spacing_z, row.spacing_y, row.spacing_x = (float(s) for s in info.spacing)
    row.label_path = str(label.resolve()) if label else ""
    row.problem = "; ".join(notes)
    return row


@dataclass
class Discovery:
    """What discovery found: manifest rows plus what was left aside and the reconciliation."""

    rows: list[ManifestRow]
    ignored: list[Path] = field(default_factory=list)
    unused_labels: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the reference, not found
    extra: list[str] = field(default_factory=list)  # found, not in the reference
    reference: Path | None = None


MODALITIES = get_args(DiscoverConfig.model_fields["modality"].annotation)  # "auto" and config.Modality


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
    idx = index_tree(root)
    ignored: list[Path] = []
    sources = classify(root, idx, ignored)
    wanted = cfg.modality
    todo: list[tuple[ManifestRow, Path, Path | None]] = []
    rows: list[ManifestRow] = []
    unused: list[Path] = []
    for src in sources:
        if src.kind in ("images", "idx", "npz"):  # 2D image sets: any modality may be asked for
            sets = image_set_rows(src, wanted, split_dirs(src.root, idx)) if src.kind == "images" else \
                bulk_rows(src, wanted)
            rows += sets
            continue
        if (src.kind == "tiff") != (wanted == "microscopy") and wanted != "auto":
            continue  # TIFF folders are microscopy; DICOM, MSD and NIfTI are CT/MR
        if src.kind == "msd":
            todo += msd_rows(src, wanted, ignored, rows)
            continue
        lab = None
        if src.kind != "tiff" or labels is not None:
            lab = LabelMaps(label_dirs(src, Path(labels) if labels is not None else None, root))
        for item in src.items:
            if src.kind == "dicom":
                pid, mod = default_patient_id(item), "ct" if PATIENT_DIR.fullmatch(item.name) else ""
            elif src.kind == "tiff":
                pid, mod = scan_stem(item), "microscopy"
            else:
                pid, mod = scan_stem(item), "ct" if wanted == "auto" else wanted
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
    """Splits per patient (:func:`assign_splits`: hash, small cohorts repaired); a dataset's own
    split (image-set folders, IDX, npz) and then the reference's split win. Missing ones become rows."""
    ref = {}
    for r in ref_rows:
        ref.setdefault(r.patient_id, r)
    fixed = {r.patient_id: r.split for r in found.rows if is_split_known(r)}
    fixed.update({p: r.split for p, r in ref.items() if r.split})
    cohort = {r.patient_id for r in found.rows if r.ok and r.patient_id not in fixed}
    # the repair sees the whole cohort of usable scans; bulk rows (IDX, npz) are datasets, not patients
    patients = {r.patient_id for r in found.rows if r.ok and r.format not in ("idx", "npz")}
    usable_fixed = {p: s for p, s in fixed.items() if p in patients}
    splits = assign_splits(cohort, split.seed, split, usable_fixed) if cohort else {}
    for row in found.rows:
        row.split = fixed.get(row.patient_id) or splits.get(row.patient_id) or assign_split(
            row.patient_id, split.seed, split)
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

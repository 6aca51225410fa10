"""Where the scans are: one walk of a scan tree, its layouts, and the label maps that go with them.

Layouts recognised anywhere under a root (a root may hold several, as the phantom cohort does):

- TCIA / DICOM trees: ``PANCREAS_0001/<study>/<series>/*.dcm`` (any folder whose subfolders hold
  DICOM series at most two levels down counts as a folder of patients; ``PANCREAS_\\d+`` folders
  always do, even empty). Labels ``label0001.nii.gz`` -> ``PANCREAS_0001`` from ``--labels`` or a
  ``*label*`` folder next to (or inside) the tree.
- MSD: ``imagesTr/``, ``labelsTr/``, ``imagesTs/``, ``dataset.json`` (``._*`` macOS junk ignored).
- Flat NIfTI folders (one scan per file) and TIFF folders (microscopy, one stack per file).
- 2D image sets (rows built by :mod:`medvae.data.image_sets`): a folder of PNG / JPEG / BMP
  images; an ImageFolder (two or more class folders of images); a folder with ``labels.csv``;
  a folder whose ``train/`` ``val/`` ``test/`` subfolders are any of these (single-page TIFFs
  count as images there; a folder of TIFFs alone stays a folder of microscopy stacks); IDX files
  (``*-images-idx3-ubyte[.gz]``); ``.npz`` files.

Nothing here opens a scan's header: :mod:`medvae.data.discover` does that for the rows it builds.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from medvae.data.manifest import ManifestRow
from medvae.io.dicom import PATIENT_DIR
from medvae.io.formats import NIFTI_SUFFIXES, TIFF_SUFFIXES, scan_stem
from medvae.io.images2d import IDX_IMAGES, IDX_LABELS, IMAGE_SUFFIXES

log = logging.getLogger("medvae.data.discover")

_LABEL_STEM = re.compile(r"label_?(\d+)", re.IGNORECASE)
_JUNK = {"thumbs.db", "desktop.ini", "dicomdir"}
_DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}
_KNOWN_SIDECARS = {"dataset.json", "labels.csv"}
SPLIT_DIRS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
              "test": "test", "testing": "test"}
_MR_WORDS = ("MR", "MRI", "T1", "T2", "FLAIR", "ADC", "DWI", "PD")


def file_kind(p: Path) -> str | None:
    """``nifti`` | ``tiff`` | ``dicom`` | ``image`` | ``idx`` | ``npz`` | ``other``, or None for junk
    that is silently ignored."""
    name = p.name.lower()
    if name.startswith(".") or name in _JUNK:
        return None
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    if name.endswith(".npz"):
        return "npz"
    if IDX_IMAGES.fullmatch(name) or IDX_LABELS.fullmatch(name):
        return "idx"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(TIFF_SUFFIXES):
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
        default_factory=lambda: {k: [] for k in ("nifti", "tiff", "dicom", "image", "idx", "npz", "other")}
    )
    dicom_depth: int = -1  # deepest folder below (0 = here) that holds DICOM files; -1 none
    pure_dicom: bool = True  # no NIfTI/TIFF anywhere below
    n_files: int = 0  # any non-junk file below


def index_tree(root: Path) -> dict[Path, _Dir]:
    """One walk of the tree: files by kind per folder, plus bottom-up DICOM depth and purity."""
    idx: dict[Path, _Dir] = {}
    for top, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        node = idx.setdefault(Path(top), _Dir())
        node.subdirs = [Path(top) / d for d in dirs]
        for name in sorted(names):
            kind = file_kind(Path(top) / name)
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
class Source:
    kind: str  # dicom | msd | nifti | tiff | images | idx | npz
    root: Path
    items: list[Path] = field(default_factory=list)  # DICOM patient folders or NIfTI/TIFF/IDX/npz files


def _is_label_dir(p: Path) -> bool:
    return "label" in p.name.lower()


def _images_here(node: _Dir, tiff: bool) -> bool:
    return bool(node.files["image"] or (tiff and node.files["tiff"])) and not node.files["dicom"] \
        and not node.files["nifti"]


def _is_class_parent(d: Path, idx: dict[Path, _Dir], tiff: bool) -> bool:
    """Two or more subfolders holding only images (and no deeper folders): an ImageFolder."""
    subs = [idx[s] for s in idx[d].subdirs if s in idx and idx[s].n_files]
    return len(subs) >= 2 and all(_images_here(s, tiff) and not s.subdirs for s in subs) and (
        tiff or any(s.files["image"] for s in subs))


def _is_image_folder(d: Path, idx: dict[Path, _Dir], tiff: bool) -> bool:
    node = idx[d]
    if (d / "labels.csv").is_file():
        return True
    if node.files["image"] and not node.files["dicom"] and not node.files["nifti"]:
        return True
    return _is_class_parent(d, idx, tiff) or (tiff and _images_here(node, tiff))


def split_dirs(d: Path, idx: dict[Path, _Dir]) -> dict[Path, str]:
    """``train/`` ``val/`` ``test/`` (and spelling variants) subfolders of ``d`` -> their split."""
    return {s: SPLIT_DIRS[s.name.lower()] for s in idx[d].subdirs if s.name.lower() in SPLIT_DIRS}


def is_image_set(d: Path, idx: dict[Path, _Dir]) -> bool:
    """Whether ``d`` is the root of a 2D image set (the module doc lists the layouts)."""
    if _is_image_folder(d, idx, tiff=False):
        return True
    splits = [s for s in split_dirs(d, idx) if idx[s].n_files]
    return bool(splits) and all(_is_image_folder(s, idx, tiff=True) for s in splits)


def classify(d: Path, idx: dict[Path, _Dir], ignored: list[Path]) -> list[Source]:
    """The layouts under ``d`` (the module doc lists them); unknown files go to ``ignored``."""
    node = idx[d]
    names = {s.name for s in node.subdirs}
    if "imagesTr" in names or "imagesTs" in names:
        return [Source("msd", d)]
    bulk = [Source(k, d, node.files[k]) for k in ("idx", "npz") if node.files[k]]
    if is_image_set(d, idx):
        return [Source("images", d), *bulk]
    ignored += [f for f in node.files["other"] if f.name.lower() not in _KNOWN_SIDECARS]
    ignored += node.files["image"]  # images beside volumes: not an image set
    if node.files["dicom"]:  # a series folder itself (the reader walks what is below it)
        return [Source("dicom", d, [d])]
    sources = bulk
    if node.files["nifti"]:
        sources.append(Source("nifti", d, node.files["nifti"]))
    if node.files["tiff"]:
        sources.append(Source("tiff", d, node.files["tiff"]))
    patients, rest = [], []
    for s in node.subdirs:
        if _is_label_dir(s):  # label maps, found by the scans they belong to
            continue
        sub = idx[s]
        is_patient = PATIENT_DIR.fullmatch(s.name) or (0 <= sub.dicom_depth <= 2 and sub.pure_dicom)
        (patients if is_patient else rest).append(s)
    if patients:  # a folder of patients: its empty subfolders are patients without scans
        patients += [s for s in rest if idx[s].n_files == 0]
        rest = [s for s in rest if idx[s].n_files > 0]
        sources.append(Source("dicom", d, sorted(patients)))
    for s in rest:
        sources += classify(s, idx, ignored)
    return sources


class LabelMaps:
    """Label maps by patient: same file stem, or ``label0001`` -> any id ending in number 1."""

    def __init__(self, dirs: list[Path]):
        self.by_stem: dict[str, Path] = {}
        self.by_number: dict[int, Path] = {}
        for d in dirs:
            for p in sorted(d.iterdir()) if d.is_dir() else []:
                if file_kind(p) != "nifti":
                    continue
                self.by_stem.setdefault(scan_stem(p).lower(), p)
                m = _LABEL_STEM.fullmatch(scan_stem(p))
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


def label_dirs(source: Source, labels: Path | None, scans_root: Path) -> list[Path]:
    """``--labels``, else ``*label*`` folders inside the source folder or beside it. Beside the
    user's root itself only for DICOM trees (TCIA ships ``Pancreas-CT/`` next to its label folder)."""
    if labels is not None:
        return [labels]
    near = list(source.root.iterdir())
    if source.root != scans_root or source.kind == "dicom":
        near += list(source.root.parent.iterdir())
    return sorted({p for p in near if p.is_dir() and _is_label_dir(p) and p.name != "labelsTr"})


def _msd_modality(meta: dict) -> str:
    values = " ".join(str(v) for v in (meta.get("modality") or {}).values()).upper().split()
    return "mr" if any(v in _MR_WORDS for v in values) else "ct"


def msd_rows(src: Source, modality: str, ignored: list[Path], problems: list[ManifestRow]) -> list[tuple]:
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
            kind = file_kind(p)
            if kind != "nifti":
                if kind:
                    ignored.append(p)
                continue
            pid, ext = scan_stem(p), p.name[len(scan_stem(p)) :]
            # nnU-Net names channels: imagesTr/case_0000.nii.gz goes with labelsTr/case.nii.gz.
            channel = re.fullmatch(r"(.+)_\d{4}", pid)
            if channel and label_dir is not None and (label_dir / (channel[1] + ext)).is_file():
                pid = channel[1]
            label = label_dir / (pid + ext) if label_dir is not None else None
            row = ManifestRow(pid, mod, "nifti", str(p.resolve()))
            todo.append((row, p, label if label is not None and label.is_file() else None))
    on_disk = {r.patient_id for r, _, _ in todo} | {scan_stem(p) for _, p, _ in todo}
    for entry in meta.get("training", []) + [{"image": t} for t in meta.get("test", [])]:
        image = entry.get("image", "") if isinstance(entry, dict) else ""
        if image and scan_stem(Path(image)) not in on_disk:
            problems.append(
                ManifestRow(
                    scan_stem(Path(image)),
                    mod,
                    "nifti",
                    str((root / image).resolve()),
                    status="problem",
                    problem=f"listed in {root / 'dataset.json'} but missing on disk",
                )
            )
    return todo

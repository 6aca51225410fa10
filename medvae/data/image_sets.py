"""2D image sets -> manifest rows, from headers only: image folders, IDX files, npz files.

Which folders are image sets is decided in :mod:`medvae.data.layouts`; this module builds their rows:

- **Image folders**: one row per image file (``format=image``, ``n_images=1``). Its class comes
  from ``labels.csv`` (columns ``file, class`` and optionally ``subject``; ``file`` relative to the
  CSV's folder, or a bare file name) or else from its parent folder's name (the ImageFolder
  convention; none for images directly in the set's root). A top-level ``train/`` ``val/``
  ``test/`` folder sets the split. The patient id is ``labels.csv``'s ``subject`` when given, else
  the image's path relative to the set root without suffix: each image is its own subject.
- **IDX**: one row per ``*-images-idx3-ubyte[.gz]`` file (``format=idx``, ``n_images`` = its
  count, ``label_path`` = the matching ``*-labels-idx1-ubyte[.gz]``); ``train`` / ``t10k``
  prefixes give the split; patient id ``<folder>-<split>`` (images become ``<folder>-<split>-00042``
  in the store).
- **npz**: one row per split present (``format=npz``, ``n_images``), patient id ``<stem>-<split>``.

Bulk rows (IDX, npz) keep the dataset's split; when a file has none it is hash-split as a whole.
Problems (unreadable image, IDX header not matching its size, npz without the expected keys, a
labels.csv line naming a missing file) are problem rows naming the file; the rest is kept. Mixed
image sizes and a grey/RGB mix are warnings on the odd rows (``problem`` of an ok row): prepare
resizes / converts them to the set's most common shape.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

from medvae.data.layouts import SPLIT_DIRS, Source, file_kind
from medvae.data.manifest import ManifestRow
from medvae.errors import InputError
from medvae.io.images2d import ImageInfo, idx_info, idx_pairs, idx_split, image_info, npz_info

log = logging.getLogger("medvae.data.discover")


def _read_labels_csv(path: Path) -> tuple[dict[str, tuple[str, str, int]], list[str]]:
    """``labels.csv`` -> (file -> (class, subject, line)), problems. Header ``file, class[, subject]``."""
    out, problems = {}, []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = {c.strip().lower(): c for c in reader.fieldnames or []}
            fcol = cols.get("file") or cols.get("filename") or cols.get("image") or cols.get("path")
            ccol = cols.get("class") or cols.get("label")
            scol = cols.get("subject") or cols.get("patient_id") or cols.get("patient")
            if fcol is None or ccol is None:
                return {}, [f"{path}: expected columns 'file' and 'class' (got {reader.fieldnames}); labels not used"]
            for raw in reader:
                name = (raw.get(fcol) or "").strip()
                if name:
                    out[name] = ((raw.get(ccol) or "").strip(), (raw.get(scol) or "").strip() if scol else "",
                                 reader.line_num)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        problems.append(f"{path}: cannot be read as CSV ({err}); labels not used")
    return out, problems


def _image_files(d: Path, depth: int = 2) -> list[Path]:
    files = []
    for p in sorted(d.iterdir()):
        if p.is_dir() and depth > 0 and not p.name.startswith("."):
            files += _image_files(p, depth - 1)
        elif p.is_file() and file_kind(p) in ("image", "tiff"):
            files.append(p)
    return files


def _folder_rows(set_root: Path, folder: Path, split: str, modality: str, csvs: dict) -> list[ManifestRow]:
    """Rows of one folder of a set; ``csvs``: labels.csv path -> (entries, used keys), shared by the set."""
    csv_path = folder / "labels.csv" if (folder / "labels.csv").is_file() else set_root / "labels.csv"
    rows = []
    if csv_path.is_file() and csv_path not in csvs:
        entries, problems = _read_labels_csv(csv_path)
        csvs[csv_path] = (entries, set())
        rows += [ManifestRow(f"{csv_path.parent.name}/labels.csv", status="problem", problem=p) for p in problems]
    labels, used = csvs.get(csv_path, ({}, set()))
    for p in _image_files(folder):
        keys = (p.relative_to(csv_path.parent).as_posix(), p.relative_to(folder).as_posix(), p.name)
        key = next((k for k in keys if k in labels), None)
        cls, subject = "", ""
        if key is not None:
            cls, subject, _ = labels[key]
            used.add(key)
        elif p.parent != folder:
            cls = p.parent.name
        pid = subject or p.relative_to(set_root).with_suffix("").as_posix()
        rows.append(ManifestRow(pid, modality, "image", str(p.resolve()), split=split, class_=cls))
    return rows


def _missing_rows(csvs: dict, modality: str) -> list[ManifestRow]:
    """A problem row per labels.csv line naming an image that no folder of the set holds."""
    rows = []
    for csv_path, (labels, used) in csvs.items():
        for name, (_, _, line) in sorted(labels.items()):
            if name not in used:
                rows.append(ManifestRow(f"{csv_path.parent.name}/{name}", modality, "image",
                                        str((csv_path.parent / name).resolve()), status="problem",
                                        problem=f"{csv_path} line {line} names {name}, which does not exist"))
    return rows


def _inspect_images(rows: list[ManifestRow]) -> None:
    """Fill image rows from their headers; mark unreadable ones; warn on sizes / channels that differ."""
    infos: dict[int, ImageInfo] = {}
    for i, row in enumerate(rows):
        if not row.ok:
            continue
        try:
            info = image_info(row.path)
        except InputError as err:
            row.status, row.problem = "problem", str(err)
            continue
        infos[i] = info
        row.n_slices = row.n_images = 1
        row.spacing_z = row.spacing_y = row.spacing_x = 1.0
    if not infos:
        return
    size = Counter((v.height, v.width) for v in infos.values()).most_common(1)[0][0]
    chans = Counter(v.channels for v in infos.values()).most_common(1)[0][0]
    for i, info in infos.items():
        notes = []
        if (info.height, info.width) != size:
            notes.append(f"{Path(rows[i].path).name}: {info.height}x{info.width} pixels, the set's images are "
                         f"{size[0]}x{size[1]}; prepare resizes it to the patch size")
        if info.channels != chans:
            notes.append(f"{Path(rows[i].path).name}: {'RGB' if info.channels == 3 else 'grey'} in a "
                         f"{'RGB' if chans == 3 else 'grey'} set; prepare converts it")
        rows[i].problem = "; ".join(notes)


def image_set_rows(src: Source, modality: str, split_dirs: dict[Path, str]) -> list[ManifestRow]:
    """Rows of an image-folder set rooted at ``src.root`` (``split_dirs``: its train/val/test folders)."""
    mod = "image" if modality == "auto" else modality
    csvs: dict = {}
    if split_dirs:
        rows = [r for d, s in sorted(split_dirs.items()) for r in _folder_rows(src.root, d, s, mod, csvs)]
    else:
        rows = _folder_rows(src.root, src.root, "", mod, csvs)
    rows += _missing_rows(csvs, mod)
    _inspect_images(rows)
    return rows


def bulk_rows(src: Source, modality: str) -> list[ManifestRow]:
    """Rows of the IDX files (one per images file) or npz files (one per split) of ``src``."""
    mod = "image" if modality == "auto" else modality
    rows = []
    if src.kind == "idx":
        names = {p.name: p for p in src.items}
        for img, lab in idx_pairs(list(names)):
            split = idx_split(img)
            pid = f"{src.root.name}-{split or img.split('-')[0]}"
            row = ManifestRow(pid, mod, "idx", str(names[img].resolve()), split=split,
                              label_path=str(names[lab].resolve()) if lab else "")
            try:
                info = idx_info(names[img])
                if lab:
                    n_lab = idx_info(names[lab]).n
                    if n_lab != info.n:
                        raise InputError(f"{names[lab]}: {n_lab} labels for the {info.n} images of {img}")
                else:
                    row.problem = f"{img}: no matching *-labels-idx1-ubyte file; images without classes"
                _fill(row, info)
            except InputError as err:
                row.status, row.problem = "problem", str(err)
            rows.append(row)
        paired = {n for pair in idx_pairs(list(names)) for n in pair if n}
        for name in sorted(set(names) - paired):
            log.info("IDX labels file %s has no images file beside it; ignored", names[name])
    else:
        for p in src.items:
            try:
                splits = npz_info(p)
            except InputError as err:
                rows.append(ManifestRow(p.stem, mod, "npz", str(p.resolve()), status="problem", problem=str(err)))
                continue
            for split, (_, lab, info) in splits.items():
                row = ManifestRow(f"{p.stem}-{split}", mod, "npz", str(p.resolve()), split=split)
                _fill(row, info)
                if lab is None:
                    row.problem = f"{p.name}: no labels for the {split} images; images without classes"
                rows.append(row)
    return rows


def _fill(row: ManifestRow, info: ImageInfo) -> None:
    row.n_slices = row.n_images = int(info.n)
    row.spacing_z = row.spacing_y = row.spacing_x = 1.0


def is_split_known(row: ManifestRow) -> bool:
    """Whether the row's split is the dataset's own (split folder, IDX prefix, npz key): it wins over hashing."""
    return bool(row.split) and row.format in ("image", "idx", "npz")


__all__ = ["SPLIT_DIRS", "bulk_rows", "image_set_rows", "is_split_known"]

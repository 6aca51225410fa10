"""Geometry of one DICOM series from its headers: slice order, duplicates, gaps, spacing, affine.

Slices are ordered by their position along the slice normal (``ImagePositionPatient`` dotted
with the cross product of the ``ImageOrientationPatient`` rows), never by file name or
InstanceNumber. Duplicate positions keep the first file by name; missing slices (gaps of a whole
multiple of the spacing) and non-uniform spacing become warnings. The result plans the
reorientation to LPS (:mod:`medvae.io.orient`); no pixel is decoded here.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from medvae.errors import InputError
from medvae.io.orient import Reorientation, plan_lps

IMAGE_MODALITIES = {"CT": "ct", "MR": "mr"}
MAX_NAMED = 5  # files named in one message; the rest are counted


def name_files(paths: Sequence[Path], root: Path) -> str:
    names = []
    for p in paths[:MAX_NAMED]:
        try:
            names.append(str(p.relative_to(root)))
        except ValueError:
            names.append(str(p))
    more = f" and {len(paths) - MAX_NAMED} more" if len(paths) > MAX_NAMED else ""
    return ", ".join(names) + more


@dataclass
class Slice:
    path: Path
    ds: pydicom.Dataset
    position: np.ndarray  # ImagePositionPatient (LPS, mm)
    orientation: np.ndarray  # ImageOrientationPatient (6,)
    shape: tuple[int, int]


@dataclass
class SeriesPlan:
    """The chosen series, its slices in array order and its geometry (no pixels decoded)."""

    directory: Path
    series_uid: str
    modality: str
    slices: list[Slice]  # sorted by increasing position along the normal
    pixel_spacing: tuple[float, float]  # (row spacing dy, column spacing dx)
    dz: float
    reorient: Reorientation
    warnings: list[str] = field(default_factory=list)


def series_geometry(directory: Path, uid: str, members, warnings: list[str]) -> SeriesPlan:
    slices = [
        Slice(
            p,
            ds,
            np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64),
            np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64),
            (int(ds.Rows), int(ds.Columns)),
        )
        for p, ds in members
    ]
    modality = IMAGE_MODALITIES[str(slices[0].ds.Modality)]

    shapes = Counter(s.shape for s in slices)
    if len(shapes) > 1:
        keep = shapes.most_common(1)[0][0]
        dropped = [s.path for s in slices if s.shape != keep]
        warnings.append(
            f"mixed slice shapes {sorted(shapes)} in series {uid}; kept the {keep[0]}x{keep[1]} majority, "
            f"dropped {name_files(dropped, directory)}"
        )
        slices = [s for s in slices if s.shape == keep]

    iop = np.median(np.stack([s.orientation for s in slices]), axis=0)
    row_dir, col_dir = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(row_dir, col_dir)
    norm = np.linalg.norm(normal)
    if not np.isfinite(norm) or norm < 1e-6:
        raise InputError(f"{directory}: ImageOrientationPatient {list(iop)} of series {uid} is degenerate")
    normal /= norm
    if any(np.abs(s.orientation - iop).max() > 1e-3 for s in slices):
        warnings.append(f"slices of series {uid} have differing ImageOrientationPatient; using the median")

    pos = np.array([s.position @ normal for s in slices])
    order = np.argsort(pos, kind="stable")
    slices = [slices[i] for i in order]
    pos = pos[order]

    # Duplicate positions: keep the first file (by name) at each position.
    if len(slices) > 1:
        diffs = np.diff(pos)
        scale = max(float(np.median(diffs[diffs > 1e-4])) if np.any(diffs > 1e-4) else 1.0, 1e-3)
        dup = np.concatenate([[False], diffs < 1e-3 * scale + 1e-5])
        if dup.any():
            groups: dict[int, list[int]] = defaultdict(list)
            head = 0
            for i in range(len(slices)):
                if not dup[i]:
                    head = i
                groups[head].append(i)
            keep_idx = sorted(min(g, key=lambda i: slices[i].path.name) for g in groups.values())
            kept = set(keep_idx)
            dropped = [slices[i].path for i in range(len(slices)) if i not in kept]
            warnings.append(
                f"{len(dropped)} slice(s) of series {uid} duplicate another slice's position; dropped "
                f"{name_files(dropped, directory)}"
            )
            slices = [slices[i] for i in keep_idx]
            pos = pos[keep_idx]

    dz = 1.0
    if len(slices) > 1:
        diffs = np.diff(pos)
        dz = float(np.median(diffs))
        gaps = np.flatnonzero((diffs > 1.5 * dz) & (np.abs(diffs / dz - np.round(diffs / dz)) < 0.15))
        if gaps.size:
            missing = int(sum(round(diffs[g] / dz) - 1 for g in gaps))
            where = ", ".join(f"{pos[g]:.2f} to {pos[g + 1]:.2f} mm" for g in gaps[:MAX_NAMED])
            warnings.append(
                f"series {uid} in {directory}: {missing} missing slice(s) (gap at position {where} "
                f"along the slice normal, spacing {dz:.3f} mm); "
                f"the volume is read without them"
            )
        other = np.ones(len(diffs), bool)
        other[gaps] = False
        if np.any(np.abs(diffs[other] - dz) > 0.01 * dz + 1e-3):
            warnings.append(
                f"series {uid} in {directory}: non-uniform slice spacing "
                f"({diffs.min():.3f}-{diffs.max():.3f} mm, median {dz:.3f} mm used)"
            )
    elif "SliceThickness" in slices[0].ds:
        dz = float(slices[0].ds.SliceThickness or 1.0)

    ps = slices[0].ds.get("PixelSpacing", None)
    if ps is None:
        warnings.append(f"series {uid} in {directory} has no PixelSpacing; assuming 1 mm")
        ps = (1.0, 1.0)
    dy, dx = float(ps[0]), float(ps[1])
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * dx  # i: along a row (increasing column)
    affine_lps[:3, 1] = col_dir * dy  # j: down a column (increasing row)
    affine_lps[:3, 2] = normal * dz  # k: sorted slice index
    affine_lps[:3, 3] = slices[0].position
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    rows, cols = slices[0].shape
    reorient = plan_lps(affine_ras, (cols, rows, len(slices)), (dx, dy, dz))
    return SeriesPlan(directory, uid, modality, slices, (dy, dx), dz, reorient, warnings)

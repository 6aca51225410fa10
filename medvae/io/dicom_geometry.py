"""Geometry of one DICOM series from its headers: slice order, duplicates, gaps, spacing, affine.

A slice is one single-frame file or one frame of an enhanced multi-frame file (CT/MR Image
Storage with functional groups: the frame's ``PlanePositionSequence``,
``PlaneOrientationSequence``, ``PixelMeasuresSequence`` and ``PixelValueTransformationSequence``,
per frame or shared, see :func:`enhanced_frames`). A multi-frame file that gives no frame any
position (e.g. pydicom-data's ``emri_small.dcm``) is read as a stack of its frames in file order
with an assumed spacing, said in a warning (:func:`stacked_frames`), as SimpleITK / GDCM read it.

Slices are ordered by their position along the slice normal (``ImagePositionPatient`` dotted
with the cross product of the ``ImageOrientationPatient`` rows), never by file name,
InstanceNumber or frame number. Duplicate positions keep the first slice by file name and
frame; missing slices (gaps of a whole multiple of the spacing) and non-uniform spacing become
warnings. The result plans the reorientation to the acquisition plane's display codes
(:func:`medvae.io.orient.plan_acquisition`: axial series to LPS, sagittal and coronal series keep
their slices); no pixel is decoded here.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from medvae.errors import InputError
from medvae.io.orient import Reorientation, plan_acquisition

IMAGE_MODALITIES = {"CT": "ct", "MR": "mr"}
MAX_NAMED = 5  # files named in one message; the rest are counted



def _functional_groups(ds) -> tuple[int, object, list]:
    """(frames, the shared functional group or None, the per-frame groups or []) of a multi-frame file."""
    n = int(ds.get("NumberOfFrames", 1) or 1)
    shared_seq = ds.get("SharedFunctionalGroupsSequence", None)
    shared = shared_seq[0] if shared_seq else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", None) or []
    if per_frame and len(per_frame) != n:
        raise ValueError(f"PerFrameFunctionalGroupsSequence has {len(per_frame)} items for {n} frames")
    return n, shared, per_frame

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
    """One image of the series: a single-frame file, or frame ``frame`` of a multi-frame file."""

    path: Path
    ds: pydicom.Dataset
    position: np.ndarray  # ImagePositionPatient (LPS, mm)
    orientation: np.ndarray  # ImageOrientationPatient (6,)
    shape: tuple[int, int]
    frame: int | None = None  # 0-based frame index in a multi-frame file; None: single-frame
    pixel_spacing: tuple[float, float] | None = None  # (row spacing, column spacing) mm, when given
    thickness: float | None = None  # SliceThickness, when given (a stacked frame: the assumed slice spacing)
    rescale: tuple[float, float] | None = None  # the frame's (slope, intercept); None: the file's own
    stacked: str | None = None  # geometry assumed (stacked_frames): the assumptions, in words

    @property
    def sort_name(self) -> tuple[str, int]:
        return self.path.name, -1 if self.frame is None else self.frame

    @property
    def named(self) -> Path:
        """The file, with the frame number (1-based) appended for a frame of a multi-frame file."""
        return self.path if self.frame is None else Path(f"{self.path} (frame {self.frame + 1})")


def _floats(value) -> np.ndarray:
    return np.asarray([float(v) for v in value], dtype=np.float64)


def _spacing(ds) -> tuple[float, float] | None:
    ps = ds.get("PixelSpacing", None)
    return (float(ps[0]), float(ps[1])) if ps is not None and len(ps) == 2 else None


def _thickness(ds) -> float | None:
    value = ds.get("SliceThickness", None)
    return float(value) if value not in (None, "") and float(value) > 0 else None


def single_frame_slice(path: Path, ds: pydicom.Dataset) -> Slice:
    """The slice of a single-frame image file (needs ImagePositionPatient, ImageOrientationPatient)."""
    return Slice(path, ds, _floats(ds.ImagePositionPatient), _floats(ds.ImageOrientationPatient),
                 (int(ds.Rows), int(ds.Columns)), None, _spacing(ds), _thickness(ds))


def _macro(groups, keyword: str):
    """The first item of functional group ``keyword`` in the first of ``groups`` holding it."""
    for item in groups:
        if item is not None:
            seq = item.get(keyword, None)
            if seq:
                return seq[0]
    return None


def _frame_rescale(groups, top: tuple[float, float] | None) -> tuple[float, float]:
    transform = _macro(groups, "PixelValueTransformationSequence")
    if transform is not None and "RescaleSlope" in transform and "RescaleIntercept" in transform:
        return float(transform.RescaleSlope), float(transform.RescaleIntercept)
    return top if top is not None else (1.0, 0.0)


def _top_rescale(ds) -> tuple[float, float] | None:
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        return float(ds.RescaleSlope), float(ds.RescaleIntercept)
    return None


def has_frame_positions(ds: pydicom.Dataset) -> bool:
    """True when some frame of a multi-frame file has a PlanePositionSequence (per frame or shared)."""
    shared_seq = ds.get("SharedFunctionalGroupsSequence", None)
    groups = [shared_seq[0]] if shared_seq else []
    groups += list(ds.get("PerFrameFunctionalGroupsSequence", None) or [])
    return any(item is not None and item.get("PlanePositionSequence", None) for item in groups)


def stacked_frames(path: Path, ds: pydicom.Dataset) -> list[Slice]:
    """The frames of a multi-frame file without frame positions, as a stack in file (frame) order.

    Nothing in the file says where its frames lie, so the stack is assumed: frame f at
    ``origin + f * dz * normal``, with ``dz`` the SpacingBetweenSlices (centre to centre), else
    the SliceThickness, else 1 mm; the orientation from a shared PlaneOrientationSequence or the
    top-level ImageOrientationPatient, else axial (rows along patient Left, columns along
    Posterior); the pixel spacing from a shared PixelMeasuresSequence or PixelSpacing, else 1 mm
    (:func:`series_geometry` warns with each slice's ``stacked``: the assumptions in words).
    """
    n, shared, per_frame = _functional_groups(ds)
    ori = _macro((shared,), "PlaneOrientationSequence")
    iop = ori.get("ImageOrientationPatient", None) if ori is not None else None
    iop = iop if iop is not None else ds.get("ImageOrientationPatient", None)
    orientation = _floats(iop) if iop is not None and len(iop) == 6 else None
    measures = _macro((shared,), "PixelMeasuresSequence")
    spacing = _spacing(measures) if measures is not None and "PixelSpacing" in measures else _spacing(ds)
    between = ds.get("SpacingBetweenSlices", None)
    thickness = _thickness(measures) if measures is not None and "SliceThickness" in measures else _thickness(ds)
    # Centre-to-centre distance first: the thickness differs from it when slices overlap or have gaps.
    if between not in (None, "") and float(between) > 0:
        dz, z_from = float(between), "SpacingBetweenSlices"
    elif thickness is not None:
        dz, z_from = thickness, "SliceThickness"
    else:
        dz, z_from = 1.0, "neither SpacingBetweenSlices nor SliceThickness given"
    xy_from = "PixelSpacing" if spacing is not None else "no PixelSpacing"
    dy, dx = spacing or (1.0, 1.0)
    assumed = [f"slice spacing {dz:g} mm ({z_from})", f"pixel spacing {dy:g} x {dx:g} mm ({xy_from})"]
    if orientation is None:
        assumed.append("axial orientation (no ImageOrientationPatient)")
        orientation = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    else:
        assumed.append("the frames' order along the slice normal")
    normal = np.cross(orientation[:3], orientation[3:])
    ipp = ds.get("ImagePositionPatient", None)
    origin = _floats(ipp) if ipp is not None and len(ipp) == 3 else np.zeros(3)
    top = _top_rescale(ds)
    return [Slice(path, ds, origin + f * dz * normal, orientation, (int(ds.Rows), int(ds.Columns)), f, spacing, dz,
                  _frame_rescale((per_frame[f] if per_frame else None, shared), top), ", ".join(assumed))
            for f in range(n)]


def enhanced_frames(path: Path, ds: pydicom.Dataset) -> list[Slice]:
    """The frames of an enhanced multi-frame CT/MR file as slices, from its functional groups.

    Each attribute is taken from the frame's item of PerFrameFunctionalGroupsSequence, else from
    SharedFunctionalGroupsSequence, else from the top-level attribute (ImageOrientationPatient,
    PixelSpacing, SliceThickness, RescaleSlope/Intercept).

    Raises:
        ValueError: no plane position for some frame, or no orientation (the message says which).
    """
    n, shared, per_frame = _functional_groups(ds)
    shape = (int(ds.Rows), int(ds.Columns))
    top_rescale = _top_rescale(ds)
    slices = []
    for f in range(n):
        groups = (per_frame[f] if per_frame else None, shared)
        pos = _macro(groups, "PlanePositionSequence")
        if pos is None or "ImagePositionPatient" not in pos:
            raise ValueError(f"frame {f + 1} of {n} has no PlanePositionSequence (ImagePositionPatient)")
        ori = _macro(groups, "PlaneOrientationSequence")
        iop = ori.get("ImageOrientationPatient", None) if ori is not None else None
        iop = iop if iop is not None else ds.get("ImageOrientationPatient", None)
        if iop is None or len(iop) != 6:
            raise ValueError(f"frame {f + 1} of {n} has no PlaneOrientationSequence (ImageOrientationPatient)")
        measures = _macro(groups, "PixelMeasuresSequence")
        slices.append(Slice(
            path, ds, _floats(pos.ImagePositionPatient), _floats(iop), shape, f,
            _spacing(measures) if measures is not None and "PixelSpacing" in measures else _spacing(ds),
            _thickness(measures) if measures is not None and "SliceThickness" in measures else _thickness(ds),
            _frame_rescale(groups, top_rescale),
        ))
    return slices


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
    assumed: bool = False  # a stack of frames without positions: geometry assumed (stacked_frames)

    @property
    def plane(self) -> str:
        """``axial`` | ``coronal`` | ``sagittal`` | ``oblique``: the plane the slices were acquired in;
        "" when the geometry was assumed, since no header says it."""
        return "" if self.assumed else self.reorient.plane


def _stack_in_file_order(directory: Path, uid: str, slices: list[Slice], warnings: list[str]) -> list[Slice]:
    """Slices of multi-frame files without frame positions: alone, a stack in (file name, frame)
    order at the first file's assumed spacing; beside positioned slices, dropped (nothing places them)."""
    stacked = [s for s in slices if s.stacked is not None]
    if not stacked:
        return slices
    files = sorted({s.path for s in stacked})
    if len(stacked) < len(slices):
        warnings.append(
            f"skipped {len(files)} multi-frame file(s) of series {uid} without frame positions, beside slices "
            f"that have them: {name_files(files, directory)}"
        )
        return [s for s in slices if s.stacked is None]
    stacked.sort(key=lambda s: s.sort_name)
    first = stacked[0]
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    for k, s in enumerate(stacked):  # several files: one after the other, by file name
        s.position, s.orientation = first.position + k * first.thickness * normal, first.orientation
    warnings.append(
        f"series {uid} in {directory}: multi-frame file(s) without frame positions "
        f"({name_files(files, directory)}); read as a stack of {len(stacked)} frames in file order, "
        f"assuming {first.stacked}"
    )
    return stacked


def series_geometry(directory: Path, uid: str, slices: list[Slice], warnings: list[str]) -> SeriesPlan:
    """Order, de-duplicate and measure ``slices`` of series ``uid`` (non-fatal problems -> ``warnings``)."""
    modality = IMAGE_MODALITIES[str(slices[0].ds.Modality)]
    slices = _stack_in_file_order(directory, uid, slices, warnings)
    assumed = slices[0].stacked is not None

    shapes = Counter(s.shape for s in slices)
    if len(shapes) > 1:
        keep = shapes.most_common(1)[0][0]
        dropped = [s.named for s in slices if s.shape != keep]
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
            keep_idx = sorted(min(g, key=lambda i: slices[i].sort_name) for g in groups.values())
            kept = set(keep_idx)
            dropped = [slices[i].named for i in range(len(slices)) if i not in kept]
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
    elif slices[0].thickness is not None:
        dz = slices[0].thickness

    ps = slices[0].pixel_spacing
    if ps is None:
        if not assumed:  # a stack's warning says it already
            warnings.append(f"series {uid} in {directory} has no PixelSpacing; assuming 1 mm")
        ps = (1.0, 1.0)
    dy, dx = ps
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * dx  # i: along a row (increasing column)
    affine_lps[:3, 1] = col_dir * dy  # j: down a column (increasing row)
    affine_lps[:3, 2] = normal * dz  # k: sorted slice index
    affine_lps[:3, 3] = slices[0].position
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    rows, cols = slices[0].shape
    reorient = plan_acquisition(affine_ras, (cols, rows, len(slices)), (dx, dy, dz))
    return SeriesPlan(directory, uid, modality, slices, (dy, dx), dz, reorient, warnings, assumed)

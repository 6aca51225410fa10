"""DICOM series reading (pydicom): one CT/MR series of a directory -> ``Volume`` in HU.

This module finds the files of a directory, picks the image series, decodes the pixels with
pydicom and rescales them to HU exactly as pydicom's ``apply_modality_lut`` does
(:mod:`medvae.io.dicom_pixels`, which also decodes slice ranges in other processes); the series
geometry (slice order along the normal, gaps, duplicates, spacing, affine) is
:mod:`medvae.io.dicom_geometry`. A series is single-frame files, or enhanced
multi-frame files (CT/MR with functional groups) whose frames are its slices, or both; a folder
holding one enhanced file reads as a volume. A multi-frame file without any frame position is a
stack of its frames in file order with an assumed spacing, named in a warning (the manifest's
``problem`` column of an ok row). Every header is parsed once (pixel bytes deferred).

The volume keeps the acquired slices as ``array[k]`` (:func:`medvae.io.orient.plan_acquisition`):
an axial series is ``array[z, y, x]`` with z toward Superior, y toward Posterior, x toward
patient Left; a sagittal or coronal one keeps its images, oriented to the plane's display codes,
with the plane recorded in ``Volume.plane``.

Problems that do not stop the read (skipped files, other series, gaps, duplicates, mixed
shapes) become ``Volume.warnings`` / ``VolumeInfo.warnings`` and are logged. Messages name files
and directories only: PatientName, PatientID and birth dates never appear in any message or field.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder

from medvae.errors import InputError
from medvae.io.dicom_geometry import (
    IMAGE_MODALITIES,
    SeriesPlan,
    Slice,
    enhanced_frames,
    has_frame_positions,
    name_files,
    series_geometry,
    single_frame_slice,
    stacked_frames,
)
from medvae.io.dicom_pixels import decode, file_rescale, slice_reader, to_units
from medvae.io.volume import Volume, VolumeInfo

log = logging.getLogger(__name__)

# Files that are certainly not DICOM; skipped silently instead of warned about.
_NOT_DICOM_SUFFIXES = {
    ".txt", ".json", ".xml", ".csv", ".md", ".nii", ".gz", ".png", ".jpg", ".jpeg", ".tif", ".tiff",
    ".npy", ".npz", ".yaml", ".yml", ".html", ".pdf", ".zip", ".py", ".log", ".db", ".ini",
}
PATIENT_DIR = re.compile(r"PANCREAS_\d+", re.IGNORECASE)  # a TCIA Pancreas-CT patient folder


def default_patient_id(directory: str | os.PathLike) -> str:
    """The TCIA patient folder name (first ancestor like ``PANCREAS_0001``), else the directory name."""
    path = Path(directory).resolve()
    for part in (path, *path.parents):
        if PATIENT_DIR.fullmatch(part.name):
            return part.name
    return path.name


def _list_files(directory: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or name.startswith("._"):
                continue
            p = Path(root) / name
            if p.suffix.lower() in _NOT_DICOM_SUFFIXES or name.upper() == "DICOMDIR":
                continue
            files.append(p)
    return files


def _dcmread(path: Path) -> pydicom.Dataset | None:
    """Parse one file; ``None`` when it is not DICOM."""
    # Large values (the pixel data) are deferred: parsed past, read only if accessed. Same cost as
    # stop_before_pixels, and the PixelData element's offset and length stay known for _truncated.
    kwargs = {"defer_size": "64 KB"}
    try:
        return pydicom.dcmread(path, **kwargs)
    except InvalidDicomError:
        pass
    # Old files may lack the 128-byte preamble; accept them only if they parse to DICOM content.
    ds = pydicom.dcmread(path, force=True, **kwargs)
    return ds if "SOPClassUID" in ds or "Modality" in ds else None


def _truncated(path: Path, ds: pydicom.Dataset) -> bool:
    """True when the (deferred) pixel data element ends past the end of the file."""
    elem = ds._dict.get(0x7FE00010)  # the raw element: reading ds.PixelData would load it
    tell, length = getattr(elem, "value_tell", None), getattr(elem, "length", None)
    if tell is None or length is None or length == 0xFFFFFFFF:  # not deferred, or encapsulated
        return False
    return tell + length > path.stat().st_size


def _plan(directory: str | os.PathLike) -> SeriesPlan:
    directory = Path(directory)
    if not directory.exists():
        raise InputError(f"{directory}: no such directory; expected a folder of DICOM files of one series")
    if not directory.is_dir():
        raise InputError(f"{directory}: not a directory; expected a folder of DICOM files of one series")
    files = _list_files(directory)
    if not files:
        raise InputError(f"{directory}: no DICOM files found (empty folder?)")

    warnings: list[str] = []
    unreadable: list[Path] = []
    truncated: list[Path] = []
    series: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    for path in files:
        try:
            ds = _dcmread(path)  # pixel bytes are deferred: files of other series are never loaded
        except Exception:  # any parse failure of a corrupt or foreign file: skip it, name it below
            ds = None
        if ds is None:
            unreadable.append(path)
            continue
        if _truncated(path, ds):
            truncated.append(path)
            continue
        series[str(getattr(ds, "SeriesInstanceUID", ""))].append((path, ds))
    if unreadable:
        warnings.append(
            f"skipped {len(unreadable)} unreadable or non-DICOM file(s) in {directory}: "
            f"{name_files(unreadable, directory)}"
        )
    if truncated:
        warnings.append(f"skipped {len(truncated)} truncated file(s): {name_files(truncated, directory)}")

    image_series: dict[str, list[Slice]] = {}
    for uid, members in series.items():
        modality = str(getattr(members[0][1], "Modality", "") or "?")
        usable: list[Slice] = []
        skipped: dict[str, list[Path]] = defaultdict(list)  # reason -> files
        for path, ds in members:
            try:
                usable.extend(_slices_of(path, ds))
            except _NotAnImage as e:
                skipped[str(e)].append(path)
        if usable:
            image_series[uid] = usable
        for why, paths in skipped.items():
            warnings.append(
                f"skipped {len(paths)} file(s) of {modality} series {uid or '(no SeriesInstanceUID)'} "
                f"({why}): {name_files(paths, directory)}"
            )
    if not image_series:
        raise InputError(
            f"{directory}: no usable CT/MR image series"
            + (f" ({'; '.join(warnings)})" if warnings else "")
        )
    uid = max(image_series, key=lambda u: len(image_series[u]))
    if len(image_series) > 1:
        others = ", ".join(f"{u} ({len(m)} files)" for u, m in image_series.items() if u != uid)
        warnings.append(
            f"{directory} holds {len(image_series)} image series; using {uid} "
            f"({len(image_series[uid])} files), ignoring {others}"
        )
    return series_geometry(directory, uid, image_series[uid], warnings)


class _NotAnImage(Exception):
    """A DICOM file that is no CT/MR grayscale image with geometry (the message says why)."""


def _slices_of(path: Path, ds: pydicom.Dataset) -> list[Slice]:
    """The images of one file: itself (single-frame), or each frame of an enhanced multi-frame file."""
    if str(getattr(ds, "Modality", "")) not in IMAGE_MODALITIES:
        raise _NotAnImage("not a CT/MR image series")
    if "Rows" not in ds or "Columns" not in ds:
        raise _NotAnImage("no image: Rows/Columns missing")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise _NotAnImage(f"not grayscale: SamplesPerPixel {ds.SamplesPerPixel}")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise _NotAnImage(f"malformed NumberOfFrames {ds.get('NumberOfFrames')!r}") from None
    multi = frames > 1 or "PerFrameFunctionalGroupsSequence" in ds
    try:
        if multi:  # frames with positions are placed by them; a file that gives none is a stack in frame order
            return enhanced_frames(path, ds) if has_frame_positions(ds) else stacked_frames(path, ds)
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise _NotAnImage("no image geometry: ImagePositionPatient/ImageOrientationPatient missing")
        return [single_frame_slice(path, ds)]
    except _NotAnImage:
        raise
    except Exception as e:  # missing functional groups, malformed numbers: say what, skip the file
        kind = "multi-frame image without usable per-frame geometry" if multi else "malformed image geometry"
        raise _NotAnImage(f"{kind}: {e}") from None


def _log(plan_warnings: list[str]) -> None:
    for w in plan_warnings:
        log.warning(w)


def inspect_dicom_series(directory: str | os.PathLike) -> VolumeInfo:
    """Describe the image series of ``directory`` from headers only (no pixel decoding).

    Returns:
        VolumeInfo with the ``(Z, Y, X)`` shape and ``(z, y, x)`` spacing (mm) the full read returns.

    Raises:
        InputError: missing/empty directory or no usable CT/MR series (message names the directory).
    """
    plan = _plan(directory)
    _check_decoder(plan)
    _log(plan.warnings)
    return VolumeInfo(
        shape=plan.reorient.shape_zyx,
        spacing=plan.reorient.spacing_zyx,
        n_channels=1,
        modality=plan.modality,
        series_uid=plan.series_uid,
        warnings=list(plan.warnings),
        plane=plan.plane,
    )


def _check_decoder(plan: SeriesPlan) -> None:
    """Raise InputError when the series' transfer syntax has no installed decoder."""
    ts = getattr(getattr(plan.slices[0].ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None or not ts.is_compressed:
        return
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise InputError(
            f"{plan.directory}: transfer syntax {ts.name} ({ts}) is not supported by pydicom"
        ) from None
    if not decoder.is_available:
        need = "; ".join(decoder.missing_dependencies) or "a pixel data decoder"
        raise InputError(
            f"{plan.directory}: pixel data is compressed as {ts.name} and no decoder is installed; "
            f"install one of: {need} (e.g. `pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg`)"
        )


def read_dicom_series(directory: str | os.PathLike, patient_id: str | None = None) -> Volume:
    """Read the CT/MR image series of ``directory`` as a ``Volume`` in HU (CT) / stored units (MR).

    Args:
        directory: folder holding the series' files (searched recursively; other series and
            non-image objects are skipped with a warning).
        patient_id: id for the volume; default :func:`default_patient_id`.

    Returns:
        Volume: ``array (K, R, C)`` float32 of the acquired slices: for an axial series
        ``(Z, Y, X)`` with z toward Superior, y toward Posterior, x toward patient Left
        (``orientation "LPS"``); coronal ``"LIP"`` and sagittal ``"PIL"`` (the codes of the
        column, row and slice directions; ``plane`` says which); ``spacing`` along the same axes,
        mm; ``affine`` the RAS affine of the ``(i, j, k) = (c, r, k)`` grid.

    Raises:
        InputError: missing/empty directory, no usable series, all slices unreadable, or a
            compressed transfer syntax without an installed decoder.
    """
    plan = _plan(directory)
    _check_decoder(plan)
    return read_planned(plan, patient_id)


def plan_series(directory: str | os.PathLike) -> SeriesPlan:
    """The series ``read_dicom_series`` reads, from its headers (pixels not decoded); InputError as it."""
    plan = _plan(directory)
    _check_decoder(plan)
    return plan


def read_planned(plan: SeriesPlan, patient_id: str | None = None) -> Volume:
    """:func:`read_dicom_series` of an already planned series."""
    rows, cols = plan.slices[0].shape
    stack = np.empty((len(plan.slices), rows, cols), dtype=np.float32)  # (k, j, i)
    ok = np.ones(len(plan.slices), dtype=bool)
    reader = slice_reader(plan)
    if reader is not None:  # native single-frame files: pydicom's decoder on each file's pixel bytes
        ok[reader.decode_into(stack, range(len(plan.slices)))] = False
        failed = [s.named for s, good in zip(plan.slices, ok) if not good]
    else:
        failed = _decode_with_datasets(plan, stack, ok)
    if failed:
        if not ok.any():
            raise InputError(
                f"{plan.directory}: none of the {len(plan.slices)} slices of series {plan.series_uid} "
                f"could be decoded (truncated or corrupt files, e.g. {name_files(failed, plan.directory)})"
            )
        plan.warnings.append(
            f"skipped {len(failed)} unreadable or truncated file(s): {name_files(failed, plan.directory)}"
        )
        # Re-plan the geometry on the surviving slices so gaps are reported and spacing is right.
        survivors = [s for s, good in zip(plan.slices, ok) if good]
        stack = stack[ok]
        plan = series_geometry(plan.directory, plan.series_uid, survivors, plan.warnings)
    _log(plan.warnings)
    array = np.ascontiguousarray(plan.reorient.apply_kji(stack))
    return Volume(
        array=array,
        spacing=plan.reorient.spacing_zyx,
        patient_id=patient_id if patient_id is not None else default_patient_id(plan.directory),
        modality=plan.modality,
        source=str(plan.directory),
        orientation="".join(plan.reorient.codes),
        affine=plan.reorient.affine,
        series_uid=plan.series_uid,
        warnings=list(plan.warnings),
        plane=plan.plane,
    )


def _decode_with_datasets(plan: SeriesPlan, stack: np.ndarray, ok: np.ndarray) -> list[Path]:
    """HU of every slice into ``stack`` through its dataset (compressed, multi-frame, LUT); failures in ``ok``."""
    rows, cols = stack.shape[1:]
    failed: list[Path] = []
    frames: dict[int, np.ndarray | Exception] = {}  # decoded multi-frame files, by dataset id
    left = Counter(id(s.ds) for s in plan.slices)  # slices still to copy, per file
    for k, s in enumerate(plan.slices):
        try:
            raw = decode(s, frames)
            if raw.shape != (rows, cols):
                raise ValueError(f"pixel array shape {raw.shape} != ({rows}, {cols})")
            rescale = s.rescale if s.rescale is not None else file_rescale(s.ds)
            to_units(stack[k], raw, rescale, s.ds)  # HU = stored * slope + intercept (or a Modality LUT)
        except Exception as e:  # a truncated or corrupt file: skip it, say which
            log.debug("cannot decode %s: %s", s.named, e)
            ok[k] = False
            failed.append(s.named)
        left[id(s.ds)] -= 1
        if not left[id(s.ds)]:  # free the pixel bytes early; the header stays for re-planning
            frames.pop(id(s.ds), None)
            if "PixelData" in s.ds:
                del s.ds.PixelData
    return failed

"""DICOM series reading (pydicom): one CT/MR series of a directory -> ``Volume`` in HU.

This module finds the files of a directory, picks the image series, decodes the pixels with
pydicom (``pydicom.pixels.pixel_array``, then ``apply_rescale`` for HU); the series geometry
(slice order along the normal, gaps, duplicates, spacing, affine) is
:mod:`medvae.io.dicom_geometry`. The volume is reoriented to ``array[z, y, x]`` with z toward
Superior, y toward Posterior, x toward patient Left (see :mod:`medvae.io.orient`).

Problems that do not stop the read (skipped files, other series, gaps, duplicates, mixed
shapes) become ``Volume.warnings`` / ``VolumeInfo.warnings`` and are logged. Messages name files
and directories only: PatientName, PatientID and birth dates never appear in any message or field.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_rescale, get_decoder, pixel_array

from medvae.errors import InputError
from medvae.io.dicom_geometry import IMAGE_MODALITIES, SeriesPlan, name_files, series_geometry
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

    image_series: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for uid, members in series.items():
        modality = str(getattr(members[0][1], "Modality", "") or "?")
        usable = [
            (p, ds)
            for p, ds in members
            if str(getattr(ds, "Modality", "")) in IMAGE_MODALITIES
            and "ImagePositionPatient" in ds
            and "ImageOrientationPatient" in ds
            and "Rows" in ds
            and int(getattr(ds, "SamplesPerPixel", 1) or 1) == 1
            and int(getattr(ds, "NumberOfFrames", 1) or 1) == 1
        ]
        if usable:
            image_series[uid] = usable
            if len(usable) < len(members):
                bad = [p for p, ds in members if all(p is not q for q, _ in usable)]
                warnings.append(
                    f"skipped {len(bad)} file(s) without single-frame grayscale image geometry "
                    f"in series {uid}: "
                    f"{name_files(bad, directory)}"
                )
        else:
            multi = any(int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 for _, ds in members)
            why = "multi-frame images are not supported" if multi else "not a CT/MR image series"
            warnings.append(
                f"skipped {len(members)} file(s) of {modality} series {uid or '(no SeriesInstanceUID)'} "
                f"({why}): {name_files([p for p, _ in members], directory)}"
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


def _decode(ds: pydicom.Dataset) -> np.ndarray:
    """Stored pixel values of one single-frame slice, ``(rows, cols)``, by pydicom's decoders.

    ``view_only``: native (uncompressed) data comes back as a read-only view of the pixel bytes,
    no copy; the caller copies it into the volume while applying the rescale.
    """
    arr = pixel_array(ds, view_only=True)
    if arr.ndim != 2:
        raise ValueError(f"expected one grayscale frame, got pixel array of shape {arr.shape}")
    return arr


def read_dicom_series(directory: str | os.PathLike, patient_id: str | None = None) -> Volume:
    """Read the CT/MR image series of ``directory`` as a ``Volume`` in HU (CT) / stored units (MR).

    Args:
        directory: folder holding the series' files (searched recursively; other series and
            non-image objects are skipped with a warning).
        patient_id: id for the volume; default :func:`default_patient_id`.

    Returns:
        Volume: ``array (Z, Y, X)`` float32 with z toward Superior, y toward Posterior, x toward
        patient Left; ``spacing (z, y, x)`` mm; ``orientation "LPS"``; ``affine`` the RAS affine of
        the ``(i, j, k) = (x, y, z)`` grid.

    Raises:
        InputError: missing/empty directory, no usable series, all slices unreadable, or a
            compressed transfer syntax without an installed decoder.
    """
    plan = _plan(directory)
    _check_decoder(plan)
    rows, cols = plan.slices[0].shape
    stack = np.empty((len(plan.slices), rows, cols), dtype=np.float32)  # (k, j, i)
    ok = np.ones(len(plan.slices), dtype=bool)
    failed: list[Path] = []
    for k, s in enumerate(plan.slices):
        try:
            raw = _decode(s.ds)
            if raw.shape != (rows, cols):
                raise ValueError(f"pixel array shape {raw.shape} != ({rows}, {cols})")
        except Exception as e:  # a truncated or corrupt file: skip it, say which
            log.debug("cannot decode %s: %s", s.path, e)
            ok[k] = False
            failed.append(s.path)
            continue
        stack[k] = apply_rescale(raw, s.ds)  # HU = stored * slope + intercept (or a Modality LUT)
        del s.ds.PixelData  # free the pixel bytes early; the header stays for re-planning
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
        survivors = [(s.path, s.ds) for s, good in zip(plan.slices, ok) if good]
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
        orientation="LPS",
        affine=plan.reorient.affine,
        series_uid=plan.series_uid,
        warnings=list(plan.warnings),
    )

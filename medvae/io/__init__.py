"""Scan readers: DICOM series, NIfTI volumes and microscopy TIFF stacks -> ``Volume``.

``load_volume`` / ``inspect_volume`` dispatch on what a path is: a directory (a DICOM series),
``.nii`` / ``.nii.gz`` (NIfTI) or ``.tif`` / ``.tiff`` (TIFF stack, ImageJ or OME).
"""

from __future__ import annotations

import os
from pathlib import Path

from medvae.errors import InputError
from medvae.io.volume import Volume, VolumeInfo

SUPPORTED = "a directory of DICOM files, a .nii/.nii.gz NIfTI file or a .tif/.tiff stack"

__all__ = ["Volume", "VolumeInfo", "load_volume", "inspect_volume", "scan_format", "SUPPORTED"]


def scan_format(path: str | os.PathLike) -> str:
    """``"dicom"`` | ``"nifti"`` | ``"tiff"`` for ``path``; InputError when missing or unknown."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory; expected {SUPPORTED}")
    if p.is_dir():
        return "dicom"
    name = p.name.lower()
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return "nifti"
    if name.endswith(".tif") or name.endswith(".tiff"):
        return "tiff"
    if name.endswith(".dcm"):
        raise InputError(f"{p}: a single DICOM file; pass the folder holding the whole series instead")
    raise InputError(f"{p}: unknown scan file type {p.suffix or '(no suffix)'!r}; expected {SUPPORTED}")


def load_volume(path: str | os.PathLike, patient_id: str | None = None) -> Volume:
    """Read a scan of any supported format (see :func:`scan_format`) as a ``Volume``."""
    fmt = scan_format(path)
    if fmt == "dicom":
        from medvae.io.dicom import read_dicom_series

        return read_dicom_series(path, patient_id=patient_id)
    if fmt == "nifti":
        from medvae.io.nifti import read_nifti

        return read_nifti(path, patient_id=patient_id)
    from medvae.io.tiff import read_tiff_stack

    return read_tiff_stack(path, patient_id=patient_id)


def inspect_volume(path: str | os.PathLike) -> VolumeInfo:
    """Header-only description of a scan of any supported format (no pixel decoding)."""
    fmt = scan_format(path)
    if fmt == "dicom":
        from medvae.io.dicom import inspect_dicom_series

        return inspect_dicom_series(path)
    if fmt == "nifti":
        from medvae.io.nifti import inspect_nifti

        return inspect_nifti(path)
    from medvae.io.tiff import inspect_tiff

    return inspect_tiff(path)

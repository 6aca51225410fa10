"""Which reader a scan path needs, and the file-name stem that names it (no file is opened).

``scan_format`` dispatches on what a path is: a directory (a DICOM series), ``.nii`` /
``.nii.gz`` (NIfTI) or ``.tif`` / ``.tiff`` (TIFF stack, ImageJ or OME). ``scan_stem`` is the
file name without those suffixes: the default patient id of a NIfTI or TIFF scan, and the key
discovery matches label maps by.
"""

from __future__ import annotations

import os
from pathlib import Path

from medvae.errors import InputError

SUPPORTED = "a directory of DICOM files, a .nii/.nii.gz NIfTI file or a .tif/.tiff stack"
NIFTI_SUFFIXES = (".nii.gz", ".nii")
TIFF_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif")


def scan_stem(path: str | os.PathLike) -> str:
    """File name without ``.nii.gz`` / ``.nii`` / ``.ome.tiff`` / ``.ome.tif`` / ``.tiff`` / ``.tif``
    (any case); other names lose their last suffix only (``Path.stem``)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES + TIFF_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def scan_format(path: str | os.PathLike) -> str:
    """``"dicom"`` | ``"nifti"`` | ``"tiff"`` for ``path``; InputError when missing or unknown."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory; expected {SUPPORTED}")
    if p.is_dir():
        return "dicom"
    name = p.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(TIFF_SUFFIXES):
        return "tiff"
    if name.endswith(".dcm"):
        raise InputError(f"{p}: a single DICOM file; pass the folder holding the whole series instead")
    raise InputError(f"{p}: unknown scan file type {p.suffix or '(no suffix)'!r}; expected {SUPPORTED}")

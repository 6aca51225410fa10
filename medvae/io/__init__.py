"""Scan readers: DICOM series, NIfTI volumes and microscopy TIFF stacks -> ``Volume``.

``load_volume`` / ``inspect_volume`` dispatch on what a path is (see
:func:`medvae.io.formats.scan_format`): a directory (a DICOM series), ``.nii`` / ``.nii.gz``
(NIfTI) or ``.tif`` / ``.tiff`` (TIFF stack, ImageJ or OME).
"""

from __future__ import annotations

import os

from medvae.io.dicom import inspect_dicom_series, read_dicom_series
from medvae.io.formats import SUPPORTED, scan_format
from medvae.io.nifti import inspect_nifti, read_nifti
from medvae.io.tiff import inspect_tiff, read_tiff_stack
from medvae.io.volume import Volume, VolumeInfo

__all__ = ["Volume", "VolumeInfo", "load_volume", "inspect_volume", "scan_format", "SUPPORTED"]


def load_volume(path: str | os.PathLike, patient_id: str | None = None) -> Volume:
    """Read a scan of any supported format (see :func:`scan_format`) as a ``Volume``."""
    read = {"dicom": read_dicom_series, "nifti": read_nifti, "tiff": read_tiff_stack}[scan_format(path)]
    return read(path, patient_id=patient_id)


def inspect_volume(path: str | os.PathLike) -> VolumeInfo:
    """Header-only description of a scan of any supported format (no pixel decoding)."""
    inspect = {"dicom": inspect_dicom_series, "nifti": inspect_nifti, "tiff": inspect_tiff}[scan_format(path)]
    return inspect(path)

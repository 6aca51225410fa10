"""NIfTI reading (nibabel): any affine -> ``array[z, y, x]`` with LPS axis codes.

The ``(i, j, k)`` voxel grid is reoriented to orientation codes ``('L', 'P', 'S')`` with
:mod:`nibabel.orientations` and transposed to ``(k, j, i)``, the same convention as the DICOM
reader (see :mod:`medvae.io.orient`), so a label map aligns voxel-for-voxel with its scan.

Choices: a 4D (or higher) file gives its first volume with a warning (InputError only when the
4th dimension is empty); NaN or infinite voxels raise InputError naming the file, because any
fill value would silently change HU statistics and the patches made from them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from medvae.errors import InputError
from medvae.io.formats import scan_stem
from medvae.io.orient import Reorientation, plan_acquisition
from medvae.io.volume import Volume, VolumeInfo

log = logging.getLogger(__name__)


def _load(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such NIfTI file")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises several types for corrupt or non-NIfTI files
        raise InputError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 2 or any(s == 0 for s in shape[:3]):
        raise InputError(f"{path}: NIfTI image of shape {shape} has no voxels")
    warnings: list[str] = []
    if len(shape) >= 4:
        if any(s == 0 for s in shape[3:]):
            raise InputError(f"{path}: 4D NIfTI of shape {shape} has an empty 4th dimension")
        if any(s > 1 for s in shape[3:]):
            warnings.append(f"{path}: {len(shape)}D NIfTI of shape {shape}; using the first volume only")
    shape3 = (shape + (1, 1))[:3]
    zooms = tuple(float(z) for z in (tuple(img.header.get_zooms()) + (1.0, 1.0))[:3])
    zooms = tuple(z if z > 0 and np.isfinite(z) else 1.0 for z in zooms)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        warnings.append(f"{path}: invalid affine in header; assuming RAS axes with the header's zooms")
        affine = np.diag([*zooms, 1.0])
    return path, img, shape, plan_acquisition(affine, shape3, zooms), warnings


def inspect_nifti(path: str | os.PathLike, modality: str = "ct") -> VolumeInfo:
    """Header-only description of a NIfTI file (shape/spacing after reorientation to its acquisition plane)."""
    _, _, _, reorient, warnings = _load(path)
    for w in warnings:
        log.warning(w)
    return VolumeInfo(
        shape=reorient.shape_zyx, spacing=reorient.spacing_zyx, n_channels=1, modality=modality,
        warnings=warnings, plane=reorient.plane,
    )


def _first_volume(img, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    if len(shape) == 2:
        return np.asarray(img.dataobj, dtype=dtype)[:, :, None]
    if len(shape) == 3:
        return np.asarray(img.dataobj, dtype=dtype)
    # Slice the array proxy so only the first volume is read from disk.
    index = (slice(None),) * 3 + (0,) * (len(shape) - 3)
    return np.asarray(img.dataobj[index], dtype=dtype)


def read_nifti(path: str | os.PathLike, patient_id: str | None = None, modality: str = "ct",
               keep_dtype: bool = False) -> Volume:
    """Read a NIfTI scan or label map.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        patient_id: default: the file name without ``.nii`` / ``.nii.gz``.
        modality: ``ct`` (default) | ``mr`` | ``microscopy``; the file does not say.
        keep_dtype: keep the stored data type (float64 when the header scales the values) instead of
            float32: a uint8 label map stays 4x smaller (prepare's labels; not the Volume contract).

    Returns:
        Volume: ``array (Z, Y, X)`` float32 (scl_slope/scl_inter applied) with z toward Superior,
        y toward Posterior, x toward patient Left; ``spacing (z, y, x)`` from the header zooms;
        ``orientation "LPS"``; ``affine`` the RAS affine of the reoriented ``(i, j, k)`` grid.

    Raises:
        InputError: missing/corrupt file, no voxels, empty 4th dimension, NaN or infinite voxels.
    """
    path, img, shape, reorient, warnings = _load(path)
    try:
        data = _first_volume(img, shape, None if keep_dtype else np.float32)
    except Exception as e:  # truncated .nii.gz, wrong data size, ...
        raise InputError(f"{path}: cannot read the voxel data ({type(e).__name__}: {e})") from None
    bad = ~np.isfinite(data) if data.dtype.kind in "fc" else np.zeros(1, dtype=bool)
    if bad.any():
        raise InputError(
            f"{path}: {int(bad.sum())} of {data.size} voxels are NaN or infinite; "
            f"fix or drop this file (medvae does not guess a fill value)"
        )
    for w in warnings:
        log.warning(w)
    return Volume(
        array=_to_zyx(data, reorient),
        spacing=reorient.spacing_zyx,
        patient_id=patient_id if patient_id is not None else scan_stem(path),
        modality=modality,
        source=str(path),
        orientation="".join(reorient.codes),
        plane=reorient.plane,
        affine=reorient.affine,
        warnings=warnings,
    )


def _to_zyx(data_ijk: np.ndarray, reorient: Reorientation) -> np.ndarray:
    return np.ascontiguousarray(reorient.apply_ijk(data_ijk).transpose(2, 1, 0))

"""File writers in physical units: NIfTI, ImageJ TIFF, 8-bit PNG previews and .npy.

Shared by the phantom cohort (``medvae.io.phantoms``: label NIfTIs, microscopy stacks) and the
synthetic datasets (``medvae.synthesis.generate``: HU slices, microscopy TIFFs, previews). Every write is
atomic (a temporary name in the same folder, renamed into place), so a file that exists is
complete. None of them writes a timestamp: the same array gives the same bytes every run
(nibabel's gzip stores mtime 0; tifffile writes no DateTime tag unless asked).

Geometry follows the readers (``medvae.io.nifti``, ``medvae.io.orient``): an ``array[z, y, x]``
has z toward Superior, y toward Posterior, x toward patient Left, so its NIfTI voxel axes
``(i, j, k) = (x, y, z)`` carry orientation codes ``('L', 'P', 'S')`` and a file written here
reads back as the same array.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from medvae.files import atomic_path

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ras_affine(spacing: Sequence[float], origin: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 RAS affine of the ``(i, j, k) = (x, y, z)`` grid of an LPS ``array[z, y, x]``.

    Args:
        spacing: ``(dz, dy, dx)`` voxel size (mm).
        origin: LPS position ``(x, y, z)`` of voxel ``[0, 0, 0]`` (DICOM ImagePositionPatient).
    Returns:
        ``diag(-1, -1, 1, 1) @ LPS affine``, what a DICOM -> NIfTI converter writes.
    """
    dz, dy, dx = (float(s) for s in spacing)
    lps = np.array([[dx, 0, 0, origin[0]], [0, dy, 0, origin[1]], [0, 0, dz, origin[2]], [0, 0, 0, 1.0]])
    return _LPS_TO_RAS @ lps


def write_nifti(path: str | os.PathLike, array: np.ndarray, spacing: Sequence[float],
                origin: Sequence[float] = (0.0, 0.0, 0.0), *, unit: str | None = None,
                description: str | None = None) -> None:
    """NIfTI-1 of an LPS volume, in the array's own dtype (int16 HU, uint8 label map, ...).

    Args:
        array: ``(Z, Y, X)`` or ``(Z, Y, X, C)``; stored as voxel axes ``(X, Y, Z[, C])``
            (a 2D slice is ``(1, Y, X)``: file shape ``(X, Y, 1)``).
        spacing: ``(dz, dy, dx)``; origin: LPS ``(x, y, z)`` of voxel ``[0, 0, 0]``
            (affine: :func:`ras_affine`, as qform and sform, code 1 = scanner).
        unit: ``mm`` | ``um`` (header xyz unit), or None to leave it unknown.
        description: header ``descrip`` (80 bytes at most).
    """
    import nibabel as nib

    affine = ras_affine(spacing, origin)
    data = array.transpose(2, 1, 0, *range(3, array.ndim))  # F-ordered view: no copy
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if unit is not None:
        img.header.set_xyzt_units(xyz=unit)
    if description is not None:
        img.header["descrip"] = description.encode()
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def write_tiff(path: str | os.PathLike, array: np.ndarray, axes: str, spacing: Sequence[float],
               unit: str = "um") -> None:
    """TIFF with pixel size: an ImageJ hyperstack for uint8 / uint16 / float32, else a plain TIFF.

    Args:
        array: axes ``axes``: ``YX``, ``CYX``, ``ZYX`` or ``CZYX`` (ImageJ order).
        spacing: voxel size of the spatial axes in ``axes`` order: ``(dy, dx)`` or ``(dz, dy, dx)``.
        unit: ``um`` (microscopy) or ``mm``. ImageJ files store it in their metadata with the
            z spacing and ``1 / spacing`` pixels per unit as X/YResolution; a plain TIFF (other
            dtypes, e.g. int16 HU) stores pixels per centimetre for ``mm`` (TIFF has no mm unit)
            and pixels per unit with resolution unit NONE otherwise.
    """
    import tifffile

    spatial = [a for a in axes if a in "ZYX"]
    if array.ndim != len(axes) or len(spacing) != len(spatial) or spatial[-2:] != ["Y", "X"]:
        raise ValueError(f"write_tiff: array {array.shape}, axes {axes!r}, spacing {tuple(spacing)} disagree")
    step = dict(zip(spatial, (float(s) for s in spacing), strict=True))
    if array.dtype in (np.uint8, np.uint16, np.float32):
        metadata = {"spacing": step["Z"]} if "Z" in step else {}
        kw = {"imagej": True, "metadata": {**metadata, "unit": unit, "axes": axes}}
        scale = 1.0
    else:
        kw = {"resolutionunit": "CENTIMETER" if unit == "mm" else "NONE"}
        scale = 10.0 if unit == "mm" else 1.0
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, array, photometric="minisblack",
                         resolution=(scale / step["X"], scale / step["Y"]), **kw)


def write_slice(path: str | os.PathLike, image: np.ndarray, spacing: Sequence[float], unit: str = "mm",
                description: str | None = None) -> None:
    """A 2D image ``(C, H, W)`` (rows y, columns x) as TIFF (``.tif``) or NIfTI (``.nii[.gz]``).

    TIFF: :func:`write_tiff` with axes ``YX`` (one channel) or ``CYX``. NIfTI: :func:`write_nifti`
    of the one-slice volume ``(1, H, W[, C])`` (file shape ``(X, Y, 1[, C])``) with slice
    thickness 1 and origin 0; ``description`` goes into its header.
    """
    single = image.shape[0] == 1
    if str(path).lower().endswith((".tif", ".tiff")):
        write_tiff(path, image[0] if single else image, "YX" if single else "CYX", spacing, unit)
    else:
        volume = image if single else np.moveaxis(image, 0, -1)[None]
        write_nifti(path, volume, (1.0, *spacing), unit=unit, description=description)


def write_png(path: str | os.PathLike, x01: np.ndarray) -> None:
    """8-bit grey (or RGB when ``C == 3``) PNG of ``x01: (C, H, W)`` in [0, 1]; first channel otherwise."""
    from PIL import Image

    img = np.rint(np.clip(x01, 0, 1) * 255).astype(np.uint8)
    img = np.transpose(img, (1, 2, 0)) if img.shape[0] == 3 else img[0]
    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``array`` as a NumPy ``.npy`` file, dtype and shape unchanged."""
    with atomic_path(path) as tmp:
        np.save(tmp, array)

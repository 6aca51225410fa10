"""Reorientation to the project's array convention, shared by the DICOM and NIfTI readers.

CT/MR volumes are ``array[z, y, x]`` with z toward Superior, y toward Posterior and x toward
patient Left, i.e. NIfTI voxel axes ``(i, j, k) = (x, y, z)`` with orientation codes
``('L', 'P', 'S')`` (the "Volume in memory" contract of docs/architecture.md). Both readers
build the RAS affine of their ``(i, j, k)`` grid, reorient it with :mod:`nibabel.orientations`
and transpose ``(i, j, k) -> (k, j, i)``, so a label NIfTI lands voxel-for-voxel on its DICOM
image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel import orientations as nio

TARGET_CODES = ("L", "P", "S")
_TARGET = nio.axcodes2ornt(TARGET_CODES)


@dataclass(frozen=True)
class Reorientation:
    """How to bring an ``(i, j, k)`` grid to ``('L', 'P', 'S')``.

    Attributes:
        ornt: nibabel orientation transform, ``ornt[a] = (new axis of old axis a, flip)``.
        shape_ijk: the reoriented ``(i, j, k)`` shape.
        affine: 4x4 RAS affine of the reoriented ``(i, j, k)`` grid.
        zooms_ijk: voxel size along the reoriented ``(i, j, k)`` axes.
    """

    ornt: np.ndarray
    shape_ijk: tuple[int, int, int]
    affine: np.ndarray
    zooms_ijk: tuple[float, float, float]

    @property
    def is_identity(self) -> bool:
        return bool(np.all(self.ornt[:, 0] == np.arange(3)) and np.all(self.ornt[:, 1] == 1))

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return self.shape_ijk[::-1]

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return self.zooms_ijk[::-1]

    def apply_ijk(self, data: np.ndarray) -> np.ndarray:
        """Reorient ``data`` indexed ``(i, j, k, ...)``; returns a view where possible."""
        if self.is_identity:
            return data
        return nio.apply_orientation(data, self.ornt)

    def apply_kji(self, data: np.ndarray) -> np.ndarray:
        """Reorient ``data`` indexed ``(k, j, i)`` (slice, row, column); returns ``(z, y, x)``."""
        if self.is_identity:
            return data
        return self.apply_ijk(data.transpose(2, 1, 0)).transpose(2, 1, 0)


def plan_lps(affine_ras: np.ndarray, shape_ijk, zooms_ijk) -> Reorientation:
    """Plan the reorientation of an ``(i, j, k)`` grid with RAS affine ``affine_ras`` to LPS codes."""
    affine_ras = np.asarray(affine_ras, dtype=np.float64)
    ornt = nio.ornt_transform(nio.io_orientation(affine_ras), _TARGET).astype(int)
    shape_ijk = tuple(int(s) for s in shape_ijk[:3])
    new_affine = affine_ras @ nio.inv_ornt_aff(ornt, shape_ijk)
    new_shape = [0, 0, 0]
    new_zooms = [0.0, 0.0, 0.0]
    for old_axis, (new_axis, _flip) in enumerate(ornt):
        new_shape[new_axis] = shape_ijk[old_axis]
        new_zooms[new_axis] = float(zooms_ijk[old_axis])
    return Reorientation(ornt, tuple(new_shape), new_affine, tuple(new_zooms))

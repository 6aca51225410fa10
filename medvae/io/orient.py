"""Reorientation to the project's array convention, shared by the DICOM and NIfTI readers.

CT/MR volumes are ``array[z, y, x]`` with z toward Superior, y toward Posterior and x toward
patient Left, i.e. NIfTI voxel axes ``(i, j, k) = (x, y, z)`` with orientation codes
``('L', 'P', 'S')`` (the "Volume in memory" contract of docs/architecture.md). Both readers
build the RAS affine of their ``(i, j, k)`` grid, reorient it with :mod:`nibabel.orientations`
and transpose ``(i, j, k) -> (k, j, i)``, so a label NIfTI lands voxel-for-voxel on its DICOM
image.

Non-axial acquisitions keep their slices (:func:`plan_acquisition`): the grid's k axis (the
slice normal) stays the array's first axis, and only the in-plane axes and the direction of k
are permuted / flipped to the plane's display codes (:data:`PLANE_CODES`): axial ``LPS``,
coronal ``LIP`` (rows toward Inferior, slices toward Posterior), sagittal ``PIL`` (columns
toward Posterior, rows toward Inferior, slices toward Left). A sagittal stack of 20 images of
256x256 is therefore ``(20, 256, 256)``, never 256 "axial" slices of 20x256.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel import orientations as nio

TARGET_CODES = ("L", "P", "S")
_TARGET = nio.axcodes2ornt(TARGET_CODES)
# (i, j, k) codes = (column, row, slice) directions of array[k, r, c] per acquisition plane.
PLANE_CODES = {"axial": ("L", "P", "S"), "coronal": ("L", "I", "P"), "sagittal": ("P", "I", "L")}
_PLANE_OF_WORLD_AXIS = {0: "sagittal", 1: "coronal", 2: "axial"}  # the world axis the slice normal is nearest
OBLIQUE_DEGREES = 20.0  # a normal further than this from every patient axis makes the plane "oblique"


@dataclass(frozen=True)
class Reorientation:
    """How to bring an ``(i, j, k)`` grid to ``('L', 'P', 'S')``.

    Attributes:
        ornt: nibabel orientation transform, ``ornt[a] = (new axis of old axis a, flip)``.
        shape_ijk: the reoriented ``(i, j, k)`` shape.
        affine: 4x4 RAS affine of the reoriented ``(i, j, k)`` grid.
        zooms_ijk: voxel size along the reoriented ``(i, j, k)`` axes.
        codes: orientation codes of the reoriented ``(i, j, k)`` axes (``('L', 'P', 'S')`` unless
            the grid was planned in its acquisition plane).
        plane: ``axial`` | ``coronal`` | ``sagittal`` | ``oblique``: the patient plane of the
            array's slices ``array[k]``.
    """

    ornt: np.ndarray
    shape_ijk: tuple[int, int, int]
    affine: np.ndarray
    zooms_ijk: tuple[float, float, float]
    codes: tuple[str, str, str] = TARGET_CODES
    plane: str = "axial"

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
    return _plan(nio.ornt_transform(nio.io_orientation(affine_ras), _TARGET), affine_ras, shape_ijk, zooms_ijk)


def acquisition_plane(normal) -> tuple[str, int]:
    """The patient plane of slices with unit normal ``normal`` (RAS or LPS: only |components| count).

    Returns:
        (plane, world axis nearest the normal): plane ``axial`` | ``coronal`` | ``sagittal``, or
        ``oblique`` when the normal is more than :data:`OBLIQUE_DEGREES` from every patient axis.
    """
    n = np.abs(np.asarray(normal, dtype=np.float64))
    n = n / np.linalg.norm(n)
    axis = int(np.argmax(n))
    oblique = n[axis] < np.cos(np.deg2rad(OBLIQUE_DEGREES))
    return ("oblique" if oblique else _PLANE_OF_WORLD_AXIS[axis]), axis


def plan_acquisition(affine_ras: np.ndarray, shape_ijk, zooms_ijk) -> Reorientation:
    """Plan the reorientation of an ``(i, j, k)`` grid whose k axis is the slice normal, keeping k.

    The slices ``grid[:, :, k]`` stay whole images: k is only flipped (never exchanged with i or j)
    so that it points along its plane's code (Superior, Posterior or Left; an oblique normal takes
    the nearest plane's), and i, j are permuted / flipped within the slice to the plane's codes
    (:data:`PLANE_CODES`). An axial grid gets exactly :func:`plan_lps`'s result.
    """
    affine_ras = np.asarray(affine_ras, dtype=np.float64)
    dirs = affine_ras[:3, :3] / np.linalg.norm(affine_ras[:3, :3], axis=0)  # unit world direction per voxel axis
    plane, k_axis = acquisition_plane(dirs[:, 2])
    rest = [a for a in range(3) if a != k_axis]
    # i and j take the two remaining world axes, whichever assignment is closer.
    straight = abs(dirs[rest[0], 0]) + abs(dirs[rest[1], 1])
    crossed = abs(dirs[rest[1], 0]) + abs(dirs[rest[0], 1])
    world = [rest[0], rest[1], k_axis] if straight >= crossed else [rest[1], rest[0], k_axis]
    start = np.array([[w, 1.0 if dirs[w, a] >= 0 else -1.0] for a, w in enumerate(world)])
    codes = PLANE_CODES[_PLANE_OF_WORLD_AXIS[k_axis]]
    ornt = nio.ornt_transform(start, nio.axcodes2ornt(codes))
    return _plan(ornt, affine_ras, shape_ijk, zooms_ijk, codes, plane)


def _plan(ornt, affine_ras, shape_ijk, zooms_ijk, codes=TARGET_CODES, plane="axial") -> Reorientation:
    ornt = np.asarray(ornt).astype(int)
    shape_ijk = tuple(int(s) for s in shape_ijk[:3])
    new_affine = affine_ras @ nio.inv_ornt_aff(ornt, shape_ijk)
    new_shape = [0, 0, 0]
    new_zooms = [0.0, 0.0, 0.0]
    for old_axis, (new_axis, _flip) in enumerate(ornt):
        new_shape[new_axis] = shape_ijk[old_axis]
        new_zooms[new_axis] = float(zooms_ijk[old_axis])
    return Reorientation(ornt, tuple(new_shape), new_affine, tuple(new_zooms), tuple(codes), plane)

"""Non-axial DICOM: sagittal, coronal and oblique series keep their acquired slices.

Real single slices from pydicom's own test files (a sagittal and an oblique MR, a coronal and a
sagittal CT) and synthetic thin stacks: the plane is recorded, ``array[k]`` is an acquired image
(never a 16x1 strip), and every stored pixel (through pydicom's ``apply_modality_lut``) sits where
the volume's affine maps its world position, computed here from the file's own geometry.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from medvae.io.dicom import inspect_dicom_series, read_dicom_series
from medvae.io.orient import PLANE_CODES, plan_acquisition, plan_lps
from tests.factories import dicom_series

DICOMDIR_TESTS = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"


def _lands(vol, datasets):
    """Each stored pixel of each single-frame dataset sits where the affine maps its world position."""
    inv = np.linalg.inv(vol.affine)
    for ds in datasets:
        values = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        dy, dx = (float(v) for v in ds.PixelSpacing)
        rr, cc = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
        world = ipp + cc[..., None] * dx * iop[:3] + rr[..., None] * dy * iop[3:]
        ras = np.stack([-world[..., 0], -world[..., 1], world[..., 2], np.ones(world.shape[:2])], -1)
        ijk = np.round(ras @ inv.T)[..., :3].astype(int)
        np.testing.assert_array_equal(vol.array[ijk[..., 2], ijk[..., 1], ijk[..., 0]], values)


@pytest.mark.parametrize(
    "rel, plane, expected",
    [
        # IOP rows toward P, columns toward I: the sagittal display codes already.
        ("98892003/MR1/4919", "sagittal", lambda px: px),
        # IOP rows toward L, columns toward I: coronal display codes already.
        ("98892001/CT2N/6924", "coronal", lambda px: px),
        # IOP rows toward anterior: columns reversed to run toward posterior.
        ("98892001/CT2N/6293", "sagittal", lambda px: px[:, ::-1]),
        # A single oblique slice (normal 41 degrees from the sagittal axis, rows in the axial plane).
        ("98892003/MR700/4467", "oblique", lambda px: px),
    ],
)
def test_real_single_slices_keep_their_plane(tmp_path, rel, plane, expected):
    src = DICOMDIR_TESTS / rel
    shutil.copy(src, tmp_path / src.name)
    ds = pydicom.dcmread(src)
    vol = read_dicom_series(tmp_path)
    assert vol.plane == plane
    assert vol.array.shape == (1, ds.Rows, ds.Columns)  # the acquired image, not Rows strips of 1 pixel
    dy, dx = (float(v) for v in ds.PixelSpacing)
    assert vol.spacing[1:] == pytest.approx((dy, dx))
    np.testing.assert_array_equal(vol.array[0], expected(apply_modality_lut(ds.pixel_array, ds).astype(np.float32)))
    _lands(vol, [ds])
    info = inspect_dicom_series(tmp_path)
    assert info.plane == plane and info.shape == vol.array.shape


def _stack(folder, *, row, col, n=6, rows=24, cols=20, dz=4.0, dxy=(0.8, 0.6), origin=(5.0, -30.0, 60.0), seed=0):
    """A thin single-frame MR stack in any plane, files in shuffled order."""
    rng = np.random.default_rng(seed)
    names = rng.permutation(n)
    pixels = np.stack([rng.integers(0, 4000, (rows, cols)).astype(np.uint16) for _ in range(n)])
    dicom_series(folder, pixels, modality="MR", row_dir=row, col_dir=col, origin=origin, dz=dz, pixel_spacing=dxy,
                 names=[f"MR{i:03d}.dcm" for i in names], numbers=names + 1)
    return [pydicom.dcmread(f) for f in sorted(folder.iterdir())]


S45 = np.sqrt(0.5)


@pytest.mark.parametrize(
    "row, col, plane",
    [
        ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), "sagittal"),
        ((0.0, 0.0, -1.0), (0.0, -1.0, 0.0), "sagittal"),  # rows toward inferior: the image is transposed
        ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), "coronal"),
        ((-1.0, 0.0, 0.0), (0.0, 0.0, 1.0), "coronal"),
        ((1.0, 0.0, 0.0), (0.0, S45, -S45), "oblique"),  # 45 degrees between axial and coronal
        ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), "axial"),
    ],
)
def test_thin_stacks_slice_in_their_acquisition_plane(tmp_path, row, col, plane):
    n, rows, cols = 6, 24, 20
    datasets = _stack(tmp_path, row=row, col=col, n=n, rows=rows, cols=cols)
    vol = read_dicom_series(tmp_path)
    assert vol.plane == plane and vol.warnings == []
    transposed = abs(row[2]) > 0.5  # rows of the file run along the slice's vertical axis
    assert vol.array.shape == ((n, cols, rows) if transposed else (n, rows, cols))
    assert vol.spacing[0] == pytest.approx(4.0)
    assert vol.spacing[1:] == pytest.approx((0.6, 0.8) if transposed else (0.8, 0.6))
    _lands(vol, datasets)
    if plane != "oblique":  # an oblique grid's nearest axis codes are ambiguous at 45 degrees
        assert tuple(vol.orientation) == PLANE_CODES[plane] == nib.aff2axcodes(vol.affine)


def test_plan_acquisition_keeps_k_and_equals_plan_lps_for_axial():
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(0)
    for _ in range(300):
        perm = rng.permutation(3)  # voxel axis a runs along world axis perm[a], tilted up to 15 degrees
        base = np.zeros((3, 3))
        base[perm, np.arange(3)] = rng.choice([-1.0, 1.0], 3)
        axis = rng.normal(size=3)
        tilt = Rotation.from_rotvec(axis / np.linalg.norm(axis) * np.deg2rad(rng.uniform(0, 15))).as_matrix()
        affine = np.eye(4)
        affine[:3, :3] = tilt @ base * rng.uniform(0.5, 3.0, 3)
        plan = plan_acquisition(affine, (5, 6, 7), (1.0, 2.0, 3.0))
        assert plan.ornt[2, 0] == 2  # the slice axis stays the slice axis
        assert plan.shape_ijk[2] == 7 and plan.zooms_ijk[2] == 3.0
        assert plan.plane == {0: "sagittal", 1: "coronal", 2: "axial"}[perm[2]]
        assert nib.aff2axcodes(plan.affine) == plan.codes == PLANE_CODES[plan.plane]
        if plan.plane == "axial":
            lps = plan_lps(affine, (5, 6, 7), (1.0, 2.0, 3.0))
            np.testing.assert_array_equal(plan.ornt, lps.ornt)
            np.testing.assert_allclose(plan.affine, lps.affine)

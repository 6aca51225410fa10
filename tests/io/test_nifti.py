"""NIfTI reader: nibabel's shipped files, reorientation against nibabel's own canonical form, bad input."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from medvae.errors import InputError
from medvae.io.nifti import inspect_nifti, read_nifti
from medvae.io.orient import PLANE_CODES


def _reference_zyx(img) -> np.ndarray:
    """Independent reference: nibabel's RAS canonical form, flipped to L, P, S, as (k, j, i)."""
    canon = nib.as_closest_canonical(img)
    assert nib.aff2axcodes(canon.affine) == ("R", "A", "S")
    data = np.asarray(canon.dataobj, dtype=np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    return data[::-1, ::-1, :].transpose(2, 1, 0)


def _canonical_zooms_zyx(img) -> tuple[float, ...]:
    return tuple(float(z) for z in nib.as_closest_canonical(img).header.get_zooms()[:3][::-1])


def test_example4d_first_volume_with_warning():
    path = data_path / "example4d.nii.gz"
    img = nib.load(path)
    assert img.shape == (128, 96, 24, 2)
    vol = read_nifti(path)
    assert vol.array.dtype == np.float32 and vol.array.shape == (24, 96, 128)
    np.testing.assert_array_equal(vol.array, _reference_zyx(img))
    assert vol.spacing == pytest.approx(_canonical_zooms_zyx(img))
    assert any("first volume" in w for w in vol.warnings)
    assert vol.patient_id == "example4d" and vol.modality == "ct" and vol.orientation == "LPS"
    info = inspect_nifti(path)
    assert info.shape == vol.array.shape and info.spacing == pytest.approx(vol.spacing)
    assert any("first volume" in w for w in info.warnings)


def test_anatomical_shape_spacing_and_affine():
    path = data_path / "anatomical.nii"
    img = nib.load(path)
    vol = read_nifti(path, patient_id="sub01", modality="mr")
    assert vol.array.shape == img.shape[::-1]  # header is ('L','A','S'): only j is flipped
    np.testing.assert_array_equal(vol.array, _reference_zyx(img))
    assert vol.spacing == pytest.approx(tuple(float(z) for z in img.header.get_zooms()[::-1]))
    assert nib.aff2axcodes(vol.affine) == ("L", "P", "S")
    assert vol.patient_id == "sub01" and vol.modality == "mr"
    # The reoriented affine maps each voxel to the same world point as the original one.
    i, j, k = 5, 7, 3  # index in the original (i, j, k) grid
    world = img.affine @ np.array([i, j, k, 1.0])
    ii, jj, kk = np.round(np.linalg.inv(vol.affine) @ world)[:3].astype(int)
    assert vol.array[kk, jj, ii] == np.asarray(img.dataobj)[i, j, k]


@pytest.mark.parametrize(
    "perm, flips",
    [((0, 1, 2), (1, 1, 1)), ((0, 1, 2), (-1, -1, -1)), ((2, 0, 1), (1, -1, 1)), ((1, 2, 0), (-1, 1, -1))],
)
def test_any_affine_reads_back_canonical(tmp_path, perm, flips):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(7, 9, 11)).astype(np.float32)
    zooms = np.array([0.5, 1.5, 2.5])
    affine = np.zeros((4, 4))
    for axis in range(3):  # voxel axis `axis` runs along world axis perm[axis]
        affine[perm[axis], axis] = flips[axis] * zooms[axis]
    affine[:3, 3] = (10.0, -20.0, 30.0)
    affine[3, 3] = 1.0
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    img = nib.load(path)
    vol = read_nifti(path)
    # The slice axis is the voxel axis whose direction is nearest the acquisition plane's normal (here the
    # third, k); the slices stay whole images, reoriented within the plane to its display codes.
    plane = {0: "sagittal", 1: "coronal", 2: "axial"}[perm[2]]
    codes = PLANE_CODES[plane]
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                          nib.orientations.axcodes2ornt(codes))
    expected = nib.orientations.apply_orientation(data, ornt).transpose(2, 1, 0)
    assert vol.plane == plane and vol.orientation == "".join(codes)
    np.testing.assert_array_equal(vol.array, expected)
    assert nib.aff2axcodes(vol.affine) == codes
    if plane == "axial":
        np.testing.assert_array_equal(vol.array, _reference_zyx(img))
        assert vol.spacing == pytest.approx(_canonical_zooms_zyx(img))


def test_nan_voxels_raise_naming_file(tmp_path):
    data = np.zeros((4, 5, 6), np.float32)
    data[1, 2, 3] = np.nan
    path = tmp_path / "nanny.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(InputError, match="nanny.nii.gz.*NaN"):
        read_nifti(path)
    assert inspect_nifti(path).shape == (6, 5, 4)  # header-only look cannot see NaNs


def test_empty_4th_dimension_and_corrupt_files(tmp_path):
    path = tmp_path / "empty4d.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 0), np.float32), np.eye(4)), path)
    with pytest.raises(InputError, match="empty4d.nii.*empty 4th"):
        read_nifti(path)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(gzip.compress(b"this is not a nifti header"))
    with pytest.raises(InputError, match="bad.nii.gz"):
        inspect_nifti(bad)
    with pytest.raises(InputError, match="no such"):
        read_nifti(tmp_path / "missing.nii")
    # Truncated voxel data: header fine, data short.
    good = tmp_path / "cut.nii"
    nib.save(nib.Nifti1Image(np.ones((16, 16, 16), np.float32), np.eye(4)), good)
    good.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(InputError, match="cut.nii"):
        read_nifti(good)

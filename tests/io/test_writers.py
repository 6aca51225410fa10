"""File writers, each read back by the file format's own library (nibabel, tifffile, Pillow, NumPy)
and, where one exists, by the project's reader of that format."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image

from medvae.io.nifti import read_nifti
from medvae.io.tiff import read_tiff_stack
from medvae.io.writers import ras_affine, write_nifti, write_npy, write_png, write_slice, write_tiff


def _no_temporaries(folder):
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_ras_affine_maps_voxels_to_lps_positions():
    spacing, origin = (2.5, 0.8, 0.7), (-100.0, -80.0, -250.0)  # (dz, dy, dx), LPS (x, y, z)
    affine = ras_affine(spacing, origin)
    for i, j, k in [(0, 0, 0), (3, 5, 7), (10, 0, 2)]:  # voxel (column x, row y, slice z)
        lps = np.array(origin) + np.array([i * 0.7, j * 0.8, k * 2.5])
        np.testing.assert_allclose(affine @ [i, j, k, 1], [-lps[0], -lps[1], lps[2], 1])
    assert nib.aff2axcodes(affine) == ("L", "P", "S")


def test_nifti_label_volume(tmp_path):
    label = np.zeros((6, 12, 10), np.uint8)  # (Z, Y, X)
    label[2:4, 3:7, 1:5] = 1
    spacing, origin = (2.0, 0.8, 0.7), (-3.5, 4.0, -120.0)
    write_nifti(tmp_path / "label.nii.gz", label, spacing, origin, unit="mm")
    img = nib.load(tmp_path / "label.nii.gz")
    data = np.asanyarray(img.dataobj)
    assert data.dtype == np.uint8 and data.shape == (10, 12, 6)  # voxel axes (X, Y, Z)
    np.testing.assert_array_equal(data.transpose(2, 1, 0), label)
    assert img.header.get_zooms() == pytest.approx((0.7, 0.8, 2.0))
    np.testing.assert_allclose(img.affine, ras_affine(spacing, origin), atol=1e-5)
    assert int(img.header["qform_code"]) == int(img.header["sform_code"]) == 1
    assert img.header.get_xyzt_units()[0] == "mm"
    vol = read_nifti(tmp_path / "label.nii.gz")  # the project's reader: the same array, LPS
    assert vol.orientation == "LPS" and np.array_equal(vol.array, label)
    assert vol.spacing == pytest.approx(spacing)
    assert _no_temporaries(tmp_path)


def test_nifti_slice_hu_int16_reads_back_as_the_patch(tmp_path):
    patch = (np.arange(12 * 10, dtype=np.int16) - 60).reshape(1, 12, 10)  # rows y, columns x
    write_slice(tmp_path / "p.nii.gz", patch, (0.8, 0.7), "mm", description="medvae synthetic")
    img = nib.load(tmp_path / "p.nii.gz")
    assert img.get_data_dtype() == np.int16 and img.shape == (10, 12, 1)
    assert img.header.get_zooms() == pytest.approx((0.7, 0.8, 1.0))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    assert img.header["descrip"].tobytes().rstrip(b"\0") == b"medvae synthetic"
    vol = read_nifti(tmp_path / "p.nii.gz")
    assert np.array_equal(vol.array[0], patch[0]) and vol.spacing[1:] == pytest.approx((0.8, 0.7))


def test_nifti_slice_channels_last(tmp_path):
    image = np.arange(2 * 4 * 3, dtype=np.int16).reshape(2, 4, 3)  # (C, H, W)
    write_slice(tmp_path / "c.nii.gz", image, (1.0, 1.0))
    data = np.asanyarray(nib.load(tmp_path / "c.nii.gz").dataobj)
    assert data.shape == (3, 4, 1, 2)
    np.testing.assert_array_equal(data[:, :, 0, 1].T, image[1])


def test_imagej_tiff_slice_um(tmp_path):
    image = np.arange(12 * 10, dtype=np.uint16).reshape(1, 12, 10) * 50
    write_slice(tmp_path / "m.tif", image, (0.3, 0.25), "um")
    with tifffile.TiffFile(tmp_path / "m.tif") as tif:
        assert tif.is_imagej and tif.imagej_metadata["unit"] == "um"
        assert tif.series[0].axes == "YX"
        xres, yres = tif.pages[0].get_resolution()  # pixels per µm
        data = tif.asarray()
    assert data.dtype == np.uint16 and np.array_equal(data, image[0])
    assert 1 / xres == pytest.approx(0.25, rel=1e-6) and 1 / yres == pytest.approx(0.3, rel=1e-6)


def test_imagej_tiff_stack_spacing_reads_back(tmp_path):
    stack = np.random.default_rng(0).integers(0, 4000, (5, 16, 12)).astype(np.uint16)
    write_tiff(tmp_path / "s.tif", stack, "ZYX", (1.5, 0.4, 0.4), unit="um")
    with tifffile.TiffFile(tmp_path / "s.tif") as tif:
        meta = tif.imagej_metadata
        assert tif.series[0].axes == "ZYX" and meta["spacing"] == pytest.approx(1.5) and meta["unit"] == "um"
        assert 1 / tif.pages[0].get_resolution()[0] == pytest.approx(0.4, rel=1e-6)
    vol = read_tiff_stack(tmp_path / "s.tif")  # the project's reader
    assert np.array_equal(vol.array, stack) and vol.spacing == pytest.approx((1.5, 0.4, 0.4))
    assert _no_temporaries(tmp_path)


def test_plain_tiff_int16_mm_stores_pixels_per_cm(tmp_path):
    image = np.full((1, 8, 6), -60, np.int16)
    write_slice(tmp_path / "ct.tif", image, (0.8, 0.7), "mm")
    with tifffile.TiffFile(tmp_path / "ct.tif") as tif:
        page = tif.pages[0]
        assert not tif.is_imagej and page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        xres, yres = page.get_resolution()  # pixels per cm
        data = page.asarray()
    assert data.dtype == np.int16 and np.all(data == -60)
    assert 10 / xres == pytest.approx(0.7, rel=1e-6) and 10 / yres == pytest.approx(0.8, rel=1e-6)


def test_tiff_refuses_spacing_that_does_not_match_axes(tmp_path):
    with pytest.raises(ValueError, match="disagree"):
        write_tiff(tmp_path / "x.tif", np.zeros((3, 4, 4), np.uint16), "ZYX", (0.4, 0.4))
    assert not (tmp_path / "x.tif").exists()


def test_png_preview_grey_and_rgb(tmp_path):
    x = np.linspace(0, 1, 4 * 5, dtype=np.float32).reshape(1, 4, 5)
    x[0, 0, 0], x[0, 0, 1] = -0.5, 1.5  # clipped
    write_png(tmp_path / "g.png", x)
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "L" and im.size == (5, 4)
        got = np.asarray(im)
    np.testing.assert_array_equal(got, np.rint(np.clip(x[0], 0, 1) * 255).astype(np.uint8))
    rgb = np.random.default_rng(1).random((3, 4, 5)).astype(np.float32)
    write_png(tmp_path / "c.png", rgb)
    with Image.open(tmp_path / "c.png") as im:
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), np.rint(rgb.transpose(1, 2, 0) * 255).astype(np.uint8))


def test_npy_keeps_dtype_and_shape(tmp_path):
    x = np.random.default_rng(2).random((2, 3, 4)).astype(np.float32)
    write_npy(tmp_path / "x.npy", x)
    y = np.load(tmp_path / "x.npy")
    assert y.dtype == np.float32 and np.array_equal(x, y)


def test_same_array_same_bytes(tmp_path):
    """No timestamps: rewriting the same array gives the same file (generate's byte-identity)."""
    vol = np.random.default_rng(3).integers(-1000, 1000, (1, 9, 7)).astype(np.int16)
    for name in ("a.nii.gz", "a.tif"):
        write_slice(tmp_path / name, vol, (0.5, 0.5))
        first = (tmp_path / name).read_bytes()
        write_slice(tmp_path / name, vol, (0.5, 0.5))
        assert (tmp_path / name).read_bytes() == first
    assert _no_temporaries(tmp_path)

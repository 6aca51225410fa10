"""TIFF stack reader: scikit-image's cell.png, ImageJ hyperstacks, OME-TIFF, RGB(A), bad input."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import tifffile
from skimage import data as skdata

from medvae.errors import InputError
from medvae.io.tiff import inspect_tiff, read_tiff_stack


def test_cell_png_as_stack(tmp_path):
    cell = skdata.cell()  # (660, 550) uint8, shipped with scikit-image
    stack = np.stack([cell, cell[::-1], 255 - cell])
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    vol = read_tiff_stack(path)
    assert vol.array.dtype == np.float32 and vol.array.shape == (3, 660, 550)
    np.testing.assert_array_equal(vol.array, stack.astype(np.float32))
    assert vol.modality == "microscopy" and vol.orientation == "ZYX" and vol.affine is None
    assert vol.patient_id == "cells"
    assert any("no physical pixel size" in w for w in vol.warnings)
    info = inspect_tiff(path)
    assert info.shape == (3, 660, 550) and info.n_channels == 1


def test_single_2d_image_is_one_slice(tmp_path):
    cell = skdata.cell()
    path = tmp_path / "one.tiff"
    tifffile.imwrite(path, cell, resolution=(10000 / 0.65, 10000 / 0.65), resolutionunit="CENTIMETER")
    vol = read_tiff_stack(path)
    assert vol.array.shape == (1, 660, 550)
    np.testing.assert_array_equal(vol.array[0], cell)
    assert vol.spacing[1:] == pytest.approx((0.65, 0.65))  # 1 cm = 10^4 µm


def test_imagej_hyperstack_channels_time_spacing(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 65535, (2, 5, 3, 24, 20)).astype(np.uint16)  # T Z C Y X
    path = tmp_path / "hyper.tif"
    tifffile.imwrite(
        path, data, imagej=True, resolution=(1 / 0.25, 1 / 0.3),
        metadata={"spacing": 2.0, "unit": "um", "axes": "TZCYX"},
    )
    vol = read_tiff_stack(path)
    assert vol.array.shape == (3, 5, 24, 20)  # (C, Z, Y, X), first time point
    np.testing.assert_array_equal(vol.array, data[0].transpose(1, 0, 2, 3).astype(np.float32))
    assert vol.spacing == pytest.approx((2.0, 0.3, 0.25))
    assert any("time points" in w for w in vol.warnings)
    info = inspect_tiff(path)
    assert info.shape == (5, 24, 20) and info.n_channels == 3 and info.spacing == pytest.approx(vol.spacing)


def test_imagej_nm_units_and_single_channel(tmp_path):
    data = np.arange(4 * 8 * 9, dtype=np.float32).reshape(4, 8, 9)
    path = tmp_path / "nm.tif"
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / 100.0, 1 / 100.0),
                     metadata={"spacing": 500.0, "unit": "nm", "axes": "ZYX"})
    vol = read_tiff_stack(path)
    np.testing.assert_array_equal(vol.array, data)
    assert vol.spacing == pytest.approx((0.5, 0.1, 0.1))
    assert vol.warnings == []


def test_ome_axes_and_physical_size(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.random((3, 2, 16, 12)).astype(np.float32)  # Z C Y X
    path = tmp_path / "stack.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={
        "axes": "ZCYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.6, "PhysicalSizeZ": 1.5,
    })
    vol = read_tiff_stack(path)
    assert vol.array.shape == (2, 3, 16, 12)
    np.testing.assert_array_equal(vol.array, data.transpose(1, 0, 2, 3))
    assert vol.spacing == pytest.approx((1.5, 0.6, 0.5))
    assert vol.patient_id == "stack"


def test_rgba_to_channels_alpha_dropped(tmp_path):
    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 255, (10, 12, 4)).astype(np.uint8)
    path = tmp_path / "rgba.tif"
    tifffile.imwrite(path, rgba, photometric="rgb")
    vol = read_tiff_stack(path)
    assert vol.array.shape == (3, 1, 10, 12)
    np.testing.assert_array_equal(vol.array[:, 0], rgba[..., :3].transpose(2, 0, 1).astype(np.float32))
    assert inspect_tiff(path).n_channels == 3


def test_empty_zero_page_and_bad_tiffs(tmp_path):
    zero_page = tmp_path / "zeropage.tif"
    zero_page.write_bytes(b"II*\x00" + struct.pack("<I", 0))  # header, no IFD
    with pytest.raises(InputError, match="zeropage.tif.*zero pages"):
        read_tiff_stack(zero_page)
    empty = tmp_path / "empty.tif"
    with pytest.warns(UserWarning):
        tifffile.imwrite(empty, np.zeros((0, 8, 8), np.uint16))
    with pytest.raises(InputError, match="empty.tif.*empty"):
        inspect_tiff(empty)
    zero_bytes = tmp_path / "zero.tif"
    zero_bytes.write_bytes(b"")
    with pytest.raises(InputError, match="zero.tif"):
        read_tiff_stack(zero_bytes)
    with pytest.raises(InputError, match="no such"):
        read_tiff_stack(tmp_path / "missing.tif")


def test_monai_tiff_reader(tmp_path):
    from monai.transforms import LoadImaged

    from medvae.io.monai_readers import VolumeReader

    data = np.arange(2 * 3 * 8 * 9, dtype=np.uint16).reshape(3, 2, 8, 9)  # Z C Y X
    path = tmp_path / "m.tif"
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / 0.2, 1 / 0.2),
                     metadata={"spacing": 1.0, "unit": "um", "axes": "ZCYX"})
    out = LoadImaged(keys=["image"], reader=VolumeReader(), image_only=False)({"image": str(path)})
    img = out["image"]
    assert tuple(img.shape) == (2, 3, 8, 9)
    np.testing.assert_array_equal(img.numpy(), data.transpose(1, 0, 2, 3).astype(np.float32))
    assert img.meta["patient_id"] == "m" and img.meta["modality"] == "microscopy"
    assert tuple(img.meta["spatial_shape"]) == (3, 8, 9)
    assert img.pixdim.tolist() == pytest.approx([1.0, 0.2, 0.2])


def _rational_spacing(path) -> tuple[float | None, float | None]:
    """Reference: (x, y) µm from the raw X/YResolution rationals, as the reader computed it by hand
    before it used ``TiffPage.get_resolution`` (den / num * µm per unit)."""
    um = {"um": 1.0, "nm": 1e-3, "mm": 1e3}
    with tifffile.TiffFile(path) as tif:
        tags, ij = tif.pages.first.tags, tif.imagej_metadata
        unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 1
        scale = um[ij["unit"]] if ij else {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}.get(int(unit))
        out = []
        for tag in ("XResolution", "YResolution"):
            num, den = tags[tag].value
            out.append(den / num * scale if scale else None)
    return tuple(out)


@pytest.mark.parametrize(
    ("kwargs", "expected_yx"),
    [
        ({"imagej": True, "resolution": (1 / 0.173, 1 / 0.25), "metadata": {"unit": "um"}}, (0.25, 0.173)),
        ({"imagej": True, "resolution": (1 / 64.5, 1 / 64.5), "metadata": {"unit": "nm"}}, (0.0645, 0.0645)),
        ({"resolution": (10000 / 0.65, 10000 / 0.65), "resolutionunit": "CENTIMETER"}, (0.65, 0.65)),
        ({"resolution": (25400 / 3.0, 25400 / 2.0), "resolutionunit": "INCH"}, (2.0, 3.0)),
        ({"resolution": (1 / 0.004, 1 / 0.004), "resolutionunit": "MILLIMETER"}, (4.0, 4.0)),
        ({"resolution": (1 / 0.3, 1 / 0.3), "resolutionunit": "MICROMETER"}, (0.3, 0.3)),
    ],
)
def test_resolution_tags_match_the_rationals(tmp_path, kwargs, expected_yx):
    """``get_resolution`` gives the pixel size the raw rationals give (to float rounding)."""
    path = tmp_path / "r.tif"
    tifffile.imwrite(path, np.zeros((2, 6, 5), np.uint16), **kwargs)
    vol = read_tiff_stack(path)
    assert vol.spacing[1:] == pytest.approx(expected_yx, rel=1e-6)  # rationals are rounded when written
    ref_x, ref_y = _rational_spacing(path)
    assert vol.spacing[1:] == pytest.approx((ref_y, ref_x), rel=1e-12)
    assert vol.warnings == []


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"resolution": (72.0, 72.0), "resolutionunit": "INCH"}, {"resolution": (5.0, 5.0), "resolutionunit": "NONE"}],
)
def test_no_physical_resolution_gives_unit_spacing(tmp_path, kwargs):
    """No tags, a default 72 dpi, or a unitless resolution: spacing 1 with a warning, not a made-up size."""
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, np.zeros((2, 6, 5), np.uint16), **kwargs)
    vol = read_tiff_stack(path)
    assert vol.spacing == (1.0, 1.0, 1.0) and "no physical pixel size" in vol.warnings[0]


def test_ome_physical_size_matches_element_tree(tmp_path):
    """``xml2dict`` reads the same PhysicalSize values and units as a plain ElementTree walk of the OME-XML."""
    import xml.etree.ElementTree as ET

    path = tmp_path / "units.ome.tif"
    tifffile.imwrite(path, np.zeros((3, 6, 5), np.uint16), ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 173.0, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 0.2,
        "PhysicalSizeZ": 0.0015, "PhysicalSizeZUnit": "mm",
    })
    with tifffile.TiffFile(path) as tif:
        root = ET.fromstring(tif.ome_metadata)
    pixels = next(el for el in root.iter() if el.tag.endswith("Pixels"))
    um = {"nm": 1e-3, "µm": 1.0, "mm": 1e3}
    ref = {ax: float(pixels.get(f"PhysicalSize{ax}")) * um[pixels.get(f"PhysicalSize{ax}Unit", "µm")] for ax in "ZYX"}
    assert read_tiff_stack(path).spacing == pytest.approx((ref["Z"], ref["Y"], ref["X"]), rel=1e-12)
    assert read_tiff_stack(path).spacing == pytest.approx((1.5, 0.2, 0.173))

"""Enhanced multi-frame DICOM: frame geometry and rescale from the functional groups.

Every expectation is computed here, independently of the reader: frame positions and
orientation straight from the functional group sequences with plain numpy, stored values from
pydicom's own ``pixel_array`` and ``apply_modality_lut``, and each stored pixel is looked up
where the volume's affine says its world position lands.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.sequence import Sequence

from medvae.io.dicom import inspect_dicom_series, read_dicom_series

# Enhanced CT / MR files ship in pydicom-data (the `dev` extra); without it pydicom would try to
# download them, so those tests skip instead.
HAS_PYDICOM_DATA = importlib.util.find_spec("data_store") is not None
needs_data = pytest.mark.skipif(not HAS_PYDICOM_DATA, reason="pydicom-data is not installed")


def _ras(p_lps):
    return np.array([-p_lps[0], -p_lps[1], p_lps[2]])


def _group(ds, f, keyword):
    """Functional group ``keyword`` of frame f: per-frame item first, else the shared one."""
    for groups in (ds.PerFrameFunctionalGroupsSequence[f], ds.SharedFunctionalGroupsSequence[0]):
        if keyword in groups:
            return groups[keyword][0]
    raise KeyError(keyword)


def _frames_in_units(ds) -> np.ndarray:
    """pydicom's stored values of each frame through apply_modality_lut with the frame's rescale."""
    px = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    out = []
    for f in range(px.shape[0]):
        t = _group(ds, f, "PixelValueTransformationSequence")
        d = Dataset()
        d.RescaleSlope, d.RescaleIntercept = t.RescaleSlope, t.RescaleIntercept
        out.append(apply_modality_lut(px[f], d).astype(np.float32))
    return np.stack(out)


def _check_every_pixel_lands(vol, ds, values):
    """Each stored pixel (f, r, c) sits where the affine maps its world position."""
    inv = np.linalg.inv(vol.affine)
    dy, dx = (float(v) for v in _group(ds, 0, "PixelMeasuresSequence").PixelSpacing)
    for f in range(values.shape[0]):
        ipp = np.array([float(v) for v in _group(ds, f, "PlanePositionSequence").ImagePositionPatient])
        iop = np.array([float(v) for v in _group(ds, f, "PlaneOrientationSequence").ImageOrientationPatient])
        rr, cc = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
        world = ipp + cc[..., None] * dx * iop[:3] + rr[..., None] * dy * iop[3:]
        ras = np.stack([-world[..., 0], -world[..., 1], world[..., 2], np.ones(world.shape[:2])], -1)
        ijk = np.round(ras @ inv.T)[..., :3].astype(int)
        np.testing.assert_array_equal(vol.array[ijk[..., 2], ijk[..., 1], ijk[..., 0]], values[f])


@needs_data
def test_enhanced_ct_real_file(tmp_path):
    src = get_testdata_file("eCT_Supplemental.dcm")
    shutil.copy(src, tmp_path / "eCT_Supplemental.dcm")
    ds = pydicom.dcmread(src)
    vol = read_dicom_series(tmp_path)
    assert vol.array.dtype == np.float32 and vol.array.shape == (2, 512, 512)
    assert vol.modality == "ct" and vol.plane == "axial" and vol.orientation == "LPS" and vol.warnings == []
    # Independent: frames by patient z (superior last); IOP row (-1, 0, 0) runs toward patient right,
    # so columns are reversed to run toward the left.
    z = [float(_group(ds, f, "PlanePositionSequence").ImagePositionPatient[2]) for f in range(2)]
    values = _frames_in_units(ds)
    np.testing.assert_array_equal(vol.array, values[np.argsort(z)][:, :, ::-1])
    assert values.min() == -1024.0  # the shared Pixel Value Transformation (intercept -1024) applied
    assert vol.spacing == pytest.approx((abs(z[1] - z[0]), 0.388672, 0.388672))
    _check_every_pixel_lands(vol, ds, values)
    info = inspect_dicom_series(tmp_path)
    assert info.shape == vol.array.shape and info.spacing == pytest.approx(vol.spacing)
    assert info.plane == "axial" and info.series_uid == ds.SeriesInstanceUID


def _item(**kw) -> Dataset:
    d = Dataset()
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def _enhanced_from(name, out, *, row, col, positions, slope_frames, shared=(0.5, -100.0), dxy=(0.9, 1.1)):
    """emri_small (real enhanced MR pixel data, any transfer syntax) with functional groups written here.

    Frame f sits at ``positions[f]``; frames in ``slope_frames`` carry their own (slope, intercept),
    the rest use the shared one.
    """
    ds = pydicom.dcmread(get_testdata_file(name))
    n = int(ds.NumberOfFrames)
    shared_item = _item(
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=[*row, *col])]),
        PixelMeasuresSequence=Sequence([_item(PixelSpacing=list(dxy), SliceThickness=3.0)]),
        PixelValueTransformationSequence=Sequence([_item(RescaleSlope=shared[0], RescaleIntercept=shared[1],
                                                         RescaleType="US")]),
    )
    per_frame = []
    for f in range(n):
        item = _item(PlanePositionSequence=Sequence([_item(ImagePositionPatient=list(positions[f]))]))
        if f in slope_frames:
            s, i = slope_frames[f]
            item.PixelValueTransformationSequence = Sequence([_item(RescaleSlope=s, RescaleIntercept=i,
                                                                    RescaleType="US")])
        per_frame.append(item)
    ds.SharedFunctionalGroupsSequence = Sequence([shared_item])
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.save_as(out)
    return pydicom.dcmread(out)


@needs_data
@pytest.mark.parametrize("name", ["emri_small.dcm", "emri_small_big_endian.dcm", "emri_small_RLE.dcm"])
def test_enhanced_mr_frames_sorted_along_normal_with_per_frame_rescale(tmp_path, name):
    n = 10
    rng = np.random.default_rng(0)
    order = rng.permutation(n)  # frame f is the order[f]-th slice along the normal
    row, col = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])  # sagittal: normal toward patient right
    normal = np.cross(row, col)
    positions = np.array([10.0, -50.0, 80.0]) + order[:, None] * 3.0 * normal
    # Frame 3: a slope whose float32 product is inexact (pydicom's float64 path); frame 7: a dyadic one.
    ds = _enhanced_from(name, tmp_path / "enhanced.dcm", row=row, col=col, positions=positions,
                        slope_frames={3: (0.3, 1.7), 7: (0.25, 12.0)})
    vol = read_dicom_series(tmp_path)
    values = _frames_in_units(ds)
    assert vol.plane == "sagittal" and vol.orientation == "PIL" and vol.warnings == []
    assert vol.array.shape == (n, 64, 64)  # slices stay the acquired images, never 64 x 10 ones
    assert vol.spacing == pytest.approx((3.0, 0.9, 1.1))
    # Independent: along the normal (toward the right) the slices come in `order`; the array runs
    # toward the left, so it holds them in reverse. Rows (toward inferior) and columns (toward
    # posterior) already match the sagittal display codes.
    np.testing.assert_array_equal(vol.array, values[np.argsort(order)][::-1])
    _check_every_pixel_lands(vol, ds, values)
    # pydicom's float64 values, not float32 arithmetic, on the inexact frame.
    assert not np.array_equal(values[3], ds.pixel_array[3].astype(np.float32) * np.float32(0.3) + np.float32(1.7))


@needs_data
def test_enhanced_duplicate_frames_dropped_and_named(tmp_path):
    n = 10
    positions = np.zeros((n, 3))
    positions[:, 2] = np.arange(n) % 5 * 2.0  # two temporal positions per location
    ds = _enhanced_from("emri_small.dcm", tmp_path / "dyn.dcm", row=(1.0, 0.0, 0.0), col=(0.0, 1.0, 0.0),
                        positions=positions, slope_frames={})
    vol = read_dicom_series(tmp_path)
    assert vol.array.shape == (5, 64, 64) and vol.plane == "axial"
    np.testing.assert_array_equal(vol.array, _frames_in_units(ds)[:5])  # the first frame at each position
    assert any("duplicate" in w and "dyn.dcm (frame 6)" in w for w in vol.warnings)


def _emri_without_positions(out, **header):
    """emri_small.dcm (enhanced MR, 10 frames, no functional groups) with ``header`` set (None: deleted)."""
    ds = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    assert "PerFrameFunctionalGroupsSequence" not in ds and "ImagePositionPatient" not in ds
    for keyword, value in header.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(out)
    return ds


@needs_data
def test_multiframe_without_positions_is_a_stack_in_frame_order(tmp_path):
    src = get_testdata_file("emri_small.dcm")
    shutil.copy(src, tmp_path / "emri_small.dcm")
    ds = pydicom.dcmread(src)
    vol = read_dicom_series(tmp_path)
    # Independent: pydicom's own frames in file order (no rescale in the file: stored values are the units).
    assert "RescaleSlope" not in ds and ds.pixel_array.shape == (10, 64, 64)
    np.testing.assert_array_equal(vol.array, ds.pixel_array.astype(np.float32))
    # z from the header's SpacingBetweenSlices (1.2 mm); no PixelSpacing: 1 mm; no orientation: no plane.
    assert vol.spacing == pytest.approx((float(ds.SpacingBetweenSlices), 1.0, 1.0))
    assert vol.modality == "mr" and vol.plane == "" and vol.orientation == "LPS"
    (warning,) = vol.warnings
    assert "emri_small.dcm" in warning and str(tmp_path) in warning and "stack of 10 frames in file order" in warning
    assert "slice spacing 1.2 mm (SpacingBetweenSlices)" in warning and "1 x 1 mm (no PixelSpacing)" in warning
    info = inspect_dicom_series(tmp_path)
    assert info.shape == vol.array.shape and info.spacing == pytest.approx(vol.spacing)
    assert info.warnings == vol.warnings and info.plane == ""


@needs_data
def test_multiframe_stack_in_the_manifest_is_ok_with_the_assumption_as_its_problem(tmp_path):
    from medvae.data.discover import discover

    (tmp_path / "scans" / "MR_01").mkdir(parents=True)
    shutil.copy(get_testdata_file("emri_small.dcm"), tmp_path / "scans" / "MR_01" / "emri_small.dcm")
    (row,) = discover(tmp_path / "scans")
    assert (row.status, row.modality, row.n_slices) == ("ok", "mr", 10)
    assert (row.spacing_z, row.spacing_y, row.spacing_x) == pytest.approx((1.2, 1.0, 1.0))
    assert "without frame positions" in row.problem and "SpacingBetweenSlices" in row.problem


@needs_data
def test_multiframe_stack_spacing_from_pixel_spacing_and_slice_thickness(tmp_path):
    ds = _emri_without_positions(tmp_path / "mr.dcm", SpacingBetweenSlices=None, SliceThickness=2.5,
                                 PixelSpacing=[0.7, 0.8], RescaleSlope=2, RescaleIntercept=-10)
    vol = read_dicom_series(tmp_path)
    assert vol.spacing == pytest.approx((2.5, 0.7, 0.8))
    np.testing.assert_array_equal(vol.array, apply_modality_lut(ds.pixel_array, ds).astype(np.float32))
    assert "slice spacing 2.5 mm (SliceThickness)" in vol.warnings[0]
    assert "0.7 x 0.8 mm (PixelSpacing)" in vol.warnings[0]
    _emri_without_positions(tmp_path / "mr.dcm", SpacingBetweenSlices=None)
    vol = read_dicom_series(tmp_path)
    assert vol.spacing == pytest.approx((1.0, 1.0, 1.0)) and "neither SpacingBetweenSlices" in vol.warnings[0]


@needs_data
def test_two_multiframe_files_without_positions_stack_in_file_name_order(tmp_path):
    a = _emri_without_positions(tmp_path / "a.dcm")
    b = _emri_without_positions(tmp_path / "b.dcm", SOPInstanceUID=pydicom.uid.generate_uid(),
                                PixelData=(4095 - a.pixel_array).astype(np.uint16).tobytes())
    vol = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(vol.array, np.concatenate([a.pixel_array, b.pixel_array]).astype(np.float32))
    assert vol.spacing[0] == pytest.approx(1.2) and len(vol.warnings) == 1  # no gap, no duplicate
    assert "a.dcm, b.dcm" in vol.warnings[0] and "stack of 20 frames" in vol.warnings[0]


@needs_data
def test_multiframe_without_positions_beside_positioned_frames_is_skipped(tmp_path):
    ds = _enhanced_from("emri_small.dcm", tmp_path / "good.dcm", row=(1.0, 0.0, 0.0), col=(0.0, 1.0, 0.0),
                        positions=np.arange(30.0).reshape(10, 3), slope_frames={})
    _emri_without_positions(tmp_path / "stack.dcm", SOPInstanceUID=pydicom.uid.generate_uid())
    vol = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(vol.array, _frames_in_units(ds))  # good.dcm alone
    assert any("stack.dcm" in w and "without frame positions" in w for w in vol.warnings)


@needs_data
def test_broken_functional_groups_skipped_and_named(tmp_path):
    ds = _enhanced_from("emri_small.dcm", tmp_path / "good.dcm", row=(1.0, 0.0, 0.0), col=(0.0, 1.0, 0.0),
                        positions=np.arange(30.0).reshape(10, 3), slope_frames={})
    bad = copy.deepcopy(ds)
    bad.SOPInstanceUID = pydicom.uid.generate_uid()
    del bad.PerFrameFunctionalGroupsSequence[4:]  # 4 items for 10 frames
    bad.save_as(tmp_path / "bad.dcm")
    vol = read_dicom_series(tmp_path)
    assert vol.array.shape[0] == 10
    assert any("bad.dcm" in w and "4 items for 10 frames" in w for w in vol.warnings)

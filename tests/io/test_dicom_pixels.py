"""SliceReader: slice ranges decoded from the files' pixel bytes alone, against pydicom and the whole-series read."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from medvae.io.dicom import plan_series, read_dicom_series
from medvae.io.dicom_pixels import slice_reader
from tests.factories import dicom_series

# (row direction, column direction): axial; axial stacked toward inferior (k flipped); sagittal; coronal
GEOMETRIES = {"axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)), "descending": ((1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
              "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)), "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0))}


def _write(folder, geometry, n=9, rows=20, cols=16, seed=0, bits_stored=16, slope=1.0, intercept=-1024.0):
    rng = np.random.default_rng(seed)
    stored = rng.integers(-1000, 2000, (n, rows, cols)).astype(np.int16)
    row, col = GEOMETRIES[geometry]
    names = [f"IM{i:03d}.dcm" for i in rng.permutation(n)]  # file order is not slice order
    dicom_series(folder, stored, modality="CT", row_dir=row, col_dir=col, origin=(0.0, 0.0, 40.0), dz=2.0,
                 pixel_spacing=(0.8, 0.6), names=names, rescale=(slope, intercept))
    if bits_stored != 16:  # 12-bit two's complement, upper bits cleared: pydicom sign-extends
        for f in folder.iterdir():
            ds = pydicom.dcmread(f)
            ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
            ds.PixelData = (np.frombuffer(ds.PixelData, np.int16).view(np.uint16) & 0x0FFF).tobytes()
            ds.save_as(f)
    return folder


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_ranges_equal_the_whole_read_and_pydicom(tmp_path, geometry):
    folder = _write(tmp_path / "s", geometry)
    whole = read_dicom_series(folder).array
    reader = pickle.loads(pickle.dumps(slice_reader(plan_series(folder))))  # as a worker receives it
    assert reader.shape_zyx == whole.shape
    for z0, z1 in [(0, 9), (0, 4), (4, 9), (3, 4), (8, 9)]:
        part, failed = reader.read_z(z0, z1)
        assert failed == [] and part.dtype == np.float32 and part.flags.c_contiguous
        np.testing.assert_array_equal(part, whole[z0:z1])
    # independent reference: every decoded slice is some file's pydicom pixels through apply_modality_lut
    files = {f.name: apply_modality_lut(pydicom.dcmread(f).pixel_array, pydicom.dcmread(f)).astype(np.float32)
             for f in folder.iterdir()}
    part, _ = reader.read_z(0, 9)
    for z in range(9):
        assert any(np.array_equal(np.sort(part[z], axis=None), np.sort(v, axis=None)) for v in files.values())


def test_signed_12_bit_and_dyadic_slope_match_pydicom(tmp_path):
    folder = _write(tmp_path / "s", "axial", bits_stored=12, slope=0.5, intercept=-100.0, seed=4)
    reader = slice_reader(plan_series(folder))
    assert reader is not None
    part, failed = reader.read_z(0, 9)
    plan = plan_series(folder)
    ref = np.stack([apply_modality_lut(pydicom.dcmread(s.path).pixel_array, pydicom.dcmread(s.path))
                    for s in plan.slices]).astype(np.float32)  # stack order = axial z order here
    assert failed == []
    np.testing.assert_array_equal(part, ref)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_bigendian.dcm", "emri_small.dcm"])
def test_no_reader_where_pydicom_needs_the_dataset(tmp_path, name):
    """Compressed, big-endian and multi-frame files are decoded whole, through their datasets."""
    shutil.copy(get_testdata_file(name), tmp_path / name)
    assert slice_reader(plan_series(tmp_path)) is None


def test_a_file_gone_after_planning_is_reported_not_raised(tmp_path):
    folder = _write(tmp_path / "s", "axial")
    reader = slice_reader(plan_series(folder))
    victim = reader.paths[2]
    with open(victim, "r+b") as f:
        f.truncate(100)
    part, failed = reader.read_z(0, 9)
    assert failed == [victim]

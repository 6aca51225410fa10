"""DICOM series reader: geometry against an independent computation, HU against pydicom, bad input."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from medvae.errors import InputError
from medvae.io.dicom import default_patient_id, inspect_dicom_series, read_dicom_series
from tests.factories import dicom_series, new_instance

ROWS, COLS, N = 32, 28, 12
IDENTITY = ("PHANTOM^ALICE", "19700101", "SECRET-ID-42")


def _series(
    folder,
    *,
    n=N,
    rows=ROWS,
    cols=COLS,
    dz=2.5,
    dxy=(0.7, 0.8),
    row_dir=(1.0, 0.0, 0.0),
    col_dir=(0.0, 1.0, 0.0),
    origin=(-10.0, 20.0, 100.0),
    reverse=False,
    unsigned=False,
    slope=1.0,
    intercept=-1024.0,
    skip=(),
    seed=0,
    modality="CT",
    uid=None,
):
    """Write a synthetic series with shuffled file names and scrambled InstanceNumbers.

    Slice ``k`` lies at ``origin + k * dz * normal``; the files are named and numbered in a random
    order (and with ``reverse`` the InstanceNumbers run against the slice direction).

    Returns:
        (stored, positions): stored pixel arrays ``(n, rows, cols)`` by generating index k and the
        ImagePositionPatient of each k (LPS, mm).
    """
    rng = np.random.default_rng(seed)
    if unsigned:
        stored = rng.integers(0, 3000, (n, rows, cols)).astype(np.uint16)
    else:
        stored = rng.integers(-1000, 2000, (n, rows, cols)).astype(np.int16)
    names = rng.permutation(n)
    numbers = rng.permutation(n) + 1
    if reverse:
        numbers = n - np.arange(n)
    positions = dicom_series(folder, stored, modality=modality, row_dir=row_dir, col_dir=col_dir, origin=origin, dz=dz,
                             pixel_spacing=dxy, names=[f"IM{i:04d}.dcm" for i in names], numbers=numbers, skip=skip,
                             uid=uid, sop_class=CTImageStorage, thickness=dz, rescale=(slope, intercept),
                             PatientName=IDENTITY[0], PatientBirthDate=IDENTITY[1], PatientID=IDENTITY[2])
    return stored, positions


def _ras(p_lps):
    return np.array([-p_lps[0], -p_lps[1], p_lps[2]])


def test_ct_small_hu_matches_pydicom(tmp_path):
    src = get_testdata_file("CT_small.dcm")
    shutil.copy(src, tmp_path / "CT_small.dcm")
    ds = pydicom.dcmread(src)
    expected = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    vol = read_dicom_series(tmp_path)
    assert vol.array.dtype == np.float32 and vol.array.shape == (1, 128, 128)
    np.testing.assert_array_equal(vol.array[0], expected)  # IOP is the identity: no flips
    assert vol.modality == "ct" and vol.orientation == "LPS"
    assert vol.spacing[1:] == pytest.approx((0.661468, 0.661468))
    # The first voxel sits at ImagePositionPatient (converted to RAS).
    assert vol.affine[:3, 3] == pytest.approx(_ras([float(v) for v in ds.ImagePositionPatient]), abs=1e-4)


@pytest.mark.parametrize(
    "name",
    ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm",
     "MR_small_implicit.dcm", "MR_small_padded.dcm"],
)
def test_pixels_and_rescale_match_pydicom_on_its_test_files(tmp_path, name):
    """Native (implicit/explicit, little/big endian, padded) and RLE files: the reader's values equal
    pydicom's ``Dataset.pixel_array`` through ``apply_modality_lut``, and, for little-endian native
    data, the hand-written decode the reader used before (``frombuffer`` * slope + intercept in float32)."""
    src = get_testdata_file(name)
    shutil.copy(src, tmp_path / name)
    ds = pydicom.dcmread(src)
    vol = read_dicom_series(tmp_path)
    assert vol.array.shape == (1, *ds.pixel_array.shape)  # IOP is the identity in all of them: no flips
    np.testing.assert_array_equal(vol.array[0], apply_modality_lut(ds.pixel_array, ds).astype(np.float32))
    if ds.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        dtype = np.dtype(f"<{'i' if ds.PixelRepresentation else 'u'}{ds.BitsAllocated // 8}")
        raw = np.frombuffer(ds.PixelData, dtype=dtype, count=ds.Rows * ds.Columns).reshape(ds.Rows, ds.Columns)
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        np.testing.assert_array_equal(vol.array[0], raw * np.float32(slope) + np.float32(intercept))


def test_compressed_without_decoder_names_package(tmp_path):
    from pydicom.pixels import get_decoder

    name = "MR_small_jpeg_ls_lossless.dcm"
    ds = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)
    if get_decoder(ds.file_meta.TransferSyntaxUID).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    shutil.copy(get_testdata_file(name), tmp_path / name)
    with pytest.raises(InputError, match="pylibjpeg|gdcm"):
        read_dicom_series(tmp_path)
    with pytest.raises(InputError, match="pylibjpeg|gdcm"):
        inspect_dicom_series(tmp_path)


@pytest.mark.parametrize("reverse", [False, True])
def test_axial_order_spacing_and_hu(tmp_path, reverse):
    origin = np.array([-10.0, 20.0, 100.0])
    stored, positions = _series(tmp_path / "s", reverse=reverse, origin=origin, unsigned=True)
    vol = read_dicom_series(tmp_path / "s")
    # Independent reference: the generating index k increases along +z (superior).
    np.testing.assert_array_equal(vol.array, stored.astype(np.float32) - 1024.0)
    assert vol.spacing == pytest.approx((2.5, 0.7, 0.8))
    assert vol.warnings == []
    info = inspect_dicom_series(tmp_path / "s")
    assert info.shape == vol.array.shape and info.spacing == pytest.approx(vol.spacing)
    assert info.modality == "ct" and info.series_uid == vol.series_uid


def test_slices_descending_z_are_flipped_to_superior(tmp_path):
    # normal = row x col = (1,0,0) x (0,-1,0) = (0,0,-1): slices stack toward inferior, rows anterior.
    stored, positions = _series(tmp_path, col_dir=(0.0, -1.0, 0.0), origin=(0.0, 0.0, 50.0))
    vol = read_dicom_series(tmp_path)
    z_order = np.argsort(positions[:, 2])  # independent: by patient z
    expected = stored[z_order][:, ::-1, :]  # rows reversed so y increases toward posterior
    np.testing.assert_array_equal(vol.array, expected.astype(np.float32) - 1024.0)
    assert vol.spacing[0] == pytest.approx(2.5)


def test_oblique_geometry_matches_affine(tmp_path):
    theta = np.deg2rad(12.0)
    row_dir = (-1.0, 0.0, 0.0)  # columns run toward patient right: x must be flipped
    col_dir = (0.0, np.cos(theta), np.sin(theta))
    dxy = (0.7, 0.8)
    stored, positions = _series(tmp_path, row_dir=row_dir, col_dir=col_dir, dz=3.0, dxy=dxy, seed=3)
    vol = read_dicom_series(tmp_path)
    assert vol.array.shape == (N, ROWS, COLS)
    assert vol.spacing == pytest.approx((3.0, 0.7, 0.8))
    # Every stored pixel (k, r, c) must land where the affine maps it to its world position.
    inv = np.linalg.inv(vol.affine)
    rng = np.random.default_rng(1)
    for _ in range(20):
        k, r, c = rng.integers(N), rng.integers(ROWS), rng.integers(COLS)
        world = positions[k] + c * dxy[1] * np.asarray(row_dir) + r * dxy[0] * np.asarray(col_dir)
        i, j, kk = np.round(inv @ np.append(_ras(world), 1.0))[:3].astype(int)
        assert vol.array[kk, j, i] == stored[k, r, c] - 1024.0
    # LPS axis codes of (i, j, k): i toward Left (RAS x decreasing), j toward Posterior, k toward Superior.
    import nibabel as nib

    assert nib.aff2axcodes(vol.affine) == ("L", "P", "S")


def test_signed_slope_and_12_bit(tmp_path):
    stored, _ = _series(tmp_path, slope=0.5, intercept=-100.0, seed=5)
    # Re-store as 12-bit two's complement without sign extension in the upper 4 bits.
    for f in tmp_path.iterdir():
        ds = pydicom.dcmread(f)
        ds.BitsStored, ds.HighBit = 12, 11
        ds.PixelData = (np.frombuffer(ds.PixelData, np.int16).view(np.uint16) & 0x0FFF).tobytes()
        ds.save_as(f)
        raw = np.frombuffer(ds.PixelData, np.int16).reshape(ROWS, COLS)
        assert not np.array_equal(ds.pixel_array, raw)  # pydicom sign-extends: the raw bits differ
    vol = read_dicom_series(tmp_path)
    np.testing.assert_allclose(vol.array, stored * np.float32(0.5) - 100.0, rtol=0, atol=1e-4)


def test_missing_slice_warns_gap(tmp_path, caplog):
    _series(tmp_path, skip=(5,))
    with caplog.at_level(logging.WARNING):
        vol = read_dicom_series(tmp_path)
    assert vol.array.shape[0] == N - 1 and vol.spacing[0] == pytest.approx(2.5)
    assert any("missing slice" in w for w in vol.warnings)
    assert any("missing slice" in w for w in inspect_dicom_series(tmp_path).warnings)
    assert "missing slice" in caplog.text


def test_duplicate_position_dropped(tmp_path):
    stored, _ = _series(tmp_path)
    dup = sorted(tmp_path.iterdir())[0]
    shutil.copy(dup, tmp_path / "zz_copy.dcm")
    vol = read_dicom_series(tmp_path)
    assert vol.array.shape[0] == N
    assert any("duplicate" in w and "zz_copy.dcm" in w for w in vol.warnings)
    np.testing.assert_array_equal(vol.array, stored.astype(np.float32) - 1024.0)


def test_truncated_file_skipped_and_named(tmp_path):
    _series(tmp_path)
    victim = sorted(tmp_path.iterdir())[3]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - ROWS * COLS])  # cut into the pixel data
    vol = read_dicom_series(tmp_path)
    assert vol.array.shape[0] == N - 1
    assert any(victim.name in w and "truncated" in w for w in vol.warnings)
    assert any(victim.name in w for w in inspect_dicom_series(tmp_path).warnings)
    # Cut inside the header too: unreadable, named, rest read.
    victim.write_bytes(data[:200])
    vol = read_dicom_series(tmp_path)
    assert vol.array.shape[0] == N - 1 and any(victim.name in w for w in vol.warnings)


def test_non_image_dicom_skipped(tmp_path):
    stored, _ = _series(tmp_path, uid="1.2.3.4.5")
    ds = new_instance("1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT", generate_uid())  # RT Structure Set
    ds.PatientName = IDENTITY[0]
    ds.save_as(tmp_path / "rtstruct.dcm", enforce_file_format=True)
    (tmp_path / "notes.bin").write_bytes(b"not a dicom file at all")
    vol = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(vol.array, stored.astype(np.float32) - 1024.0)
    assert any("RTSTRUCT" in w and "rtstruct.dcm" in w for w in vol.warnings)
    assert any("notes.bin" in w for w in vol.warnings)


def test_two_series_picks_largest(tmp_path):
    stored, _ = _series(tmp_path, uid="1.2.3.100", n=N)
    _series(tmp_path / "scout", uid="1.2.3.200", n=3, seed=9)
    vol = read_dicom_series(tmp_path)
    assert vol.series_uid == "1.2.3.100" and vol.array.shape[0] == N
    assert any("1.2.3.200" in w for w in vol.warnings)
    np.testing.assert_array_equal(vol.array, stored.astype(np.float32) - 1024.0)


def test_mixed_shapes_keep_majority(tmp_path):
    uid = "1.2.3.300"
    _series(tmp_path, uid=uid, n=N)
    _series(tmp_path / "odd", uid=uid, n=1, rows=16, cols=16, origin=(-10.0, 20.0, 500.0))
    vol = read_dicom_series(tmp_path)
    assert vol.array.shape == (N, ROWS, COLS)
    assert any("mixed slice shapes" in w for w in vol.warnings)


def test_bad_directories(tmp_path):
    with pytest.raises(InputError, match="no such directory"):
        read_dicom_series(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty"):
        inspect_dicom_series(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(InputError, match="no usable CT/MR image series"):
        read_dicom_series(tmp_path / "junk")


def test_identity_never_in_messages(tmp_path, caplog):
    _series(tmp_path / "PANCREAS_0007" / "study" / "series", skip=(4,))
    with caplog.at_level(logging.DEBUG):
        vol = read_dicom_series(tmp_path / "PANCREAS_0007" / "study" / "series")
        info = inspect_dicom_series(tmp_path / "PANCREAS_0007" / "study" / "series")
    assert vol.patient_id == "PANCREAS_0007" == default_patient_id(vol.source)
    text = caplog.text + repr(vol.warnings) + repr(info) + vol.patient_id + vol.source
    for secret in IDENTITY:
        assert secret not in text
    assert "missing slice" in caplog.text


def test_inspect_is_header_only_and_fast(tmp_path):
    import time

    for p in range(4):
        _series(tmp_path / f"p{p}", rows=256, cols=256, n=40, seed=p)
    t = time.perf_counter()
    infos = [inspect_dicom_series(tmp_path / f"p{p}") for p in range(4)]
    elapsed = time.perf_counter() - t
    assert all(i.shape == (40, 256, 256) for i in infos)
    assert elapsed < 2.0  # 160 files; ~1 ms per header is plenty for 80 TCIA patients in seconds

"""Dispatch of load_volume / inspect_volume, DICOM-label alignment, the MONAI DICOM reader."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import tifffile

from medvae.errors import InputError
from medvae.io import inspect_volume, load_volume
from tests.factories import dicom_series

ROWS, COLS, N = 24, 20, 10
DXY, DZ = (0.75, 0.9), 2.0  # PixelSpacing (row spacing, column spacing), slice step


def _write_series(folder, row_dir, col_dir, origin, bright):
    """Slices k = 0..N-1 at origin + k * DZ * (row_dir x col_dir); one bright voxel at (k, r, c)."""
    rng = np.random.default_rng(0)
    px = np.stack([rng.integers(0, 200, (ROWS, COLS)).astype(np.int16) for _ in range(N)])
    px[tuple(bright)] = 3000
    dicom_series(folder, px, modality="CT", row_dir=row_dir, col_dir=col_dir, origin=origin, dz=DZ, pixel_spacing=DXY,
                 names=[f"{(k * 7) % N:03d}.dcm" for k in range(N)], numbers=N - np.arange(N), rescale=(1, 0))


def _write_label(path, row_dir, col_dir, origin, bright):
    """Label as the phantom writer stores it: data[i=column, j=row, k=slice], affine from the DICOM grid."""
    normal = np.cross(row_dir, col_dir)
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(row_dir) * DXY[1]
    lps[:3, 1] = np.asarray(col_dir) * DXY[0]
    lps[:3, 2] = normal * DZ  # slice step: position of slice 1 minus slice 0
    lps[:3, 3] = origin  # ImagePositionPatient of the first slice
    data = np.zeros((COLS, ROWS, N), np.uint8)
    data[bright[2], bright[1], bright[0]] = 1
    nib.save(nib.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps), path)


@pytest.mark.parametrize(
    "row_dir, col_dir",
    [
        ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),  # standard axial
        ((1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),  # stacked toward inferior, rows toward anterior
        ((-1.0, 0.0, 0.0), (0.0, 0.98, 0.198997)),  # columns to the right, slight tilt
    ],
)
def test_phantom_label_aligns_with_dicom(tmp_path, row_dir, col_dir):
    origin = (-30.0, 12.0, 80.0)
    bright = (7, 5, 13)  # (slice k, row, column) in the files' own indexing
    _write_series(tmp_path / "ct", row_dir, col_dir, origin, bright)
    _write_label(tmp_path / "label.nii.gz", row_dir, col_dir, origin, bright)
    image = load_volume(tmp_path / "ct", patient_id="P1")
    label = load_volume(tmp_path / "label.nii.gz")
    assert image.array.shape == label.array.shape == (N, ROWS, COLS)
    hot = np.unravel_index(np.argmax(image.array), image.array.shape)
    assert image.array[hot] == 3000
    assert np.argwhere(label.array == 1).tolist() == [list(hot)]
    np.testing.assert_allclose(image.affine, label.affine, atol=1e-4)
    assert image.spacing == pytest.approx(label.spacing)


def test_dispatch_and_inspect(tmp_path):
    _write_series(tmp_path / "PANCREAS_0003" / "s", (1.0, 0, 0), (0, 1.0, 0), (0, 0, 0), (0, 0, 0))
    vol = load_volume(tmp_path / "PANCREAS_0003" / "s")
    assert vol.patient_id == "PANCREAS_0003" and vol.array.shape == (N, ROWS, COLS)
    assert inspect_volume(tmp_path / "PANCREAS_0003" / "s").shape == (N, ROWS, COLS)
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), tmp_path / "case_7.nii.gz")
    assert load_volume(tmp_path / "case_7.nii.gz").patient_id == "case_7"
    assert inspect_volume(tmp_path / "case_7.nii.gz").shape == (6, 5, 4)
    tifffile.imwrite(tmp_path / "st.tif", np.zeros((3, 8, 9), np.uint16), photometric="minisblack")
    assert load_volume(tmp_path / "st.tif").array.shape == (3, 8, 9)
    assert inspect_volume(tmp_path / "st.tif").modality == "microscopy"


def test_unknown_and_missing_paths(tmp_path):
    odd = tmp_path / "scan.mha"
    odd.write_bytes(b"\x00")
    with pytest.raises(InputError, match=r"scan\.mha.*unknown.*\.nii"):
        load_volume(odd)
    with pytest.raises(InputError, match="scan.mha"):
        inspect_volume(odd)
    with pytest.raises(InputError, match="nothing_here.*no such"):
        load_volume(tmp_path / "nothing_here")


def test_monai_dicom_reader(tmp_path):
    from monai.transforms import LoadImaged

    from medvae.io.monai_readers import VolumeReader

    _write_series(tmp_path / "PANCREAS_0011" / "s", (1.0, 0, 0), (0, 1.0, 0), (0, 0, 0), (2, 3, 4))
    series = tmp_path / "PANCREAS_0011" / "s"
    out = LoadImaged(keys=["image"], reader=VolumeReader(), image_only=False)({"image": str(series)})
    img = out["image"]
    vol = load_volume(series)
    assert tuple(img.shape) == (N, ROWS, COLS)  # our (Z, Y, X), no axis reversal
    np.testing.assert_array_equal(img.numpy(), vol.array)
    assert img.meta["patient_id"] == "PANCREAS_0011" and img.meta["modality"] == "ct"
    assert img.pixdim.tolist() == pytest.approx(list(vol.spacing))
    assert tuple(img.meta["spatial_shape"]) == (N, ROWS, COLS)
    # The array-order affine maps index (z, y, x) to the same world point as Volume.affine (i=x, j=y, k=z).
    z, y, x = 2, 3, 4
    np.testing.assert_allclose(img.affine.numpy() @ [z, y, x, 1], vol.affine @ [x, y, z, 1])
    assert VolumeReader().verify_suffix(str(series))


def test_volume_reader_reads_a_dcm_file_as_its_series_and_takes_a_patient_id(tmp_path):
    """One MONAI reader for every format: a ``.dcm`` file stands for its series folder, NIfTI and
    TIFF go through the same class, and ``patient_id`` reaches the meta dict."""
    from monai.transforms import LoadImage

    from medvae.io.monai_readers import VolumeReader

    series = tmp_path / "PANCREAS_0011" / "s"
    _write_series(series, (1.0, 0, 0), (0, 1.0, 0), (0, 0, 0), (2, 3, 4))
    one_file = sorted(series.iterdir())[0]
    nii = tmp_path / "case_7.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(120, dtype=np.float32).reshape(4, 5, 6), np.eye(4)), nii)
    tif = tmp_path / "cells.ome.tif"
    tifffile.imwrite(tif, np.ones((3, 8, 9), np.uint16))
    reader = VolumeReader()
    assert all(reader.verify_suffix(str(p)) for p in (series, one_file, nii, tif))
    assert not reader.verify_suffix(str(tmp_path / "scan.mha")) and not reader.verify_suffix(str(tmp_path / "no"))
    img = LoadImage(reader=VolumeReader(patient_id="P9"), image_only=True)(str(one_file))
    np.testing.assert_array_equal(img.numpy(), load_volume(series).array)
    assert img.meta["patient_id"] == "P9"
    assert LoadImage(reader=reader, image_only=True)(str(nii)).meta["patient_id"] == "case_7"
    assert LoadImage(reader=reader, image_only=True)(str(tif)).meta["patient_id"] == "cells"


@pytest.mark.parametrize(
    ("name", "stem"),
    [("case_7.nii.gz", "case_7"), ("A.NII.GZ", "A"), ("b.nii", "b"), ("cells.ome.tif", "cells"),
     ("x.OME.TIFF", "x"), ("s.tif", "s"), ("s.tiff", "s"), ("label0001.nii.gz", "label0001"),
     ("notes.txt", "notes"), ("PANCREAS_0001", "PANCREAS_0001"), ("v1.2.nii.gz", "v1.2")],
)
def test_scan_stem(name, stem, tmp_path):
    from medvae.io.formats import scan_stem

    assert scan_stem(name) == scan_stem(tmp_path / name) == stem

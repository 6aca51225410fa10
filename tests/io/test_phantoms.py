"""The phantom cohort: DICOM headers and geometry read back with pydicom, HU per tissue, labels,
determinism, and the ImageJ TIFF metadata read back with tifffile."""

import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from scipy import ndimage

from medvae.io.phantoms import (
    TISSUES,
    fake_identity,
    make_ct_phantom,
    make_microscopy_stack,
    write_phantom_cohort,
)

SEED = 3


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    summary = write_phantom_cohort(
        out, ct_patients=2, microscopy_stacks=1, seed=SEED, ct_size=512, ct_slices=10
    )
    return out, summary


def _series(directory):
    """Datasets of a series folder sorted by position along the slice normal (independent of file names)."""
    files = sorted(directory.rglob("*.dcm"))
    ds = [pydicom.dcmread(f) for f in files]
    normal = np.cross(*np.reshape([float(v) for v in ds[0].ImageOrientationPatient], (2, 3)))
    return sorted(ds, key=lambda d: float(np.dot(normal, [float(v) for v in d.ImagePositionPatient]))), normal


def _hu(datasets):
    return np.stack(
        [
            d.pixel_array.astype(np.float64) * float(d.RescaleSlope) + float(d.RescaleIntercept)
            for d in datasets
        ]
    )


def test_layout_and_summary(cohort):
    out, summary = cohort
    assert summary["ct_patients"] == 2 and summary["microscopy_stacks"] == 1
    assert sorted(p.name for p in (out / "Pancreas-CT").iterdir()) == ["PANCREAS_0001", "PANCREAS_0002"]
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["label0001.nii.gz", "label0002.nii.gz"]
    assert [p.name for p in (out / "microscopy").iterdir()] == ["stack_001.tif"]
    for entry in summary["ct"]:  # PANCREAS_XXXX/<study>/<series>/1-001.dcm
        series = out / "Pancreas-CT" / entry["patient_id"]
        files = sorted(series.glob("*/*/*.dcm"))
        assert [f.name for f in files] == [f"1-{n:03d}.dcm" for n in range(1, 11)]
    assert not list(out.rglob(".*")), "no temporary files left behind"


def test_dicom_headers_and_geometry(cohort):
    out, _ = cohort
    uids, signed = set(), set()
    for patient in sorted((out / "Pancreas-CT").iterdir()):
        ds, normal = _series(patient)
        first = ds[0]
        assert len(ds) == 10
        assert first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert all(d.SOPClassUID == CTImageStorage and d.Modality == "CT" for d in ds)
        assert (first.Rows, first.Columns, first.BitsAllocated) == (512, 512, 16)
        assert (float(first.RescaleIntercept), float(first.RescaleSlope)) == (-1024.0, 1.0)
        signed.add(int(first.PixelRepresentation))
        assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        dy, dx = (float(v) for v in first.PixelSpacing)
        assert dy == dx and 0.7 <= dx <= 0.9
        thickness = float(first.SliceThickness)
        assert 1.5 <= thickness <= 2.5
        pos = np.array([[float(v) for v in d.ImagePositionPatient] for d in ds])
        assert np.allclose(np.diff(pos @ normal), thickness)  # monotone, with the stated step
        assert np.allclose(pos[:, :2], pos[0, :2])
        assert len({d.SeriesInstanceUID for d in ds}) == 1 and len({d.StudyInstanceUID for d in ds}) == 1
        assert len({d.SOPInstanceUID for d in ds}) == 10
        uids |= {first.SeriesInstanceUID, first.StudyInstanceUID}
        assert str(first.PatientName).startswith("PHANTOM^") and str(first.PatientID).startswith("PHX")
        assert len(first.PatientBirthDate) == 8
    assert len(uids) == 4  # series and study UIDs differ between patients
    assert signed == {0, 1}  # uint16 and int16 pixel data both occur


def test_label_affine_equals_dicom_geometry(cohort):
    out, _ = cohort
    for n, patient in enumerate(sorted((out / "Pancreas-CT").iterdir()), start=1):
        ds, normal = _series(patient)
        row_cos, col_cos = np.reshape([float(v) for v in ds[0].ImageOrientationPatient], (2, 3))
        dy, dx = (float(v) for v in ds[0].PixelSpacing)
        p0 = np.array([float(v) for v in ds[0].ImagePositionPatient])
        step = float(np.dot(normal, [float(v) for v in ds[1].ImagePositionPatient]) - np.dot(normal, p0))
        lps = np.eye(4)
        lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_cos * dx, col_cos * dy, normal * step, p0
        img = nib.load(out / "labels" / f"label{n:04d}.nii.gz")
        np.testing.assert_allclose(img.affine, np.diag([-1, -1, 1, 1]) @ lps, atol=1e-4)
        data = np.asarray(img.dataobj)
        assert data.shape == (ds[0].Columns, ds[0].Rows, len(ds))
        assert set(np.unique(data)) == {0, 1}
        # The label sits on pancreas-like HU of the DICOM image (label [i, j, k] -> image [k, j, i]).
        hu = _hu(ds)
        inside = ndimage.binary_erosion(data.transpose(2, 1, 0) > 0, np.ones((1, 3, 3)))
        assert 25 <= np.median(hu[inside]) <= 55


def test_hu_per_tissue(cohort):
    out, _ = cohort
    ranges = {
        "air": (-1010, -990),
        "subcutaneous_fat": (-130, -70),
        "visceral_fat": (-120, -60),
        "muscle": (20, 70),
        "liver": (45, 75),
        "pancreas": (25, 55),
        "aorta": (150, 300),
        "ivc": (150, 300),
        "bone": (400, 1000),
    }
    for i, patient in enumerate(sorted((out / "Pancreas-CT").iterdir())):
        hu = _hu(_series(patient)[0])
        ph = make_ct_phantom(SEED, i, 512, 10)
        np.testing.assert_array_equal(hu, ph.hu)  # what the DICOMs hold is the phantom, in HU
        for name, (lo, hi) in ranges.items():
            mask = ndimage.binary_erosion(ph.tissue == TISSUES[name], np.ones((1, 5, 5)))
            assert mask.sum() > 50, name
            assert lo <= np.median(hu[mask]) <= hi, (name, np.median(hu[mask]))
        liver = ndimage.binary_erosion(ph.tissue == TISSUES["liver"], np.ones((1, 9, 9)))
        noise = hu[liver] - np.median(hu[liver])
        assert 9 <= noise.std() <= 21  # sigma 10-20 HU
        corner = hu[:, :64, :64] - hu[:, :64, :64].mean()
        lag1 = (corner[:, :, 1:] * corner[:, :, :-1]).mean() / corner.var()
        assert lag1 > 0.2  # correlated, not white, noise


def test_anatomy_varies_along_z_and_between_patients():
    a, b = make_ct_phantom(0, 0, 64, 100), make_ct_phantom(0, 1, 64, 100)
    area = (a.tissue == TISSUES["pancreas"]).sum(axis=(1, 2))
    assert area[0] == 0 and area[-1] == 0 and area.max() > 0  # the pancreas appears and disappears
    liver = (a.tissue == TISSUES["liver"]).sum(axis=(1, 2))
    assert len(np.unique(liver)) > 20
    assert a.spacing != b.spacing or a.hu.shape != b.hu.shape or not np.array_equal(a.tissue, b.tissue)
    centroid = [ndimage.center_of_mass(p.tissue == TISSUES["liver"])[1:] for p in (a, b)]
    assert not np.allclose(centroid[0], centroid[1])


def test_deterministic_per_seed(tmp_path):
    assert np.array_equal(make_ct_phantom(5, 0, 64, 6).hu, make_ct_phantom(5, 0, 64, 6).hu)
    assert not np.array_equal(make_ct_phantom(5, 0, 64, 6).hu, make_ct_phantom(6, 0, 64, 6).hu)
    one = write_phantom_cohort(
        tmp_path / "a", ct_patients=1, microscopy_stacks=1, seed=5, ct_size=64, ct_slices=6
    )
    two = write_phantom_cohort(
        tmp_path / "b", ct_patients=2, microscopy_stacks=1, seed=5, ct_size=64, ct_slices=6
    )
    # Patient 1 depends only on (seed, 1): identical bytes whatever the cohort size.
    files_a = sorted((tmp_path / "a").rglob("*.dcm"))
    files_b = sorted((tmp_path / "b" / "Pancreas-CT" / "PANCREAS_0001").rglob("*.dcm"))
    assert [f.relative_to(tmp_path / "a" / "Pancreas-CT") for f in files_a] == [
        f.relative_to(tmp_path / "b" / "Pancreas-CT") for f in files_b
    ]
    assert all(fa.read_bytes() == fb.read_bytes() for fa, fb in zip(files_a, files_b, strict=True))
    assert (
        tifffile.imread(one["microscopy"][0]["path"]).tobytes()
        == tifffile.imread(two["microscopy"][0]["path"]).tobytes()
    )
    assert fake_identity(5, 0) == fake_identity(5, 0) and fake_identity(5, 0) != fake_identity(5, 1)


def test_microscopy_tiff_metadata(cohort):
    out, summary = cohort
    path = out / "microscopy" / "stack_001.tif"
    stack, nuclei, (dz, dy, dx) = make_microscopy_stack(SEED, 0)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej
        meta = tif.imagej_metadata
        assert meta["unit"] in ("um", "micron", "\\u00B5m") and meta["spacing"] == pytest.approx(dz)
        assert tif.series[0].axes == "ZYX"
        page = tif.pages[0]
        xres = page.tags["XResolution"].value
        assert xres[1] / xres[0] == pytest.approx(dx, rel=1e-4)  # pixels per µm -> µm per pixel
        data = tif.asarray()
    assert data.dtype == np.uint16 and data.shape == (24, 256, 256)
    np.testing.assert_array_equal(data, stack)
    assert summary["microscopy"][0]["spacing"] == [dz, dy, dx]
    # Nuclei are bright on a dark, noisy background; the PSF spreads them along z.
    background = data[ndimage.binary_dilation(nuclei > 0, iterations=4) == 0].astype(float)
    assert data[nuclei > 0].mean() > 2 * background.mean()
    assert background.std() > 1  # Poisson-Gaussian noise, not a flat background
    assert 50 <= np.median(background) <= 400  # camera offset + background photons

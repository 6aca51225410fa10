import numpy as np
import pytest
import torch
from skimage.filters import threshold_otsu

from medvae.config import PrepareConfig
from medvae.data.normalize import load_normalized
from medvae.data.transforms import build_transforms, foreground_mask, normalization_constants, otsu_threshold


def run(modality, raw, config=PrepareConfig(), label=None):
    data = {"image": raw} if label is None else {"image": raw, "label": label}
    return build_transforms(modality, config, with_label=label is not None, load=False)(data)


@pytest.mark.parametrize("window", [(-160.0, 240.0), (-1000.0, 1000.0)])
def test_ct_window_matches_hand_formula(window):
    hu = np.random.default_rng(0).uniform(-1200, 1500, (1, 4, 16, 16)).astype(np.float32)
    out = run("ct", torch.from_numpy(hu), PrepareConfig(ct_window=window))
    lo, hi = window
    expected = (np.clip(hu, lo, hi) - lo) / (hi - lo)
    np.testing.assert_allclose(np.asarray(out["image"]), expected, atol=1e-6)
    assert out["normalization"] == {"low": lo, "high": hi, "unit": "HU"}


def test_microscopy_percentiles_match_numpy():
    counts = np.random.default_rng(1).gamma(2.0, 300.0, (1, 8, 64, 64)).astype(np.float32)
    cfg = PrepareConfig(microscopy_percentiles=(1.0, 99.8))
    out = run("microscopy", torch.from_numpy(counts), cfg)
    p1, p998 = np.percentile(counts, [1.0, 99.8])
    expected = np.clip((counts - p1) / (p998 - p1), 0, 1)
    np.testing.assert_allclose(np.asarray(out["image"]), expected, atol=1e-4)
    norm = normalization_constants(counts, "microscopy", cfg)
    np.testing.assert_allclose([norm["low"], norm["high"]], [p1, p998], rtol=1e-4)
    assert norm["unit"] == "counts"
    # the recorded constants invert the normalization where it did not clip
    x = np.asarray(out["image"])
    inside = (x > 0) & (x < 1)
    np.testing.assert_allclose(norm["low"] + x[inside] * (norm["high"] - norm["low"]), counts[inside], rtol=1e-3)


def test_ct_foreground_from_raw_hu():
    hu = np.full((1, 2, 10, 10), -1000.0, dtype=np.float32)
    hu[0, :, 2:6, 3:8] = 40.0  # body
    hu[0, 1, 0, 0] = -600.0  # lung-like air below the body threshold
    fg = foreground_mask(torch.from_numpy(hu), "ct", PrepareConfig(ct_body_hu=-500))
    assert fg.shape == (2, 10, 10) and int(fg.sum()) == 2 * 4 * 5


def test_otsu_matches_skimage():
    rng = np.random.default_rng(2)
    stack = rng.normal(100, 10, (4, 32, 32)).astype(np.float32)
    stack[:, 8:20, 8:20] += 400
    assert otsu_threshold(stack) == pytest.approx(threshold_otsu(stack))
    fg = foreground_mask(stack, "microscopy", PrepareConfig())
    np.testing.assert_array_equal(fg.numpy(), stack > threshold_otsu(stack))
    assert not foreground_mask(np.zeros((2, 4, 4)), "microscopy", PrepareConfig()).any()


def test_clip_scale_equals_monai_transforms():
    from monai.transforms import ScaleIntensityRange, ScaleIntensityRangePercentiles

    raw = np.random.default_rng(3).normal(200, 400, (1, 6, 40, 40)).astype(np.float32)
    ct = run("ct", torch.from_numpy(raw))["image"]
    ref = ScaleIntensityRange(a_min=-160, a_max=240, b_min=0.0, b_max=1.0, clip=True)(torch.from_numpy(raw))
    np.testing.assert_allclose(np.asarray(ct), np.asarray(ref), atol=1e-6)
    mic = run("microscopy", torch.from_numpy(raw))["image"]
    ref = ScaleIntensityRangePercentiles(lower=1.0, upper=99.8, b_min=0.0, b_max=1.0, clip=True)(torch.from_numpy(raw))
    np.testing.assert_allclose(np.asarray(mic), np.asarray(ref), atol=1e-5)
    const = run("microscopy", torch.full((1, 2, 4, 4), 7.0))["image"]
    assert torch.equal(const, torch.zeros_like(const))


def test_chain_leaves_caller_array_alone():
    hu = torch.full((1, 2, 4, 4), 500.0)
    run("ct", hu)
    assert (hu == 500.0).all()


def test_label_to_uint8():
    from medvae.data.patches import labels_to_uint8

    lab = torch.tensor([0.0, 1.0, 2.0, 0.9999, float("nan"), -3.0, 300.0])
    assert labels_to_uint8(lab).tolist() == [0, 1, 2, 1, 0, 0, 255]


def test_readers_already_give_monai_spl_orientation(tmp_path):
    """Why the chain has no ``Orientationd``: on what the readers return (a NIfTI stored RAS, one
    stored flipped and permuted with its slices sagittal, a DICOM series stacked toward inferior),
    MONAI's ``Orientationd`` to the plane's codes (axial ``SPL``, sagittal ``LIP``) changes nothing."""
    import nibabel as nib
    from monai.transforms import EnsureChannelFirstd, LoadImaged, Orientationd

    from medvae.io.monai_readers import VolumeReader
    from tests.factories import dicom_series

    data = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.9, 2.0, 1.0])), tmp_path / "ras.nii.gz")
    odd = np.array([[0, 0, -2.0, 10], [-0.8, 0, 0, 5], [0, 0.9, 0, -3], [0, 0, 0, 1]])  # i to P, j to S, k to L
    nib.save(nib.Nifti1Image(data, odd), tmp_path / "odd.nii.gz")
    pixels = np.random.default_rng(0).integers(0, 200, (10, 24, 20)).astype(np.int16)
    dicom_series(tmp_path / "dcm", pixels, modality="CT", row_dir=(1.0, 0.0, 0.0), col_dir=(0.0, -1.0, 0.0),
                 origin=(-30.0, 12.0, 80.0), dz=2.0, pixel_spacing=(0.75, 0.9), rescale=(1, 0))
    load = LoadImaged("image", reader=VolumeReader(), image_only=True)
    for path, codes in ((tmp_path / "ras.nii.gz", "SPL"), (tmp_path / "odd.nii.gz", "LIP"), (tmp_path / "dcm", "SPL")):
        d = EnsureChannelFirstd("image")(load({"image": str(path)}))
        before = d["image"].clone()
        after = Orientationd("image", axcodes=codes, labels=None)(d)["image"]
        assert after.shape == before.shape
        np.testing.assert_array_equal(after.numpy(), before.numpy())
        np.testing.assert_allclose(after.affine.numpy(), before.affine.numpy())


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """A CT series with its label NIfTI, a microscopy TIFF stack (over a million voxels: the numpy
    percentile branch) and a small MR NIfTI (torch.quantile branch)."""
    import nibabel as nib

    from medvae.io.phantoms import write_phantom_cohort

    root = tmp_path_factory.mktemp("scans")
    s = write_phantom_cohort(root, ct_patients=1, microscopy_stacks=1, seed=0, ct_size=64, ct_slices=6)
    mr = np.random.default_rng(4).gamma(2.0, 100.0, (20, 24, 7)).astype(np.float32)
    nib.save(nib.Nifti1Image(mr, np.array([[0, 0, -2.0, 10], [-0.8, 0, 0, 5], [0, 0.9, 0, -3], [0, 0, 0, 1]])),
             root / "mr.nii.gz")
    return [("ct", s["ct"][0]["series"], s["ct"][0]["label"]), ("microscopy", s["microscopy"][0]["path"], ""),
            ("mr", str(root / "mr.nii.gz"), "")]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_load_normalized_equals_the_monai_chain(scans, which):
    """prepare's MONAI-free path gives what the MONAI chain gives, value for value."""
    modality, path, label = scans[which]
    cfg = PrepareConfig()
    ours = load_normalized(path, modality, cfg, label)
    data = {"image": path, **({"label": label} if label else {})}
    ref = build_transforms(modality, cfg, with_label=bool(label))(data)
    assert set(ours) == set(ref) - {"image_meta_dict", "label_meta_dict"}
    for key in ("image", "foreground"):
        assert torch.equal(ours[key], torch.as_tensor(ref[key]).as_subclass(torch.Tensor)), key
        assert ours[key].dtype == torch.as_tensor(ref[key]).dtype
    if label:  # the same class values, kept in the file's type (uint8) instead of float32
        assert ours["label"].dtype == torch.uint8
        assert torch.equal(ours["label"].float(), torch.as_tensor(ref["label"]).as_subclass(torch.Tensor))
    assert ours["normalization"] == ref["normalization"]
    assert ours["spacing"] == ref["spacing"]
    if modality == "microscopy":
        assert ours["image"].numel() > 1_000_000

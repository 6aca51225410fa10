"""`medvae denoise`: whole scans in their own formats, geometry kept, resumable."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from typer.testing import CliRunner

from medvae.cli import app
from medvae.config import DenoiseConfig, PrepareConfig
from medvae.data.store import write_store
from medvae.data.transforms import normalization_constants
from medvae.denoising.apply import SliceDenoiser, denoise_scans, find_inputs
from medvae.io import load_volume
from medvae.io.writers import write_tiff
from medvae.training.runtime import precision_name
from tests.factories import phantom_cohort


def _oblique_affine():
    c, s = np.cos(0.3), np.sin(0.3)
    return np.array([[0.7 * c, -0.8 * s, 0, -90.0], [0.7 * s, 0.8 * c, 0, 20.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])


def test_nifti_keeps_affine_shape_and_dtype_and_resumes(denoise_run, tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(40, 30, (70, 54, 5)).astype(np.int16)  # 70 x 54: not a multiple of the model's 2
    data[:5] = -1000  # air: outside the window, passes through
    src = tmp_path / "in" / "scan.nii.gz"
    src.parent.mkdir()
    nib.save(nib.Nifti1Image(data, _oblique_affine()), src)
    out = tmp_path / "out"
    done = denoise_scans(denoise_run, src.parent, out, DenoiseConfig(batch_size=2), device="cpu")
    assert [d["slices"] for d in done] == [5] and not done[0]["skipped"]
    img = nib.load(out / "scan.nii.gz")
    np.testing.assert_allclose(img.affine, _oblique_affine(), atol=1e-5)
    assert img.shape == data.shape and img.get_data_dtype() == np.int16
    res = np.asarray(img.dataobj)
    assert np.array_equal(res[:5], data[:5])  # out-of-window voxels untouched
    assert np.all(np.isfinite(res)) and np.abs(res[5:].astype(float).mean() - data[5:].mean()) < 40
    again = denoise_scans(denoise_run, src.parent, out, device="cpu")
    assert again[0]["skipped"]


def test_tiff_keeps_um_spacing_and_dtype(denoise_run, tmp_path):
    rng = np.random.default_rng(1)
    stack = rng.poisson(300, (3, 40, 48)).astype(np.uint16)
    src = tmp_path / "stack.tif"
    write_tiff(src, stack, "ZYX", (2.0, 0.325, 0.325), unit="um")
    dst = tmp_path / "den.tif"
    done = denoise_scans(denoise_run, src, dst, DenoiseConfig(tile=32, overlap=0.25), device="cpu")
    assert done[0]["output"] == str(dst)
    vol, ref = load_volume(dst), load_volume(src)
    assert vol.array.shape == ref.array.shape
    np.testing.assert_allclose(vol.spacing, ref.spacing, rtol=1e-4)
    np.testing.assert_allclose(vol.spacing, (2.0, 0.325, 0.325), rtol=1e-4)
    with tifffile.TiffFile(dst) as tif:
        assert tif.series[0].dtype == np.uint16 and tif.is_imagej


def test_microscopy_window_is_the_one_prepare_used_for_the_store(denoise_run, hu_store, tmp_path):
    stack = np.random.default_rng(2).gamma(2.0, 300.0, (4, 40, 48)).astype(np.float32)
    # the run as trained: a store without prepare settings -> PrepareConfig's defaults
    den = SliceDenoiser(denoise_run, DenoiseConfig(), torch.device("cpu"))
    want = normalization_constants(stack, "microscopy", PrepareConfig())
    assert den.window(stack, "microscopy") == (want["low"], want["high"])
    # the same run over a store prepared with other percentiles: those
    run = tmp_path / "run"
    shutil.copytree(denoise_run, run)
    cfg = PrepareConfig(microscopy_percentiles=(5.0, 95.0))
    store = write_store(tmp_path / "store", hu_store.get(slice(None)), hu_store.index,
                        {**{k: hu_store.meta[k] for k in ("normalization", "spacing", "content_hash")},
                         "config": cfg.model_dump(mode="json")})
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "store": str(store.path)}))
    want = normalization_constants(stack, "microscopy", cfg)
    assert want["high"] - want["low"] < np.subtract(*np.percentile(stack, [99.8, 1.0]))
    assert SliceDenoiser(run, DenoiseConfig(), torch.device("cpu")).window(stack, "microscopy") == \
        (want["low"], want["high"])
    assert den.window(stack, "ct") == (-160.0, 240.0)  # CT: the store's HU window


def test_dicom_series_becomes_nifti_and_cli(denoise_run, tmp_path):
    scans = tmp_path / "scans"
    phantom_cohort(scans, ct_patients=1, microscopy_stacks=0, seed=0, ct_size=64, ct_slices=4)
    inputs = [p for p in find_inputs(scans) if p.is_dir()]
    assert len(inputs) == 1
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["denoise", str(denoise_run), str(inputs[0]), "--out", str(out),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    written = list(out.glob("*.nii.gz"))
    assert len(written) == 1
    vol, ref = load_volume(written[0]), load_volume(inputs[0])
    assert vol.array.shape == ref.array.shape
    np.testing.assert_allclose(vol.spacing, ref.spacing, rtol=1e-4)
    np.testing.assert_allclose(nib.load(written[0]).affine, ref.affine, atol=1e-4)


def test_missing_input_is_one_line_error(denoise_run, tmp_path):
    result = CliRunner().invoke(app, ["denoise", str(denoise_run), str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "input not found" in result.output


def test_fast_paths_match_the_plain_fp32_forward(denoise_run):
    """The slice denoiser's inference mode and channels_last give the model's plain NCHW fp32 forward up to
    float rounding; amp: bf16 stays within 2e-2 on the [0, 1] scale."""
    import torch

    from medvae.denoising.apply import SliceDenoiser
    from medvae.training.checkpoint import load_model
    from medvae.training.rundir import RunDir

    rng = np.random.default_rng(2)
    slices = rng.uniform(0, 1, (3, 70, 54)).astype(np.float32)
    plain, _ = load_model(RunDir(denoise_run).checkpoint("best"), device=torch.device("cpu"))
    ref = plain.denoise(torch.from_numpy(slices)[:, None])[:, 0].numpy()
    fast = SliceDenoiser(denoise_run, DenoiseConfig(batch_size=2, amp="off"), torch.device("cpu"))
    assert fast.channels_last
    np.testing.assert_allclose(fast(slices), ref, rtol=0, atol=1e-5)
    bf16 = SliceDenoiser(denoise_run, DenoiseConfig(amp="bf16"), torch.device("cpu"))(slices)
    assert not np.array_equal(bf16, ref)
    np.testing.assert_allclose(bf16, ref, rtol=0, atol=2e-2)


@pytest.mark.parametrize("supported, precision", [(False, "fp32"), (True, "bf16")])
def test_denoise_defaults_to_auto_which_follows_the_probe(denoise_run, monkeypatch, supported, precision):
    import medvae.training.runtime as runtime

    monkeypatch.setattr(runtime, "bf16_supported", lambda device: supported)
    den = SliceDenoiser(denoise_run, DenoiseConfig(), torch.device("cpu"))
    assert DenoiseConfig().amp == "auto" and precision_name(den.amp_dtype) == precision
    out = den(np.random.default_rng(0).uniform(0, 1, (1, 16, 16)).astype(np.float32))
    assert out.dtype == np.float32  # cast back before anything is written
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: False)
    assert SliceDenoiser(denoise_run, DenoiseConfig(amp="bf16"), torch.device("cpu")).amp_dtype is torch.bfloat16

"""The classical baselines: Noise2Self tuning is scikit-image's calibrate_denoiser's choice, and the
Anscombe route beats plain BM3D on photon noise at low counts."""

import numpy as np
import pytest
from skimage import data
from skimage.restoration import calibrate_denoiser, denoise_tv_chambolle
from skimage.restoration import estimate_sigma as sk_estimate_sigma
from skimage.transform import resize

from medvae.denoising import classical


def camera(n=128):
    return resize(data.camera().astype(np.float64) / 255.0, (n, n), anti_aliasing=True)


def psnr(x, ref):
    return 10 * np.log10(1.0 / np.mean((np.clip(x, 0, 1) - ref) ** 2))


def test_methods_are_listed_once():
    assert set(classical.FUNCTIONS) == set(classical.METHODS)
    assert set(classical.GRIDS) <= set(classical.METHODS) and set(classical.SLOW) <= set(classical.METHODS)


def test_n2s_tuned_tv_is_calibrate_denoisers_choice():
    rng = np.random.default_rng(0)
    noisy = camera(192) + 0.08 * rng.standard_normal((192, 192))
    sigma = sk_estimate_sigma(noisy, channel_axis=None)
    crop = noisy[32:160, 32:160]  # the central 128² crop
    weights = [f * sigma for f in (0.5, 1.0, 2.0, 4.0)]
    _, (tested, losses) = calibrate_denoiser(crop, denoise_tv_chambolle, {"weight": weights}, extra_output=True)
    best = tested[int(np.argmin(losses))]["weight"]
    assert classical.tune("tv", noisy, classical.estimate_sigma(noisy)) == {"weight": pytest.approx(best)}
    out = classical.denoise("tv", noisy[None, None])[0, 0]
    np.testing.assert_allclose(out, denoise_tv_chambolle(noisy, weight=best), atol=1e-6)
    # the choice depends on the noise: far weaker noise gets a smaller weight
    quiet = camera(192) + 0.01 * rng.standard_normal((192, 192))
    assert classical.tune("tv", quiet, classical.estimate_sigma(quiet))["weight"] < best


@pytest.mark.parametrize("method", ["wavelet", "nlm"])
def test_tuned_methods_denoise(method):
    if not classical.available(method):
        pytest.skip(f"{method} needs {classical.REQUIRES[method]}")
    rng = np.random.default_rng(1)
    clean = camera(96)
    noisy = clean + 0.1 * rng.standard_normal(clean.shape)
    out = classical.denoise(method, noisy[None, None].astype(np.float32))[0, 0]
    assert psnr(out, clean) > psnr(noisy, clean) + 3


def test_gat_bm3d_beats_bm3d_on_low_photon_counts():
    pytest.importorskip("bm3d")
    rng = np.random.default_rng(2)
    clean = 0.05 + 0.9 * camera(96)
    photons = 10.0  # at the brightest pixel; a = 1 / photons on the [0, 1] scale, plus 1 photon read noise
    noisy = (rng.poisson(clean * photons) + rng.standard_normal(clean.shape)) / photons
    stack = noisy[None, None].astype(np.float32)
    plain = psnr(classical.denoise("bm3d", stack)[0, 0], clean)
    gat = psnr(classical.denoise("gat-bm3d", stack)[0, 0], clean)
    assert gat > plain + 0.5, (gat, plain)

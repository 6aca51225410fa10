"""medvae.metrics.spectrum against numpy's FFT, white noise's flat spectrum, scipy's Gaussian blur and cosines."""

import numpy as np
import pytest
import torch
from scipy import fft, ndimage
from skimage import data as skdata

from medvae.metrics import spectrum as S


def _numpy_bands(size: int, n_bands: int) -> np.ndarray:
    """Band of each DCT coefficient (ky, kx), at (ky, kx) / 2·size cycles/pixel; -1 for DC and the corner."""
    f = np.arange(size) / (2 * size)
    r = np.hypot(f[:, None], f[None, :])
    band = np.minimum(np.floor(r / (0.5 / n_bands)).astype(int), n_bands - 1)
    band[(r == 0) | (r > 0.5)] = -1
    return band


def _numpy_radial_power(x: np.ndarray, n_bands: int) -> np.ndarray:
    """(N, n_bands) by hand, image by image and channel by channel: numpy's FFT of the mirrored image, whose
    first quadrant's magnitudes are 4 × the DCT-II sums, scaled to the orthonormal DCT."""
    n, c, size, _ = x.shape
    band = _numpy_bands(size, n_bands)
    scale = np.full(size, 2.0 / size)
    scale[0] = 1.0 / size
    out = np.zeros((n, n_bands))
    for i in range(n):
        powers = []
        for j in range(c):
            img = x[i, j] - x[i, j].mean()
            mirror = np.block([[img, img[:, ::-1]], [img[::-1], img[::-1, ::-1]]])
            powers.append(np.abs(np.fft.fft2(mirror)[:size, :size]) ** 2 / 16 * np.outer(scale, scale))
        power = np.mean(powers, axis=0)
        out[i] = [power[band == b].mean() for b in range(n_bands)]
    return out


def _camera(size: int = 128) -> np.ndarray:
    """(4, 1, size, size) float64 crops of scikit-image's camera in [0, 1]: real photographic detail."""
    cam = skdata.camera().astype(np.float64) / 255.0
    corners = [(100, 200), (300, 50), (20, 300), (250, 250)]
    return np.stack([cam[y:y + size, x:x + size] for y, x in corners])[:, None]


def test_radial_power_equals_numpy_fft2_by_hand():
    x = np.random.default_rng(0).random((3, 2, 16, 16))
    ref = _numpy_radial_power(x, 4)
    ours = S.radial_power(torch.from_numpy(x), 4, per_image=True).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(S.radial_power(torch.from_numpy(x), 4).numpy(), ref.mean(0), rtol=1e-6, atol=1e-9)
    for size, n_bands in ((16, 4), (64, 16), (64, 63), (33, 8)):  # odd sizes too
        np.testing.assert_array_equal(S.band_index(size, n_bands).numpy(), _numpy_bands(size, n_bands))


def test_dct_power_is_scipys_orthonormal_dct_squared():
    x = np.random.default_rng(2).random((2, 3, 20, 20))
    ref = fft.dctn(x, type=2, norm="ortho", axes=(-2, -1)) ** 2
    np.testing.assert_allclose(S.dct_power(torch.from_numpy(x)).numpy(), ref, rtol=1e-9, atol=1e-12)


def test_white_noise_is_flat_and_shares_are_the_band_areas():
    n, size, n_bands, sigma = 400, 32, 8, 0.7
    noise = torch.from_numpy(np.random.default_rng(1).normal(0.5, sigma, (n, 1, size, size)))
    power = S.radial_power(noise, n_bands)
    band = _numpy_bands(size, n_bands)
    counts = np.array([(band == b).sum() for b in range(n_bands)])
    # each band averages n · counts independent squared N(0, σ²) coefficients (the DCT is orthonormal)
    rel_sd = np.sqrt(2 / (n * counts))
    assert np.all(np.abs(power.numpy() / sigma**2 - 1) < 5 * rel_sd)
    np.testing.assert_allclose(S.band_shares(power, size).numpy(), counts / counts.sum(), rtol=5 * rel_sd.max())
    high = (np.arange(n_bands) >= n_bands // 2) @ counts / counts.sum()
    assert S.high_band_share(noise, 0.25, n_bands) == pytest.approx(high, rel=0.03)
    assert S.high_band_ratio(noise[:200], noise[200:], 0.25, n_bands) == pytest.approx(1.0, abs=0.05)


def test_a_blurred_image_loses_high_band_share():
    sharp = _camera()
    blurred = np.stack([ndimage.gaussian_filter(im, sigma=(0, 1.5, 1.5), mode="reflect") for im in sharp])
    sharp_t, blurred_t = torch.from_numpy(sharp), torch.from_numpy(blurred)
    assert S.high_band_share(blurred_t) < 0.2 * S.high_band_share(sharp_t)
    assert S.high_band_ratio(blurred_t, sharp_t) < 0.2
    assert S.high_band_ratio(sharp_t, sharp_t) == pytest.approx(1.0)
    # blur removes more the higher the frequency: the shares' deficit grows band by band
    deficit = S.band_shares(S.radial_power(blurred_t), 128) / S.band_shares(S.radial_power(sharp_t), 128)
    assert torch.all(torch.diff(deficit[2:]) < 0)
    # a contrast or offset change is no change of sharpness
    assert S.high_band_share(3 * sharp_t + 1) == pytest.approx(S.high_band_share(sharp_t), rel=1e-5)


@pytest.mark.parametrize("ky,kx", [(5, 12), (0, 3), (7, 7), (0, 63), (40, 45), (50, 50)])
def test_a_cosine_puts_its_power_in_its_band(ky, kx):
    """A DCT basis image (a cosine of (ky, kx) / 128 cycles/pixel per axis) holds all of the power in its band;
    an oblique plane wave of that frequency at another phase (not a DCT basis image: it leaks to neighbouring
    coefficients) holds nearly all of it in its band and the next ones."""
    size, n_bands = 64, 16
    yy, xx = np.mgrid[:size, :size]
    basis = np.cos(np.pi * ky * (2 * yy + 1) / (2 * size)) * np.cos(np.pi * kx * (2 * xx + 1) / (2 * size))
    wave = np.cos(2 * np.pi * (ky * yy + kx * xx) / (2 * size) + 0.4)
    r = np.hypot(ky, kx) / (2 * size)  # cycles/pixel
    band = min(int(r / (0.5 / n_bands)), n_bands - 1)
    power = S.radial_power(torch.from_numpy(0.5 + 0.3 * basis[None, None]), n_bands)
    if r > 0.5:  # a corner frequency: outside every band (float rounding is all that is left)
        assert power.max() < 1e-12
        return
    assert S.band_shares(power, size)[band] == pytest.approx(1.0, abs=1e-6)
    shares = S.band_shares(S.radial_power(torch.from_numpy(0.5 + 0.3 * wave[None, None]), n_bands), size)
    assert abs(int(shares.argmax()) - band) <= 1 and shares[max(band - 1, 0):band + 2].sum() > 0.9


def test_bad_shapes_bands_and_cutoffs_are_refused_clearly():
    with pytest.raises(ValueError, match="square"):
        S.radial_power(torch.zeros(2, 1, 32, 48))
    with pytest.raises(ValueError, match="at most 31"):
        S.radial_power(torch.zeros(2, 1, 32, 32), n_bands=32)
    with pytest.raises(ValueError, match="multiple of 0.0625"):
        S.high_band_share(torch.rand(2, 1, 32, 32), cutoff=0.3, n_bands=8)
    with pytest.raises(ValueError, match="one size"):
        S.high_band_ratio(torch.rand(2, 1, 32, 32), torch.rand(2, 1, 64, 64), n_bands=8)

"""Noise calibration from one image and the generalized Anscombe transform, against known truths:
simulated Poisson–Gaussian data of known gain and read noise, and the exact expectation of the
transform computed by summing the Poisson pmf with Gauss–Hermite quadrature."""

import numpy as np
import pytest
from scipy import stats

from medvae.denoising.calibration import estimate_noise, gat, inverse_gat, inverse_gat_algebraic


def smooth_clean(n=512):
    """A smooth signal spanning 0.02 .. ~0.76 (no edges): a tilted product of sinusoids."""
    yy, xx = np.mgrid[:n, :n] / n
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * xx * 1.2 + 1) * np.cos(2 * np.pi * yy * 0.8)
    return 0.02 + 0.93 * wave * (0.4 + 0.6 * yy)


def poisson_gaussian(clean, a, b, rng):
    return a * rng.poisson(clean / a) + np.sqrt(b) * rng.standard_normal(clean.shape)


# (photons per unit, read noise in photons) -> a = 1 / photons, b = (read / photons)²
PAIRS = [(10, 1), (20, 2), (50, 5), (100, 2), (500, 10)]


@pytest.mark.parametrize(("photons", "read"), PAIRS)
def test_calibration_recovers_gain_and_read_noise(photons, read):
    a, b = 1 / photons, (read / photons) ** 2
    z = poisson_gaussian(smooth_clean(), a, b, np.random.default_rng(photons + read))
    cal = estimate_noise(z)
    assert cal.a == pytest.approx(a, rel=0.10)
    assert cal.b == pytest.approx(b, rel=0.10)
    ph = cal.photons()
    assert ph["photons_per_unit"] == pytest.approx(photons, rel=0.10)
    assert ph["read_noise_photons"] == pytest.approx(read, rel=0.15)


def test_calibration_pools_images_and_channels():
    rng = np.random.default_rng(3)
    a, b = 0.02, 1e-3
    clean = smooth_clean(256)
    stack = np.stack([poisson_gaussian(clean, a, b, rng) for _ in range(4)])[:, None]  # (N, C, H, W)
    cal = estimate_noise(stack)
    assert cal.a == pytest.approx(a, rel=0.10) and cal.b == pytest.approx(b, rel=0.10)
    assert cal.n_pixels > 4 * 200 * 200
    d = cal.as_dict(offset=0.0)
    assert set(d) >= {"a", "b", "photons_per_unit", "read_noise_photons", "x_range"}


def test_calibration_of_gaussian_noise_has_no_gain():
    rng = np.random.default_rng(4)
    z = smooth_clean(256) + 0.05 * rng.standard_normal((256, 256))
    cal = estimate_noise(z)
    assert cal.a < 0.1 * 0.0025  # the Poisson part is negligible against b = 0.0025
    assert cal.b == pytest.approx(0.0025, rel=0.10)


def test_gat_algebraic_inverse_is_identity():
    for a, b in [(0.01, 4e-4), (0.05, 0.01), (1.0, 0.0), (0.0, 0.01)]:
        z = np.linspace(0.0, 2.0, 101)
        assert np.allclose(inverse_gat_algebraic(gat(z, a, b), a, b), z, atol=1e-12)


def test_gat_stabilizes_the_variance():
    rng = np.random.default_rng(5)
    a, b = 0.01, 4e-4
    for x in (0.05, 0.3, 1.0):
        z = poisson_gaussian(np.full(200_000, x), a, b, rng)
        assert np.var(gat(z, a, b)) == pytest.approx(1.0, abs=0.06)


def _expected_gat(x, a, b):
    """E[gat(z)] for z = a·Poisson(x / a) + N(0, b), by the pmf sum and 60-point Gauss–Hermite."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)
    weights = weights / weights.sum()
    lam = x / a
    k = np.arange(0, int(lam + 12 * np.sqrt(lam) + 30))
    z = a * k[:, None] + np.sqrt(b) * nodes[None]
    return float(np.sum(stats.poisson.pmf(k, lam)[:, None] * weights[None] * gat(z, a, b)))


@pytest.mark.parametrize(("a", "b"), [(0.05, 0.01), (0.01, 4e-4), (0.01, 1e-2)])
def test_exact_unbiased_inverse_recovers_the_mean(a, b):
    rng = np.random.default_rng(6)
    for photons in (2, 5, 20, 100):
        x = photons * a
        exact = _expected_gat(x, a, b)
        assert inverse_gat(exact, a, b) == pytest.approx(x, rel=0.015)
        simulated = float(np.mean(gat(poisson_gaussian(np.full(200_000, x), a, b, rng), a, b)))
        assert inverse_gat(simulated, a, b) == pytest.approx(x, rel=0.02)
    # the algebraic inverse of the expectation is biased at low counts: the test above has teeth
    assert abs(inverse_gat_algebraic(_expected_gat(2 * a, a, b), a, b) / (2 * a) - 1) > 0.1

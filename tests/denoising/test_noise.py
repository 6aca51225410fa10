"""Noise models against their closed-form mean and variance; the projector against scikit-image."""

import numpy as np
import pytest
import torch

from medvae.denoising import noise as N


def _flat(value, n=20000):
    return torch.full((n, 1, 4, 4), float(value))


def test_gaussian_mean_and_variance():
    x = _flat(0.4)
    y = N.gaussian(x, 0.1, N.step_generator(0, 1))
    assert float(y.mean()) == pytest.approx(0.4, abs=2e-3)
    assert float(y.var()) == pytest.approx(0.01, rel=0.03)


@pytest.mark.parametrize("x01", [0.05, 0.5, 1.0])
def test_poisson_gaussian_mean_and_variance_in_counts(x01):
    low, high, photons, read = 100.0, 4100.0, 20.0, 2.0
    y = N.poisson_gaussian(_flat(x01), low, high, photons, read, N.step_generator(0, 2))
    counts = low + x01 * (high - low)
    gain = photons / high
    lam = counts * gain
    var = (lam + read ** 2) / gain ** 2 / (high - low) ** 2
    assert float(y.mean()) == pytest.approx(x01, abs=4 * np.sqrt(var / y.numel()) + 1e-6)
    assert float(y.var()) == pytest.approx(var, rel=0.04)


def test_levels_are_per_patch_and_in_range():
    gen = N.step_generator(3, 0)
    lv = N.sample_levels("ct-lowdose", 1000, gen, (0.05, 0.25))
    assert lv.shape == (1000,) and float(lv.min()) >= 0.05 and float(lv.max()) <= 0.25
    assert len(set(lv.tolist())) == 1000
    assert N.eval_levels("gaussian", (0.02, 0.1)) == pytest.approx([0.02, 0.06, 0.1])


def test_step_generator_depends_only_on_seed_and_step():
    a = torch.randn(5, generator=N.step_generator(7, 11))
    b = torch.randn(5, generator=N.step_generator(7, 11))
    c = torch.randn(5, generator=N.step_generator(7, 12))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_projector_matches_scikit_image():
    from skimage.transform import iradon, radon

    yy, xx = np.mgrid[:32, :32]
    img = (((yy - 15.5) ** 2 + (xx - 13) ** 2) < 81).astype(np.float32)
    beam = N.ParallelBeam(32, 32, 32)
    sino = beam.project(torch.from_numpy(img)[None])[0].numpy()
    np.testing.assert_allclose(sino.sum(1), img.sum(), rtol=1e-4)  # every view conserves mass
    theta = np.arange(32) * 180 / 32
    sk_sino = radon(img, theta, circle=False)
    np.testing.assert_allclose(np.sort(sino.max(1)), np.sort(sk_sino.max(0)), rtol=0.1)
    ours = beam.fbp(beam.project(torch.from_numpy(img)[None]))[0].numpy()
    sk = iradon(sk_sino, theta, circle=False)
    assert np.corrcoef(ours.ravel(), sk.ravel())[0, 1] > 0.98
    assert np.abs(ours - img).mean() < 0.08


def test_ct_lowdose_mean_and_variance_match_the_delta_method():
    h = w = 16
    low, high, pixel_mm, dose, photons = -160.0, 240.0, 2.0, 0.5, 1e5
    x = torch.full((4000, 1, h, w), 0.4)  # 0 HU: water
    y = N.ct_lowdose(x, low, high, pixel_mm, dose, N.step_generator(0, 5), photons)
    beam = N.parallel_beam(h, w)
    # W: the FBP operator as a dense matrix; var(d_k) = e^{p_k} / (N0 d) for the log-transformed counts
    n_sino = beam.n_angles * beam.n_det
    W = beam.fbp(torch.eye(n_sino).reshape(n_sino, beam.n_angles, beam.n_det)).reshape(n_sino, -1)
    mu_px = N.MU_WATER * pixel_mm * torch.ones(1, h, w)
    p = beam.project(mu_px).reshape(-1)
    var_d = torch.exp(p) / (photons * dose)
    var_x = (W ** 2 * var_d[:, None]).sum(0) * (1000 / (pixel_mm * N.MU_WATER) / (high - low)) ** 2
    emp = y.var(0).reshape(-1)
    assert float(emp.mean() / var_x.mean()) == pytest.approx(1.0, rel=0.06)
    assert float((y - x).mean()) == pytest.approx(0.0, abs=4 * float(var_x.mean().sqrt()) / 60)

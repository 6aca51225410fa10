"""medvae.metrics against independent references: scikit-image, MONAI, torch.distributions and
the exact log-likelihood of probabilistic PCA."""

import math

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from medvae.metrics import elbo as L
from medvae.metrics import images as M
from tests.factories import ppca_model


def _pairs():
    """(N, 1, 128, 128) float64 pairs: noise, structured (camera crops) and smooth shapes."""
    rng = np.random.default_rng(0)
    cam = skdata.camera().astype(np.float64) / 255.0
    yy, xx = np.mgrid[:128, :128] / 128.0
    xs = [rng.random((128, 128)), cam[100:228, 200:328], cam[300:428, 50:178],
          0.2 + 0.6 * ((yy - 0.5) ** 2 + (xx - 0.4) ** 2 < 0.08), 0.5 + 0.4 * np.sin(12 * xx) * np.cos(7 * yy)]
    ys = [rng.random((128, 128)), np.clip(xs[1] + 0.05 * rng.standard_normal((128, 128)), 0, 1),
          np.clip(xs[2] * 0.8 + 0.1, 0, 1), np.roll(xs[3], 3, axis=1), np.clip(xs[4] ** 1.5, 0, 1)]
    return np.stack(xs)[:, None], np.stack(ys)[:, None]


def _sk_ssim(a, b, **kw):
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=1.0, **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ssim_matches_skimage(dtype):
    x, y = _pairs()
    ours = M.ssim(torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype)).double().numpy()
    ref = np.array([_sk_ssim(a[0], b[0]) for a, b in zip(x, y)])
    assert np.abs(ours - ref).max() < (1e-10 if dtype == torch.float64 else 1e-4)
    assert ref.min() < 0.2 and ref.max() > 0.8  # the pairs span the range


def test_ssim_multichannel_non_square_and_identity():
    rng = np.random.default_rng(1)
    x = rng.random((2, 3, 40, 56))
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1)
    ours = M.ssim(torch.tensor(x), torch.tensor(y)).numpy()
    ref = [_sk_ssim(a, b, channel_axis=0) for a, b in zip(x, y)]
    np.testing.assert_allclose(ours, ref, atol=1e-10)
    np.testing.assert_allclose(M.ssim(torch.tensor(x), torch.tensor(x)).numpy(), 1.0, atol=1e-12)


def test_ssim_matches_monai_definition():
    from monai.metrics.regression import compute_ssim_and_cs

    x, y = (torch.tensor(a, dtype=torch.float32) for a in _pairs())
    ref, _ = compute_ssim_and_cs(x, y, spatial_dims=2, kernel_size=(11, 11), kernel_sigma=(1.5, 1.5))
    np.testing.assert_allclose(M.ssim(x, y).numpy(), ref.flatten(1).mean(1).numpy(), atol=1e-5)


def test_psnr_mse_mae():
    x, y = _pairs()
    tx, ty = torch.tensor(x), torch.tensor(y)
    ref = [peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(x, y)]
    np.testing.assert_allclose(M.psnr(tx, ty).numpy(), ref, atol=1e-9)
    np.testing.assert_allclose(M.mse(tx, ty).numpy(), ((x - y) ** 2).mean(axis=(1, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(M.mae(tx, ty).numpy(), np.abs(x - y).mean(axis=(1, 2, 3)), rtol=1e-12)
    zero, c = torch.zeros(2, 1, 8, 8), torch.full((2, 1, 8, 8), 0.25)
    np.testing.assert_allclose(M.mse(zero, c).numpy(), 0.0625)
    np.testing.assert_allclose(M.mae(zero, c).numpy(), 0.25)
    np.testing.assert_allclose(M.psnr(zero, c).numpy(), -10 * math.log10(0.0625), rtol=1e-6)


def test_ms_ssim_on_128():
    rng = np.random.default_rng(2)
    x = torch.tensor(_pairs()[0][1:3])  # camera crops, 128²
    assert M.ms_ssim_scales(128) == 4 and M.ms_ssim_scales(176) == 5 and M.ms_ssim_scales(256) == 5
    np.testing.assert_allclose(M.ms_ssim(x, x).numpy(), 1.0, atol=1e-9)
    prev = np.ones(2)
    for sigma in (0.02, 0.05, 0.1, 0.2):
        noisy = (x + sigma * torch.tensor(rng.standard_normal(x.shape))).clamp(0, 1)
        v = M.ms_ssim(x, noisy).numpy()
        assert np.all(v < prev) and np.all(v > 0)
        prev = v


def test_ms_ssim_single_scale_is_ssim():
    x, y = (torch.tensor(a) for a in _pairs())
    np.testing.assert_allclose(M.ms_ssim(x, y, weights=(1.0,)).numpy(), M.ssim(x, y).clamp_min(0).numpy(),
                               atol=1e-12)


# --------------------------------------------------------------------------- ELBO / IWAE on PPCA
def test_iwae_exact_with_exact_posterior():
    model, x = ppca_model(imperfect=False)
    g = torch.Generator().manual_seed(1)
    torch.testing.assert_close(L.iwae_log_likelihood(model, x, k=1, generator=g), model.exact_log_px(x),
                               rtol=0, atol=1e-8)


def test_iwae_converges_to_exact_log_likelihood():
    model, x = ppca_model(imperfect=True)
    exact = model.exact_log_px(x).mean().item()
    g = torch.Generator().manual_seed(1)
    elbo = L.elbo(model, x, generator=g).mean().item()
    # The analytic ELBO of the one-sample estimate's expectation is approached by many samples.
    elbo_many = torch.stack([L.elbo(model, x, generator=g) for _ in range(200)]).mean().item()
    gaps = {k: exact - L.iwae_log_likelihood(model, x, k=k, batch_chunk=64 * 50, generator=g).mean().item()
            for k in (1, 10, 100, 5000)}
    assert gaps[1] > gaps[10] > gaps[100] > gaps[5000] >= -0.02
    assert gaps[5000] < 0.1 * gaps[1]
    assert elbo_many <= exact - gaps[5000] + 1e-6  # ELBO <= IWAE <= exact
    assert abs(elbo_many - (exact - gaps[1])) < 0.2 * gaps[1]  # IWAE k=1 is the ELBO in expectation
    assert np.isfinite(elbo)


def test_elbo_terms_and_bits_per_dim():
    model, x = ppca_model(imperfect=False)
    out, terms = L.elbo(model, x, generator=torch.Generator().manual_seed(0), return_terms=True)
    torch.testing.assert_close(out, -terms["nll"] - terms["kl"])
    ll = torch.tensor([-100.0, 50.0])
    torch.testing.assert_close(L.bits_per_dim(ll, 16), -ll / (16 * math.log(2)))
    torch.testing.assert_close(L.bits_per_dim(ll, 16, levels=256), -ll / (16 * math.log(2)) + 8)

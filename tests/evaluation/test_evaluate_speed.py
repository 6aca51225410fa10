"""What `medvae evaluate` does to be fast (issue #26): the default IWAE budget, IWAE's decodes a batch per call,
the model in channels_last; each against a reference that does not depend on those choices."""

import numpy as np
import torch

from medvae.config import EvaluateConfig, parse_model_config
from medvae.evaluation.evaluate import IWAE_PER_PATIENT, _iwae_subset, group_rows, patch_metrics
from medvae.metrics import elbo as L
from medvae.models import build_model
from tests.factories import patch_store, ppca_model


def test_the_default_iwae_budget_is_200_evenly_spaced_images_of_an_image_set():
    """1,000 single-image patients (rows 3000..3999): IWAE on 200 of them, the first, the last and every
    999/199-th between (round half to even, by hand with Python's round)."""
    rows = np.arange(3000, 4000)
    groups = group_rows(np.array([f"img{i:05d}" for i in range(1000)]))
    picked = _iwae_subset(groups, rows, IWAE_PER_PATIENT, EvaluateConfig().iwae_max_patches)
    expected = [3000 + round(i * 999 / 199) for i in range(200)]
    assert picked.tolist() == expected
    assert picked[0] == 3000 and picked[-1] == 3999 and len(set(np.diff(picked).tolist())) == 2  # steps 5 and 6


def test_iwae_is_exact_with_the_exact_posterior_however_its_decodes_are_chunked():
    """Probabilistic PCA with its exact posterior: every importance weight is p(x), so the k-sample bound is the
    closed-form log p(x) (torch.distributions) whether one sample of every image or all k go per decoder call."""
    model, x = ppca_model(imperfect=False)  # 64 images
    exact = model.exact_log_px(x)
    for chunk in (64, 3 * 64, 16 * 64):  # 1, 3 (the last call 1) and all 16 samples per call
        got = L.iwae_log_likelihood(model, x, k=16, batch_chunk=chunk, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(got, exact, rtol=0, atol=1e-8)


def test_per_patch_metrics_in_channels_last_match_the_contiguous_model(tmp_path):
    """The evaluation's channels_last model gives the contiguous model's metrics up to float rounding (same seed,
    so the same IWAE samples): SSIM, PSNR, ELBO and IWAE per image."""
    rng = np.random.default_rng(0)
    store = patch_store(tmp_path / "s", rng.random((12, 1, 32, 32), dtype=np.float32),
                        patient_id=[f"P{i}" for i in range(12)], split=["test"] * 12, content_hash="cl")
    torch.manual_seed(0)
    model = build_model(parse_model_config(dict(name="vae", image_size=32, channels=(8, 16), latent_dim=8))).eval()
    cfg = EvaluateConfig(iwae_k=6, batch_size=5)
    rows = np.arange(12)
    plain, mu_plain = patch_metrics(model, store, rows, cfg, torch.device("cpu"))
    model = model.to(memory_format=torch.channels_last)
    assert model.decode(torch.zeros(1, 8)).is_contiguous(memory_format=torch.channels_last)
    cl, mu_cl = patch_metrics(model, store, rows, cfg, torch.device("cpu"))
    np.testing.assert_allclose(mu_cl, mu_plain, rtol=0, atol=2e-5)  # float32 sums in another order
    for name, tol in (("ssim", 1e-5), ("psnr", 1e-3), ("elbo", 1e-2), ("iwae", 1e-2)):  # ELBO, IWAE ~ -1e3 nats
        np.testing.assert_allclose(cl[name], plain[name], rtol=0, atol=tol, err_msg=name)
    assert np.isfinite(cl["iwae"]).all()


def test_the_elbo_of_each_image_does_not_depend_on_the_iwae_settings(tmp_path):
    """The ELBO's seeded z are their own stream: the same per-image ELBO with IWAE on every image (k = 6), on
    two of them (k = 3) or on none, so a smaller IWAE budget changes no other column."""
    rng = np.random.default_rng(1)
    store = patch_store(tmp_path / "s", rng.random((10, 1, 32, 32), dtype=np.float32),
                        patient_id=[f"P{i}" for i in range(10)], split=["test"] * 10, content_hash="gen")
    torch.manual_seed(0)
    model = build_model(parse_model_config(dict(name="vae", image_size=32, channels=(8, 16), latent_dim=8))).eval()
    rows, dev = np.arange(10), torch.device("cpu")
    none, _ = patch_metrics(model, store, rows, EvaluateConfig(iwae_k=6, batch_size=4), dev, iwae_rows=rows[:0])
    every, _ = patch_metrics(model, store, rows, EvaluateConfig(iwae_k=6, batch_size=4), dev)
    two, _ = patch_metrics(model, store, rows, EvaluateConfig(iwae_k=3, batch_size=4), dev, iwae_rows=rows[[1, 7]])
    assert np.isnan(none["iwae"]).all() and np.isfinite(every["iwae"]).all() and np.isfinite(two["iwae"]).sum() == 2
    np.testing.assert_array_equal(every["elbo"], none["elbo"])
    np.testing.assert_array_equal(two["elbo"], none["elbo"])

"""The Gaussian-mixture prior: the transform against its definition, fitting against known mixtures,
samples (drawn as generation draws them, :func:`medvae.synthesis.sampling.latents`) against the fitted
mixture, and the per-checkpoint file (weights-only, reused, refitted when the checkpoint changes)."""

import numpy as np
import pytest
import torch

from medvae.config import parse_model_config
from medvae.models import build_model
from medvae.synthesis.prior import GaussianMixturePrior, encoder_means, fit_gmm, prior_for
from medvae.synthesis.sampling import latents
from medvae.training.checkpoint import save_checkpoint
from medvae.training.rundir import RunDir
from tests.factories import tiny_disc_store


def test_transform_picks_components_by_inverse_cdf_and_scales_by_the_cholesky_factor():
    means = torch.tensor([[0.0, 0.0], [10.0, -5.0]])
    tril = torch.stack([torch.eye(2), torch.tensor([[2.0, 0.0], [1.0, 0.5]])])
    prior = GaussianMixturePrior(torch.tensor([0.25, 0.75]), means, tril, {})
    u = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    eps = torch.ones(1000, 2)
    z = prior.transform(eps, u)
    first = (z[:, 0] == 1.0) & (z[:, 1] == 1.0)  # component 0: 0 + I·(1, 1)
    assert first.sum() == 250 and bool(first[:250].all())
    assert torch.allclose(z[250:], torch.tensor([10.0 + 2.0, -5.0 + 1.0 + 0.5]).expand(750, 2))


def test_fit_recovers_a_two_component_mixture_and_samples_match_it():
    rng = np.random.default_rng(0)
    a = rng.normal([-4, 0, 1], 0.5, size=(3000, 3))
    b = rng.normal([4, 2, -1], [1.0, 0.3, 0.3], size=(1000, 3))
    prior = fit_gmm(np.concatenate([a, b]), components=2, seed=0)
    order = torch.argsort(prior.means[0, :, 0])  # one mixture: condition 0
    assert prior.weights[0, order].numpy() == pytest.approx([0.75, 0.25], abs=0.01)
    assert prior.means[0, order].numpy() == pytest.approx(np.array([[-4, 0, 1], [4, 2, -1]]), abs=0.1)
    z = latents(1, 0, 20000, 3, prior=prior).double()
    assert torch.equal(z[100:200].float(), latents(1, 100, 200, 3, prior=prior))  # sample i depends on (seed, i)
    hi = z[:, 0] > 0
    assert hi.double().mean().item() == pytest.approx(0.25, abs=0.01)
    assert z[hi].std(0).numpy() == pytest.approx([1.0, 0.3, 0.3], rel=0.05)
    # the moments of the fitted mixture: mean sum_k w_k mu_k, covariance sum_k w_k (L_k L_k' + mu_k mu_k') - m m'
    w, mu, tril = prior.weights[0], prior.means[0], prior.scale[0]
    mean = (w[:, None] * mu).sum(0)
    cov = (w[:, None, None] * (tril @ tril.transpose(1, 2) + mu[:, :, None] * mu[:, None, :])).sum(0) - mean.outer(mean)
    assert z.mean(0).numpy() == pytest.approx(mean.numpy(), abs=0.05)
    assert torch.cov(z.T).numpy() == pytest.approx(cov.numpy(), rel=0.03, abs=0.03)
    # temperature 0: every latent is the mean of the component its uniform picks
    z0 = latents(1, 0, 500, 3, temperature=0.0, prior=prior).double()
    assert torch.cdist(z0, mu).min(1).values.max() < 1e-5


def test_a_conditional_prior_fits_and_samples_each_condition_on_its_own_codes():
    rng = np.random.default_rng(1)
    codes = np.concatenate([rng.normal(-3, 0.5, (400, 2)), rng.normal(3, 0.2, (200, 2)), rng.normal(0, 1, (300, 2))])
    ids = np.repeat([0, 1, 2], [400, 200, 300])
    prior = fit_gmm(codes, components=1, seed=0, ids=ids, n_conditions=3)
    assert prior.means.shape == (3, 1, 2)
    want = torch.tensor([2, 0, 1, 1]).repeat(5000)
    z = latents(0, 0, len(want), 2, prior=prior, ids=want).double()
    for c in range(3):  # each row from its own condition's fit: that condition's codes' mean and sd
        mine = codes[ids == c]
        assert z[want == c].mean(0).numpy() == pytest.approx(mine.mean(0), abs=0.05)
        assert z[want == c].std(0).numpy() == pytest.approx(mine.std(0), rel=0.05)
    sparse = fit_gmm(codes[ids != 1], components=1, ids=ids[ids != 1], n_conditions=3)  # no codes of 1: N(0, I)
    assert torch.equal(sparse.means[1], torch.zeros(1, 2)) and torch.equal(sparse.scale[1, 0], torch.eye(2))


def test_prior_file_per_checkpoint(tmp_path):
    store = tiny_disc_store(tmp_path / "store")
    cfg = parse_model_config(dict(image_size=64, channels=(8, 16, 32), latent_dim=4))
    torch.manual_seed(0)
    model = build_model(cfg)
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", {
        "format_version": 1, "model_config": cfg.model_dump(mode="json"), "model_state": model.state_dict()})
    prior = prior_for(ckpt, model, store, components=3)
    path = RunDir(ckpt).prior_path(ckpt)
    assert path.parent == tmp_path / "run" / "priors" and path.is_file()
    state = torch.load(path, weights_only=True)
    assert state["n_fit"] == 64 and state["components"] == 3  # the train split only
    codes, ids = encoder_means(model, store)
    assert codes.shape == (64, 4) and ids is None
    mtime = path.stat().st_mtime_ns
    again = prior_for(ckpt, model, store, components=3)  # loaded, not refitted
    assert torch.equal(again.means, prior.means) and path.stat().st_mtime_ns == mtime
    save_checkpoint(ckpt, {"format_version": 1, "model_config": cfg.model_dump(mode="json"),
                           "model_state": build_model(cfg).state_dict(), "step": 2})
    assert RunDir(ckpt).prior_path(ckpt) != path  # another checkpoint content: another prior file


def test_above_the_full_covariance_limit_the_mixture_is_diagonal(monkeypatch, tmp_path):
    """Past FULL_MAX_DIM dimensions each component keeps its per-dimension variances (a 1-component fit: the
    codes' own variances, numpy's), samples are mean + sd · eps, and the file reads back."""
    import medvae.synthesis.prior as prior_module

    monkeypatch.setattr(prior_module, "FULL_MAX_DIM", 2)
    rng = np.random.default_rng(0)
    codes = rng.normal([1.0, -2.0, 0.5], [0.5, 2.0, 1.0], size=(4000, 3))
    prior = fit_gmm(codes, components=1)
    assert prior.diagonal and prior.scale.shape == (1, 1, 3)
    assert prior.scale[0, 0].numpy() ** 2 == pytest.approx(codes.var(0), rel=1e-3)
    eps = torch.randn(5, 3)
    assert torch.allclose(prior.transform(eps, torch.rand(5)), (prior.means[0, 0] + prior.scale[0, 0] * eps).float())
    path = tmp_path / "p.pt"
    torch.save(prior.state_dict(), path)
    assert torch.equal(prior_module.load_prior(path).scale, prior.scale)

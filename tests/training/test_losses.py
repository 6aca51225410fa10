"""Losses against torch.distributions and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, ContinuousBernoulli, Laplace, Normal, kl_divergence

from medvae.models import VAEOutput
from medvae.models.denoisers import DenoiserOutput
from medvae.models.distributions import Likelihood, kl_normal
from medvae.training.adversarial import adaptive_weight, gan_discriminator_terms, gan_generator_term
from medvae.training.losses import denoiser_loss, free_bits_kl, vae_loss


def test_kl_normal_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(5, 7, generator=g) * 2
    logvar = torch.randn(5, 7, generator=g)
    ref = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(kl_normal(mu, logvar), ref)
    # bf16 inputs are computed in float32
    assert kl_normal(mu.bfloat16(), logvar.bfloat16()).dtype == torch.float32


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 2, 6, 5, generator=g)
    logits = torch.randn(3, 2, 6, 5, generator=g) * 3
    return x, logits


def test_gaussian_learned_scale_is_a_normal_density():
    x, logits = _data()
    lik = Likelihood("gaussian", channels=2)
    with torch.no_grad():
        lik.log_sigma.copy_(torch.tensor([math.log(0.05), math.log(0.3)]))
    mean = torch.sigmoid(logits)
    sigma = torch.tensor([0.05, 0.3]).view(1, 2, 1, 1)
    ref = Normal(mean, sigma).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(lik.log_prob(x, logits=logits), ref)
    torch.testing.assert_close(lik.log_prob(x, mean=mean), ref)
    # the scale is a parameter and learns
    lik.log_prob(x, mean=mean).sum().backward()
    assert lik.log_sigma.grad is not None and lik.log_sigma.grad.abs().sum() > 0


def test_gaussian_scale_is_clamped():
    lik = Likelihood("gaussian", channels=1)
    with torch.no_grad():
        lik.log_sigma.fill_(-50.0)
    assert float(lik.scale().detach()) == pytest.approx(1e-3)


@pytest.mark.parametrize("scale", [0.1, 0.5])
def test_fixed_scale_l1_is_laplace_and_l2_is_normal(scale):
    x, logits = _data(1)
    mean = torch.sigmoid(logits)
    ref_l1 = Laplace(mean, scale).log_prob(x).flatten(1).sum(1)
    ref_l2 = Normal(mean, scale).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(Likelihood("l1", 2, fixed_scale=scale).log_prob(x, mean=mean), ref_l1)
    torch.testing.assert_close(Likelihood("l2", 2, fixed_scale=scale).log_prob(x, logits=logits), ref_l2)


def test_bernoulli_matches_torch():
    x, logits = _data(2)
    ref = Bernoulli(logits=logits, validate_args=False).log_prob(x).flatten(1).sum(1)
    lik = Likelihood("bernoulli", 2)
    torch.testing.assert_close(lik.log_prob(x, logits=logits), ref)
    # from probabilities (the model's mean image) the same, up to the clamp
    torch.testing.assert_close(lik.log_prob(x, mean=torch.sigmoid(logits)), ref, rtol=1e-4, atol=1e-3)


def test_continuous_bernoulli_matches_torch_including_near_half():
    x, logits = _data(3)
    logits = logits.clone()
    logits[0, 0, 0, :] = torch.tensor([0.0, 1e-5, -1e-3, 2e-2, -5e-2])  # lambda ~ 0.5: 0/0 in the exact form
    ref = ContinuousBernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    got = Likelihood("cbernoulli", 2).log_prob(x, logits=logits)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    # at lambda = 0.5 the density is uniform: log p = 0 for every pixel
    x1 = torch.rand(1, 1, 4, 4)
    torch.testing.assert_close(Likelihood("cbernoulli").log_prob(x1, logits=torch.zeros_like(x1)), torch.zeros(1))


def test_continuous_bernoulli_mean_image_and_its_inverse():
    _, logits = _data(5)
    logits = torch.cat([logits.flatten(), torch.tensor([0.0, 1e-4, -3e-3, 15.0, -15.0])])
    lik = Likelihood("cbernoulli")
    ref = ContinuousBernoulli(logits=logits.double()).mean.float()
    torch.testing.assert_close(lik.mean(logits), ref, rtol=1e-4, atol=1e-5)
    # saturated logits: mean = 1 / (1 - e^-eta) - 1 / eta ~ 1 - 1/eta (torch's float32 clamps there)
    torch.testing.assert_close(lik.mean(torch.tensor([40.0, -40.0])), torch.tensor([1 - 1 / 40, 1 / 40]))
    # log_likelihood from the mean image (what models return) equals the one from logits
    x, logits = _data(6)
    x, logits = x[:, :1], logits[:, :1]
    torch.testing.assert_close(
        lik.log_prob(x, mean=lik.mean(logits)), lik.log_prob(x, logits=logits), rtol=1e-4, atol=1e-2
    )


def test_likelihood_is_float32_under_bf16_inputs():
    x, logits = _data(4)
    for kind in ("gaussian", "bernoulli", "cbernoulli", "l1", "l2"):
        out = Likelihood(kind, 2).log_prob(x.bfloat16(), logits=logits.bfloat16())
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_free_bits_clamps_batch_mean_kl_per_dimension():
    mu = torch.tensor([[0.0, 0.1, 3.0], [0.0, -0.1, 1.0]])
    logvar = torch.zeros(2, 3)
    per_dim = 0.5 * mu.pow(2)  # closed form at logvar = 0
    mean_d = per_dim.mean(0)  # [0, 0.005, 2.5]
    fb = 0.5
    expected = torch.clamp(mean_d, min=fb).sum()  # 0.5 + 0.5 + 2.5
    torch.testing.assert_close(free_bits_kl(mu, logvar, fb), expected)
    assert float(expected) == pytest.approx(3.5)
    torch.testing.assert_close(free_bits_kl(mu, logvar, 0.0), kl_normal(mu, logvar).mean())


def test_gan_losses_closed_forms():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    r, f = gan_discriminator_terms(real, fake, "hinge")
    assert float(r) == pytest.approx((0 + 0.5 + 2) / 3) and float(f) == pytest.approx((0 + 1 + 2.5) / 3)
    r, f = gan_discriminator_terms(real, fake, "lsgan")
    assert float(r) == pytest.approx((1 + 0.25 + 4) / 3) and float(f) == pytest.approx((4 + 0 + 2.25) / 3)
    assert float(gan_generator_term(fake, "hinge")) == pytest.approx(0.5 / 3)
    assert float(gan_generator_term(fake, "lsgan")) == pytest.approx((9 + 1 + 0.25) / 3)


def test_adaptive_weight_is_gradient_norm_ratio():
    w = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    a = torch.tensor([0.3, -0.7])
    rec = (w @ a).pow(2).sum()  # d/dw = 2 (w a) a^T
    adv = (w.sum() * 0.01) ** 3
    wa = (w @ a).detach()
    g_rec = 2 * wa[:, None] * a[None, :]
    g_adv = 3 * (w.sum().detach() * 0.01) ** 2 * 0.01 * torch.ones(2, 2)
    expected = (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4) * 0.5
    got = adaptive_weight(rec, adv, w, 0.5)
    torch.testing.assert_close(got, expected)
    assert not got.requires_grad
    # a vanishing adversarial gradient is clamped, not infinite
    assert float(adaptive_weight(rec, (w * 0).sum() + 0 * w.sum(), w)) == pytest.approx(1e4)


def test_vae_loss_against_torch_distributions():
    """-log N(x | sigmoid(logits), sigma) + beta * KL(N(mu, sigma_q) || N(0, 1)), batch means."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 1, 8, 8, generator=g)
    logits = torch.randn(4, 1, 8, 8, generator=g)
    mu, logvar = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g) * 0.5
    lik = Likelihood("gaussian", channels=1, init_log_sigma=math.log(0.2))
    out = VAEOutput(torch.sigmoid(logits), mu, logvar, mu, logits)
    loss, terms = vae_loss(x, out, lik, beta=0.25)
    nll = -Normal(torch.sigmoid(logits), 0.2).log_prob(x).flatten(1).sum(1).mean()
    kl = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1).mean()
    torch.testing.assert_close(terms["nll"], nll)
    torch.testing.assert_close(terms["kl"], kl)
    torch.testing.assert_close(loss, nll + 0.25 * kl)
    torch.testing.assert_close(terms["elbo"], -(nll + kl))
    assert set(terms) == {"nll", "kl", "elbo", "kl_loss"}  # no GAN terms


def test_denoiser_loss_is_the_nll_alone():
    """The dae has no latent: its loss is -log N(x | sigmoid(logits), sigma), no KL term."""
    g = torch.Generator().manual_seed(4)
    x, logits = torch.rand(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    lik = Likelihood("gaussian", channels=1, init_log_sigma=math.log(0.3))
    loss, terms = denoiser_loss(x, DenoiserOutput(torch.sigmoid(logits), logits), lik)
    torch.testing.assert_close(loss, -Normal(torch.sigmoid(logits), 0.3).log_prob(x).flatten(1).sum(1).mean())
    assert set(terms) == {"nll"}


def test_losses_do_not_read_the_config():
    import ast
    import inspect

    import medvae.training.losses

    tree = ast.parse(inspect.getsource(medvae.training.losses))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "medvae.config" not in imported


def test_focal_frequency_loss_against_numpy_fft():
    """alpha 0: the squared error summed over pixels (Parseval); alpha 1: numpy's FFT with the focal weights
    computed here; the term joins the VAE loss with its weight."""
    import numpy as np

    from medvae.training.losses import focal_frequency_loss

    x, x_hat = (torch.rand(3, 2, 8, 6, generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    torch.testing.assert_close(focal_frequency_loss(x_hat, x, 0.0), ((x_hat - x) ** 2).sum((1, 2, 3)).mean())
    d = np.fft.fft2(x_hat.double().numpy(), norm="ortho") - np.fft.fft2(x.double().numpy(), norm="ortho")
    w = np.abs(d) / np.abs(d).max(axis=(-2, -1), keepdims=True)
    want = (w * np.abs(d) ** 2).sum((1, 2, 3)).mean()
    assert float(focal_frequency_loss(x_hat, x, 1.0)) == pytest.approx(want, rel=1e-5)
    logits = torch.logit(x_hat.clamp(1e-4, 1 - 1e-4))
    mu = torch.zeros(3, 4)
    out, lik = VAEOutput(torch.sigmoid(logits), mu, mu, mu, logits), Likelihood("gaussian", 2, 0.1)
    want = float(focal_frequency_loss(out.x_hat, x, 1.0))
    base, _ = vae_loss(x, out, lik, beta=1.0)
    with_freq, terms = vae_loss(x, out, lik, beta=1.0, frequency_weight=3.0)
    assert float(with_freq - base) == pytest.approx(3.0 * want, rel=1e-4) and "freq" in terms

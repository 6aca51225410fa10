"""M2's bounds (Kingma et al. 2014) against a class-by-class reference built with torch.distributions."""

import math

import pytest
import torch
from torch import nn
from torch.distributions import Bernoulli, Categorical, Normal, kl_divergence

from medvae.config import VAEConfig
from medvae.models.m2 import M2
from medvae.models.vae import ConvVAE

K = 3


def _model(likelihood: str) -> M2:
    torch.manual_seed(0)
    vae = ConvVAE(VAEConfig(image_size=32, channels=(4, 8), latent_dim=3, likelihood=likelihood, condition="class",
                            condition_names=("a", "b", "c"), condition_dim=4))
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, K))
    return M2(vae, classifier).eval()  # eval: z is the posterior mean, so the bound is deterministic


def _reference_elbo(model: M2, x: torch.Tensor, y: int) -> torch.Tensor:
    """log p(x | y, z = μ) + log p(y) − KL(N(μ, σ²) || N(0, I)) of one class for every image, (B,)."""
    vae = model.vae
    ids = torch.full((len(x),), y)
    with vae.conditioned_on(ids):
        mu, logvar = vae.encode(x)
        logits = vae.decode_logits(mu)
    kl = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(1)
    if vae.likelihood.kind == "bernoulli":
        # continuous x in [0, 1]: the same cross-entropy formula (the Bernoulli likelihood of medvae)
        log_px = Bernoulli(logits=logits, validate_args=False).log_prob(x).flatten(1).sum(1)
    else:
        log_px = Normal(torch.sigmoid(logits), vae.likelihood.scale().view(1, -1, 1, 1)).log_prob(x).flatten(1).sum(1)
    return log_px + math.log(1.0 / K) - kl


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_the_unlabelled_bound_is_eq_7_class_by_class(likelihood):
    model = _model(likelihood)
    x = torch.rand(5, 1, 32, 32)
    with torch.no_grad():
        q = torch.softmax(model.classifier(x), 1)
        bound = sum(q[:, y] * _reference_elbo(model, x, y) for y in range(K)) + Categorical(probs=q).entropy()
        got = -model.unlabelled_loss(x)
    torch.testing.assert_close(got, bound, rtol=1e-5, atol=1e-3)


def test_the_labelled_loss_is_the_negative_elbo_plus_alpha_times_cross_entropy():
    model = _model("bernoulli")
    x, y, alpha = torch.rand(4, 1, 32, 32), torch.tensor([0, 2, 1, 2]), 7.0
    with torch.no_grad():
        log_q = torch.log_softmax(model.classifier(x), 1)
        want = torch.stack([-_reference_elbo(model, x[i:i + 1], int(y[i]))[0] - alpha * log_q[i, y[i]]
                            for i in range(4)])
        torch.testing.assert_close(model.labelled_loss(x, y, alpha), want, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(model.elbo(x, y), -model.labelled_loss(x, y, 0.0))


def test_m2_needs_a_class_conditional_vae():
    with pytest.raises(ValueError, match="class-conditional"):
        M2(ConvVAE(VAEConfig(image_size=32, channels=(4, 8), latent_dim=3, condition="none")), nn.Identity())

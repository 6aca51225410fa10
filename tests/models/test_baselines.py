"""MONAI baselines behind the medvae interface; standard (non-sampling) eval behaviour."""

from __future__ import annotations

import pytest
import torch

from medvae.config import parse_model_config
from medvae.errors import ConfigError
from medvae.models import VAEOutput, build_model
from medvae.models.baselines.networks import MonaiKL, MonaiVAE
from medvae.synthesis.sampling import sample_images
from tests.factories import blobs, model_loss


def small(name: str, **kw):
    torch.manual_seed(0)
    cfg = dict(name=name, image_size=64, channels=(8, 16), latent_dim=64, norm_groups=4)
    return build_model(parse_model_config(dict(**{**cfg, **kw})))


@pytest.mark.parametrize("name,cls", [("monai-vae", MonaiVAE), ("monai-kl", MonaiKL)])
@pytest.mark.parametrize("size,channels", [(64, 1), (128, 2)])
def test_interface(name, cls, size, channels):
    m = small(name, image_size=size, in_channels=channels)
    assert isinstance(m, cls)
    x = torch.rand(2, channels, size, size)
    mu, logvar = m.encode(x)
    assert mu.shape == logvar.shape == (2, m.latent_dim) == (2, 64)
    out = m(x)
    assert isinstance(out, VAEOutput) and out.x_hat.shape == x.shape
    assert 0 <= out.x_hat.min() and out.x_hat.max() <= 1
    assert m.decode(mu).shape == x.shape
    assert m.log_likelihood(x, out.x_hat).shape == (2,)
    s1 = sample_images(m, 3, seed=5)
    assert s1.shape == (3, channels, size, size) and 0 <= s1.min() and s1.max() <= 1
    assert torch.equal(s1, sample_images(m, 3, seed=5))
    assert m.config.name == name
    # the adaptive-weight anchor is a parameter of the conv that writes the logits
    w = m.last_decoder_weight
    assert any(w is p for p in m.parameters())
    with torch.no_grad():
        before = m.decode_logits(mu)
        w.add_(0.1)
        assert not torch.equal(before, m.decode_logits(mu))


@pytest.mark.parametrize("name", ["monai-vae", "monai-kl"])
def test_gradients_reach_every_parameter(name):
    m = small(name)
    loss, terms, _ = model_loss(m, blobs(4))
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    torch.testing.assert_close(terms["elbo"], -(terms["nll"] + terms["kl"]))


def test_monai_kl_eval_is_deterministic_and_equals_reconstruct():
    m = small("monai-kl").eval()
    x = blobs(3)
    a, b = m(x), m(x)
    assert torch.equal(a.x_hat, b.x_hat) and torch.equal(a.z, a.mu)
    # MONAI's own non-sampling path: reconstruct = decode(encode(x)[0])
    with torch.no_grad():
        torch.testing.assert_close(a.x_hat, torch.sigmoid(m.net.reconstruct(x)))
        z_mu, z_sigma = m.net.encode(x)
        torch.testing.assert_close(a.mu, z_mu.flatten(1))
        torch.testing.assert_close(a.logvar, (2 * torch.log(z_sigma)).flatten(1), rtol=1e-4, atol=1e-5)
    # whereas AutoencoderKL.forward samples even in eval
    assert not torch.equal(m.net(x)[0], m.net(x)[0])


def test_monai_vae_eval_uses_the_posterior_mean():
    m = small("monai-vae").eval()
    x = blobs(3)
    out = m(x)
    with torch.no_grad():
        mu, logvar = m.net.encode_forward(x)
        torch.testing.assert_close(out.mu, mu)
        torch.testing.assert_close(out.z, mu)  # MONAI's reparameterize gives mu + std in eval
        torch.testing.assert_close(out.x_hat, m.net.decode_forward(mu, use_sigmoid=True))
    assert torch.equal(out.x_hat, m(x).x_hat)


def test_monai_kl_latent_must_tile_the_8x8_map():
    with pytest.raises(ConfigError, match="latent_dim"):
        small("monai-kl", latent_dim=100)


def test_default_sizes_are_comparable_to_convvae():
    counts = {n: sum(p.numel() for p in build_model(parse_model_config(dict(name=n))).parameters())
              for n in ("vae", "monai-vae", "monai-kl")}
    assert 0.5 < counts["monai-kl"] / counts["vae"] < 1.5
    assert 0.5 < counts["monai-vae"] / counts["vae"] < 1.5

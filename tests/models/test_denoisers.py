"""unet-vae and dae: fully convolutional (any size divisible by 2^(stages-1), padding otherwise),
identity at initialisation, the shared model interface."""

import pytest
import torch

from medvae.config import ModelConfig
from medvae.errors import ConfigError
from medvae.models import build_model
from medvae.models.denoisers import pad_to_multiple
from medvae.synthesis.sampling import sample_images


def _model(name, **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, channels=(8, 16, 32), norm_groups=4, image_size=64,
                                   latent_channels=2, **kw)).eval()


@pytest.mark.parametrize("name", ["unet-vae", "dae"])
def test_any_size_and_identity_at_init(name):
    m = _model(name)
    x = torch.rand(2, 1, 96, 160) * 0.9 + 0.05
    out = m(x)
    assert out.x_hat.shape == x.shape
    torch.testing.assert_close(out.x_hat, x, atol=1e-5, rtol=0)  # zero-initialised residual
    y = m.denoise(torch.rand(1, 1, 70, 53))
    assert y.shape == (1, 1, 70, 53)
    with pytest.raises(ConfigError, match="multiples of 4"):
        m(torch.rand(1, 1, 70, 53))


def test_unet_vae_latent_sampling_and_dae_has_none():
    vae = _model("unet-vae")
    mu, logvar = vae.encode(torch.rand(3, 1, 64, 64))
    assert mu.shape == logvar.shape == (3, 2 * 16 * 16)
    assert sample_images(vae, 2, seed=0).shape == (2, 1, 64, 64)
    no_skip = _model("unet-vae", skip_connections=False)
    assert no_skip(torch.rand(1, 1, 64, 64)).x_hat.shape == (1, 1, 64, 64)
    dae = _model("dae")
    mu, logvar = dae.encode(torch.rand(3, 1, 64, 64))
    assert mu.shape == (3, 1) and float(mu.abs().sum() + logvar.abs().sum()) == 0.0
    with pytest.raises(ConfigError, match="deterministic"):
        sample_images(dae, 1)


def test_pad_to_multiple_reflects_and_keeps_size():
    x = torch.arange(30.0).reshape(1, 1, 5, 6)
    p, (h, w) = pad_to_multiple(x, 4)
    assert p.shape == (1, 1, 8, 8) and (h, w) == (5, 6)
    assert torch.equal(p[..., :5, :6], x)

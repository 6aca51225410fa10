"""unet-vae and dae: fully convolutional (any size divisible by 2^(stages-1), padding otherwise),
identity at initialisation, the shared model interface."""

import pytest
import torch

from medvae.config import parse_model_config
from medvae.errors import ConfigError
from medvae.models import build_model
from medvae.models.denoisers import pad_to_multiple
from medvae.synthesis.sampling import sample_images


def _model(name, **kw):
    torch.manual_seed(0)
    latent = {"latent_channels": 2} if name == "unet-vae" else {}
    return build_model(parse_model_config(dict(name=name, channels=(8, 16, 32), norm_groups=4, image_size=64,
                                               **latent, **kw))).eval()


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
    assert not hasattr(dae, "encode") and not hasattr(dae, "latent_dim")  # a Denoiser, not a VAE
    out = dae(torch.rand(3, 1, 64, 64))
    assert set(out._fields) == {"x_hat", "logits", "prior_logvar"} and out.prior_logvar is None  # no latent
    with pytest.raises(ConfigError, match="deterministic"):
        sample_images(dae, 1)


def test_pad_to_multiple_reflects_and_keeps_size():
    x = torch.arange(30.0).reshape(1, 1, 5, 6)
    p, (rows, cols) = pad_to_multiple(x, 4)
    assert p.shape == (1, 1, 8, 8) and torch.equal(p[..., rows, cols], x)
    assert torch.equal(p[..., 5, :6], x[..., 3, :])  # mirrored, not repeated
    # a mirrored margin on every side, the total still a multiple
    x = torch.arange(42.0).reshape(1, 1, 7, 6)
    p, (rows, cols) = pad_to_multiple(x, 4, margin=2)
    assert p.shape == (1, 1, 12, 12) and torch.equal(p[..., rows, cols], x)
    assert torch.equal(p[..., 2:9, :2], x[..., :, [2, 1]])


@pytest.mark.parametrize("name", ["unet-vae", "dae"])
def test_n2v2_options_blurpool_and_no_top_skip(name):
    plain, n2v2 = _model(name), _model(name, top_skip=False, downsample="blurpool")
    assert n2v2.skip_at == [False, True] and plain.skip_at == [True, True]
    assert n2v2.fuse[0].conv1.in_channels == 8 and plain.fuse[0].conv1.in_channels == 16
    x = torch.rand(2, 1, 96, 160) * 0.9 + 0.05
    torch.testing.assert_close(n2v2(x).x_hat, x, atol=1e-5, rtol=0)  # still the identity at init
    # the blur-pool: a full-resolution conv, then [1 2 1]²/16 with stride 2 (a constant map stays constant)
    down = n2v2.down[0]
    assert down.conv.stride == (1, 1)
    h = torch.ones(1, 16, 8, 8)
    out = torch.nn.functional.conv2d(torch.nn.functional.pad(h, (1, 1, 1, 1), mode="reflect"), down.blur, stride=2,
                                     groups=16)
    torch.testing.assert_close(out, torch.ones(1, 16, 4, 4))
    no_residual = _model(name, input_residual=False)
    torch.testing.assert_close(no_residual(x).x_hat, torch.full_like(x, 0.5))  # sigmoid(0): no copy of the input

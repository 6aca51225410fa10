"""Every model at 32² and 64² (image sets such as Fashion-MNIST and MedMNIST): shapes, depth, the critic."""

import pytest
import torch

from medvae.config import parse_model_config
from medvae.models import build_model
from medvae.models.vae import BOTTLENECK, stage_channels
from medvae.synthesis.sampling import sample_images


@pytest.mark.parametrize("name", ["vae", "vaegan", "monai-vae", "monai-kl"])
@pytest.mark.parametrize("size,channels", [(32, 1), (32, 3), (64, 1)])
def test_models_at_small_sizes(name, size, channels):
    torch.manual_seed(0)
    critic = dict(disc_channels=8, disc_layers=2) if name == "vaegan" else {}
    cfg = parse_model_config(dict(name=name, image_size=size, in_channels=channels, channels=(8, 16, 32), latent_dim=64,
                                  norm_groups=4, **critic))
    m = build_model(cfg)
    # down-sampling stages: from the image size to the 8x8 bottleneck (2 at 32², 3 at 64²)
    assert len(stage_channels(cfg)) - 1 == {32: 2, 64: 3}[size] and size // 2 ** (len(stage_channels(cfg)) - 1) \
        == BOTTLENECK
    x = torch.rand(4, channels, size, size)
    out = m(x, n_prior=2)
    assert out.x_hat.shape == x.shape and out.x_prior.shape == (2, channels, size, size)
    assert out.mu.shape == (4, 64)
    loss = m.log_likelihood(x, out.x_hat).mean()
    loss.backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if not n.startswith("discriminator."))
    if name == "vaegan":
        logits, feats = m.discriminator(x)
        assert logits.shape[0] == 4 and min(logits.shape[-2:]) >= 1 and len(feats) == 3
    assert sample_images(m, 2).shape == (2, channels, size, size)  # prior samples, as generation draws them

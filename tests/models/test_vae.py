"""ConvVAE: shapes, gradients, sampling, determinism and that training lowers the loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medvae.config import parse_model_config
from medvae.errors import ConfigError
from medvae.models import ConvVAE, VAEOutput, build_model
from medvae.models.blocks import Upsample
from medvae.synthesis.sampling import sample_images
from tests.factories import blobs, model_loss

SMALL = dict(channels=(8, 16), latent_dim=16, norm_groups=4)


def small_cfg(**kw):
    return parse_model_config(dict(**{**SMALL, **kw}))


@pytest.mark.parametrize(
    "size,channels,upsample",
    [(128, 1, "nearest"), (256, 1, "pixelshuffle"), (128, 2, "transpose"), (64, 2, "nearest")],
)
def test_shapes(size, channels, upsample):
    torch.manual_seed(0)
    m = build_model(small_cfg(image_size=size, in_channels=channels, upsample=upsample))
    x = torch.rand(2, channels, size, size)
    out = m(x)
    assert isinstance(out, VAEOutput)
    assert out.x_hat.shape == x.shape
    assert out.mu.shape == out.logvar.shape == out.z.shape == (2, 16)
    assert 0 <= out.x_hat.min() and out.x_hat.max() <= 1
    assert m.log_likelihood(x, out.x_hat).shape == (2,)
    assert sample_images(m, 3).shape == (3, channels, size, size)  # prior samples, as generation draws them
    assert m.latent_dim == 16 and m.config.image_size == size
    # the adaptive-weight anchor is the conv that writes the output
    assert m.last_decoder_weight is m.out_conv.weight


def test_wrong_input_shape_is_a_config_error():
    m = build_model(small_cfg(image_size=64))
    with pytest.raises(ConfigError, match="image_size"):
        m.encode(torch.rand(1, 1, 128, 128))


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli", "cbernoulli", "l1", "l2"])
def test_every_parameter_gets_a_gradient(likelihood):
    torch.manual_seed(0)
    m = build_model(small_cfg(image_size=64, likelihood=likelihood, res_units=2))
    loss, terms, out = model_loss(m, blobs(4))
    loss.backward()
    names = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert names == []
    assert set(terms) >= {"nll", "kl", "elbo"}
    assert out.x_hat.shape == out.logits.shape == (4, 1, 64, 64) and out.x_prior is None
    # elbo is the true ELBO: -(nll + kl), whatever beta is
    torch.testing.assert_close(terms["elbo"], -(terms["nll"] + terms["kl"]))


def test_eval_forward_is_deterministic_and_uses_the_mean():
    m = build_model(small_cfg(image_size=64)).eval()
    x = blobs(3)
    a, b = m(x), m(x)
    torch.testing.assert_close(a.x_hat, b.x_hat, rtol=0, atol=0)
    torch.testing.assert_close(a.z, a.mu)
    m.train()
    assert not torch.equal(m(x).z, m(x).z)


def test_samples_are_seeded_and_in_unit_interval():
    m = build_model(small_cfg(image_size=64))
    s1 = sample_images(m, 4, seed=7)
    s2 = sample_images(m, 4, seed=7)
    s3 = sample_images(m, 4, seed=8)
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    # sample i's latent depends on (seed, i) only: another batching decodes the same images (up to kernels)
    torch.testing.assert_close(sample_images(m, 4, seed=7, batch_size=3), s1, atol=1e-5, rtol=0)
    assert s1.shape == (4, 1, 64, 64) and s1.min() >= 0 and s1.max() <= 1
    # temperature scales z: T = 0 decodes the prior mean
    s0 = sample_images(m, 2, seed=1, temperature=0.0)
    torch.testing.assert_close(s0, m.decode(torch.zeros(2, 16)))


def test_pixelshuffle_icnr_has_no_checkerboard_at_init():
    torch.manual_seed(0)
    up = Upsample(4, 3, "pixelshuffle")
    y = up(torch.randn(2, 4, 5, 5))
    # ICNR: the four sub-pixels of each 2x2 block are equal, i.e. nearest upsampling of a conv
    blocks = y.unfold(2, 2, 2).unfold(3, 2, 2).reshape(2, 3, 5, 5, 4)
    torch.testing.assert_close(blocks, blocks[..., :1].expand_as(blocks))


def test_bf16_autocast_runs_and_terms_are_float32():
    torch.manual_seed(0)
    m = build_model(small_cfg(image_size=64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms, _ = model_loss(m, blobs(4))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(t.dtype == torch.float32 for t in terms.values())


def test_loss_falls_over_adam_steps():
    torch.manual_seed(0)
    m = ConvVAE(parse_model_config(dict(image_size=64, channels=(4, 8, 16), latent_dim=16, norm_groups=4)))
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    x = blobs(16)
    losses, mses = [], []
    for _ in range(30):
        loss, terms, out = model_loss(m, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        mses.append(F.mse_loss(out.x_hat.detach(), x).item())
    first, last = losses[0], sum(losses[-5:]) / 5
    assert last < first - 0.3 * abs(first), losses
    assert sum(mses[-5:]) / 5 < 0.5 * mses[0], mses


@pytest.mark.parametrize("name", ["vae", "vaegan", "monai-kl"])
def test_load_model_round_trip(tmp_path, name):
    checkpoint = pytest.importorskip("medvae.training.checkpoint")
    from medvae.training.checkpoint import load_model

    critic = dict(spectral_norm=True, disc_channels=8) if name == "vaegan" else {}
    cfg = small_cfg(name=name, image_size=64, latent_dim=64, **critic)
    torch.manual_seed(0)
    m = build_model(cfg)
    ema = build_model(cfg)  # other weights, standing in for the EMA copy
    # an EMA kept by torch.optim.swa_utils.AveragedModel: "module." prefixes and a counter
    ema_state = {f"module.{k}": v for k, v in ema.state_dict().items() if not k.startswith("discriminator.")}
    ema_state["n_averaged"] = torch.tensor(3)
    ckpt = {"model_config": cfg.model_dump(mode="json"), "model_state": m.state_dict(), "ema_state": ema_state,
            "optimizer_states": {}, "step": 12, "metrics": {"val_elbo": -1.5}}
    path = checkpoint.save_checkpoint(tmp_path / "last.pt", ckpt)
    x = blobs(2)
    loaded, meta = load_model(path, ema=False)
    assert not loaded.training and loaded.config == cfg
    torch.testing.assert_close(loaded(x).x_hat, m.eval()(x).x_hat)
    assert meta["step"] == 12 and meta["metrics"] == {"val_elbo": -1.5}
    assert "model_state" not in meta and "ema_state" not in meta and "optimizer_states" not in meta
    loaded_ema, _ = load_model(path, ema=True)
    torch.testing.assert_close(loaded_ema(x).x_hat, ema.eval()(x).x_hat)
    if name == "vaegan":  # the discriminator, not in the EMA, comes from model_state
        for p, q in zip(loaded_ema.discriminator.parameters(), m.discriminator.parameters()):
            assert torch.equal(p, q)


def test_spatial_latent_is_a_map_at_an_eighth_of_the_side_and_takes_a_condition():
    from medvae.config import VAEConfig, flat_model_dump

    cfg = VAEConfig(image_size=64, channels=(8, 16), latent="spatial", condition="class", condition_names=("a", "b"))
    model = build_model(cfg)
    assert model.latent_shape == (4, 8, 8) and model.latent_dim == 256
    x = torch.rand(3, 1, 64, 64)
    with model.conditioned_on(torch.tensor([0, 1, 1])):
        mu, logvar = model.encode(x)
        assert mu.shape == logvar.shape == (3, 256)
        assert model.decode(mu).shape == x.shape
        # the condition reaches the decoder: the same codes decode differently under another class
        assert not torch.allclose(model.decode(mu), model.decode(mu.flip(0)).flip(0))
    assert "latent" not in flat_model_dump(VAEConfig()) and flat_model_dump(cfg)["latent"] == "spatial"

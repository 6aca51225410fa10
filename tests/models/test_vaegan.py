"""VAE–GAN: the discriminator, the split of parameters, the GAN losses and one training step."""

from __future__ import annotations

import pytest
import torch

from medvae.config import TrainConfig, parse_model_config
from medvae.models import VAEGAN, PatchDiscriminator, build_model
from medvae.models.distributions import kl_normal, reparameterize
from medvae.training.adversarial import discriminator_loss, gan_generator_term
from medvae.training.distributed import DistInfo
from medvae.training.families import build_step
from tests.factories import blobs, model_loss


def tiny(**kw) -> VAEGAN:
    torch.manual_seed(0)
    cfg = dict(name="vaegan", image_size=64, channels=(4, 8, 16), latent_dim=16, norm_groups=4,
               disc_channels=8, disc_layers=2)
    return build_model(parse_model_config(dict(**{**cfg, **kw})))


@pytest.mark.parametrize("sn", [False, True])
def test_discriminator_outputs_logit_map_and_features(sn):
    d = PatchDiscriminator(in_channels=2, channels=8, n_layers=3, norm_groups=4, spectral_norm=sn)
    logits, feats = d(torch.rand(2, 2, 128, 128))
    assert logits.shape == (2, 1, 14, 14)  # 70x70-receptive-field PatchGAN geometry
    assert len(feats) == 4 and feats[0].shape == (2, 8, 64, 64)


def generator_parameters(m: VAEGAN) -> list:
    critic = {id(p) for p in m.discriminator.parameters()}
    return [p for p in m.parameters() if id(p) not in critic]


def test_the_critic_has_its_own_optimizer():
    """The VAE–GAN's step: the generator's optimizer holds every parameter but the critic's, the critic's the
    rest, and the EMA averages the generator only."""
    m = tiny()
    steps = build_step(m, TrainConfig(ema_decay=0.9), torch.device("cpu"), DistInfo(), None, total_steps=10)
    gen = {id(p) for g in steps.optimizers["generator"].param_groups for p in g["params"]}
    disc = {id(p) for g in steps.optimizers["discriminator"].param_groups for p in g["params"]}
    assert disc == {id(p) for p in m.discriminator.parameters()} and not gen & disc
    assert gen | disc == {id(p) for p in m.parameters()}
    assert not any(n.startswith("discriminator.") for n, _ in steps.ema.module.named_parameters())


def test_before_disc_start_no_adversarial_terms_and_d_not_run():
    m = tiny()
    calls = []
    m.discriminator.register_forward_hook(lambda *a: calls.append(1))
    loss, terms, out = model_loss(m, blobs(4), critic=False)
    assert calls == []
    assert float(terms["adv"]) == float(terms["fm"]) == float(terms["adv_weight"]) == 0.0
    torch.testing.assert_close(loss.detach(), terms["nll"] + terms["kl"])
    assert out.x_prior is None


@pytest.mark.parametrize("gan_loss", ["hinge", "lsgan"])
def test_gradients_reach_every_generator_parameter(gan_loss):
    m = tiny()
    loss, terms, out = model_loss(m, blobs(4), critic=True, gan_loss=gan_loss)
    loss.backward()
    missing = [n for n, p in m.named_parameters()
               if not n.startswith("discriminator.") and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []
    assert set(terms) >= {"nll", "kl", "elbo", "adv", "fm", "adv_weight"}
    assert float(terms["adv_weight"]) > 0 and float(terms["fm"]) > 0
    assert out.x_hat.shape == out.x_prior.shape == (4, 1, 64, 64)


def test_forward_draws_z_then_prior_samples():
    m = tiny()
    x = blobs(3)
    torch.manual_seed(5)
    out = m(x, n_prior=2)
    torch.manual_seed(5)
    mu, logvar = m.encode(x)
    z = reparameterize(mu, logvar)
    torch.testing.assert_close(out.z, z)
    torch.testing.assert_close(out.x_prior, m.decode(torch.randn(2, m.latent_dim)))
    torch.testing.assert_close(out.x_hat, torch.sigmoid(out.logits))


def test_reparameterize_with_a_generator_on_another_device_is_float32():
    mu, logvar = torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(2, 3, dtype=torch.bfloat16)
    a = reparameterize(mu, logvar, torch.Generator().manual_seed(1))
    b = reparameterize(mu, logvar, torch.Generator().manual_seed(1))
    assert a.dtype == torch.float32 and torch.equal(a, b)
    torch.testing.assert_close(a, torch.randn(2, 3, generator=torch.Generator().manual_seed(1)))
    z = reparameterize(torch.ones(4000, 1), torch.full((4000, 1), 2 * torch.log(torch.tensor(3.0))),
                       torch.Generator().manual_seed(0))
    assert abs(float(z.mean()) - 1) < 0.2 and abs(float(z.std()) - 3) < 0.2


def test_adaptive_weight_matches_hand_computation():
    m = tiny()
    x = blobs(4)
    torch.manual_seed(123)
    _, terms, _ = model_loss(m, x, critic=True, adv_weight=0.7)
    # the same computation by hand, with the same random draws
    torch.manual_seed(123)
    mu, logvar = m.encode(x)
    z = reparameterize(mu, logvar)
    logits = m.decode_logits(z)
    nll = -m.likelihood.log_prob(x, logits=logits).mean()
    x_prior = m.decode(torch.randn(4, m.latent_dim))
    d_fake, _ = m.discriminator(torch.cat([torch.sigmoid(logits), x_prior]))
    adv = -d_fake.mean()
    w = m.out_conv.weight
    g_rec = torch.autograd.grad(nll, w, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, w)[0]
    lam = (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4) * 0.7
    torch.testing.assert_close(terms["adv_weight"], lam)
    torch.testing.assert_close(terms["adv"], adv.detach())
    torch.testing.assert_close(terms["kl"], kl_normal(mu, logvar).mean().detach())


def _fakes(out):
    return torch.cat([out.x_hat.detach(), out.x_prior.detach()])


def test_discriminator_loss_trains_only_the_discriminator():
    m = tiny()
    x = blobs(4)
    _, _, out = model_loss(m, x, critic=True)
    m.zero_grad(set_to_none=True)
    loss, terms = discriminator_loss(m.discriminator, x, _fakes(out), r1_gamma=2.0)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.discriminator.parameters())
    assert all(p.grad is None for p in generator_parameters(m))
    # hinge on the logits the discriminator gives, plus gamma/2 * R1
    with torch.no_grad():
        r, _ = m.discriminator(x)
        f, _ = m.discriminator(_fakes(out))
    hinge = torch.relu(1 - r).mean() + torch.relu(1 + f).mean()
    torch.testing.assert_close(terms["d_loss"], hinge + 1.0 * terms["r1"])
    # R1 by hand: gamma/2 * E ||d sum D(x) / dx||^2
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(m.discriminator(xr)[0].sum(), xr)
    torch.testing.assert_close(terms["r1"], g.pow(2).flatten(1).sum(1).mean(), rtol=1e-4, atol=1e-6)


def test_one_step_changes_both_networks_and_losses_fall():
    m = tiny()
    x = blobs(8)
    g_opt = torch.optim.Adam(generator_parameters(m), lr=2e-3, betas=(0.5, 0.9))
    d_opt = torch.optim.Adam(m.discriminator.parameters(), lr=2e-3, betas=(0.5, 0.9))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    elbos = []
    for step in range(30):
        loss, terms, out = model_loss(m, x, critic=True)
        g_opt.zero_grad(set_to_none=True)
        loss.backward()
        g_opt.step()
        d_opt.zero_grad(set_to_none=True)  # the generator loss also left gradients on D
        d_loss, _ = discriminator_loss(m.discriminator, x, _fakes(out))
        d_loss.backward()
        d_opt.step()
        if step == 0:
            changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
            assert any(n.startswith("discriminator.") for n in changed)
            assert any(n.startswith("encoder.") for n in changed)
            assert any(n.startswith("out_conv.") for n in changed)
        elbos.append(float(terms["elbo"]))
    assert sum(elbos[-5:]) / 5 > elbos[0] + 0.3 * abs(elbos[0]), elbos


def test_bf16_autocast_gan_step():
    m = tiny()
    x = blobs(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms, out = model_loss(m, x, critic=True)
    loss.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d_loss, _ = discriminator_loss(m.discriminator, x, _fakes(out), r1_gamma=1.0)
    d_loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(d_loss)
    assert float(gan_generator_term(torch.zeros(3), "hinge")) == 0.0

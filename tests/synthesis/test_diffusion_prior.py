"""The latent diffusion prior: its DDIM sampler against the closed form, what it learns, its file, its use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medvae.config import DiffusionPriorConfig, GenerateConfig, parse_model_config
from medvae.errors import InputError
from medvae.models import build_model
from medvae.synthesis.diffusion import DiffusionPrior, fit_diffusion
from medvae.synthesis.generate import generate
from medvae.synthesis.prior import prior_for
from medvae.synthesis.sampling import latents
from medvae.training.checkpoint import save_checkpoint
from tests.factories import tiny_disc_store

TINY = DiffusionPriorConfig(steps=4, batch_size=8, channels=(16, 16), sample_steps=2)


class _Constant(nn.Module):
    """A 'network' that predicts the same velocity for every input: the sampler's arithmetic alone is tested."""

    num_class_embeds = None

    def __init__(self, v: torch.Tensor) -> None:
        super().__init__()
        self.v = nn.Parameter(v)

    def forward(self, x, timesteps, class_labels=None):
        return self.v.expand_as(x)


def test_one_ddim_step_reproduces_the_closed_form():
    """One DDIM step from t = T - 1 to the end (alpha-bar 1) with a velocity v: x0 = sqrt(ab_T)·x_T - sqrt(1 - ab_T)·v
    (Salimans & Ho 2022), ab from LDM's scaled-linear betas computed here; then the codes' per-channel scale and
    shift undone."""
    shape = (2, 3, 3)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(1, *shape, generator=gen)
    shift, scale = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.25])
    cfg = DiffusionPriorConfig(sample_steps=1, train_timesteps=1000)
    prior = DiffusionPrior(_Constant(v), shape, shift, scale, cfg, {})
    x_t = torch.randn(5, int(np.prod(shape)), generator=gen)

    betas = torch.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=torch.float64) ** 2
    ab = torch.cumprod(1 - betas, 0)[-1]
    x0 = ab.sqrt() * x_t.double().reshape(5, *shape) - (1 - ab).sqrt() * v.double()
    want = x0 * scale.double().reshape(1, -1, 1, 1) + shift.double().reshape(1, -1, 1, 1)
    assert torch.allclose(prior.transform(x_t), want.flatten(1).float(), rtol=1e-5, atol=1e-5)


def test_fitted_prior_samples_the_codes_distribution():
    """Codes with known moments (channel 0 ~ N(2, 0.5²) at every position, channel 1 = -channel 0 + N(0, 0.1²)):
    after 600 steps the samples keep the means, the spread and most of the anticorrelation between channels."""
    rng = np.random.default_rng(0)
    c0 = 2.0 + 0.5 * rng.standard_normal((512, 1, 4, 4))
    codes = np.concatenate([c0, -c0 + 0.1 * rng.standard_normal(c0.shape)], 1).reshape(512, -1)
    cfg = DiffusionPriorConfig(steps=600, batch_size=64, channels=(32, 32), lr=2e-3, sample_steps=25)
    prior = fit_diffusion(codes, (2, 4, 4), cfg)
    z = latents(1, 0, 400, codes.shape[1], prior=prior).reshape(400, 2, 16).double()
    assert z[:, 0].mean() == pytest.approx(2.0, abs=0.15) and z[:, 1].mean() == pytest.approx(-2.0, abs=0.15)
    assert z[:, 0].std() == pytest.approx(0.5, rel=0.25)
    corr = torch.corrcoef(torch.stack([z[:, 0].flatten(), z[:, 1].flatten()]))[0, 1]
    assert corr < -0.6  # the codes' is -0.98; a prior of independent channels (a diagonal mixture) has 0


def _spatial_run(tmp_path):
    store = tiny_disc_store(tmp_path / "store")
    cfg = parse_model_config(dict(image_size=64, channels=(8, 16), latent="spatial", spatial_channels=2,
                                  spatial_size=16))
    torch.manual_seed(0)
    model = build_model(cfg)
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", {
        "format_version": 1, "model_config": cfg.model_dump(mode="json"), "model_state": model.state_dict()})
    return store, model, ckpt


def test_prior_file_is_kept_per_checkpoint_and_config(tmp_path):
    store, model, ckpt = _spatial_run(tmp_path)
    assert model.latent_shape == (2, 16, 16) and model.latent_dim == 512
    prior = prior_for(ckpt, model, store, kind="diffusion", diffusion=TINY)
    files = sorted((tmp_path / "run" / "priors").glob("*diffusion*.pt"))
    assert len(files) == 1 and prior.info["n_fit"] == 64  # the train split's codes
    mtime = files[0].stat().st_mtime_ns
    eps = torch.randn(3, 512)
    again = prior_for(ckpt, model, store, kind="diffusion", diffusion=TINY)  # loaded, not refitted
    assert files[0].stat().st_mtime_ns == mtime and torch.equal(again.transform(eps), prior.transform(eps))
    prior_for(ckpt, model, store, kind="diffusion", diffusion=TINY.model_copy(update={"steps": 5}))
    assert len(list((tmp_path / "run" / "priors").glob("*diffusion*.pt"))) == 2  # another config: another file


def test_a_vector_latent_is_refused_with_the_fix(tmp_path):
    store = tiny_disc_store(tmp_path / "store")
    cfg = parse_model_config(dict(image_size=64, channels=(8, 16, 32), latent_dim=4))
    model = build_model(cfg)
    with pytest.raises(InputError, match="model.latent: spatial"):
        prior_for(tmp_path / "best.pt", model, store, kind="diffusion")


def test_generate_with_the_diffusion_prior_keeps_sample_i_fixed(tmp_path):
    """A sample depends on (seed, i) only: the first samples of n = 6 are those of n = 3 (DDIM with eta 0 is a
    deterministic map of each sample's noise)."""
    store, _, ckpt = _spatial_run(tmp_path)
    run = ckpt.parent.parent
    (run / "run.json").write_text('{"store": "%s"}' % store.path)
    arrays = []
    for n, out in ((3, "a"), (6, "b")):
        cfg = GenerateConfig(n=n, prior="diffusion", diffusion=TINY, format="npy", checkpoint=str(ckpt))
        generate(run, tmp_path / out, cfg, device="cpu")
        arrays.append(np.stack([np.load(p) for p in sorted((tmp_path / out).rglob("*.npy"))]))
    assert arrays[0].shape[0] == 3 and np.allclose(arrays[0], arrays[1][:3], atol=1e-5)


def test_evaluation_measures_the_diffusion_prior_of_a_spatial_latent_only(tmp_path):
    from medvae.config import EvaluateConfig
    from medvae.evaluation.sample_quality import sampling_priors

    store, model, ckpt = _spatial_run(tmp_path)
    cfg = EvaluateConfig(priors=("gmm", "diffusion"), diffusion=TINY)
    priors = sampling_priors(ckpt, model, store, cfg)
    assert set(priors) == {"standard", "gmm", "diffusion"} and isinstance(priors["diffusion"], DiffusionPrior)
    assert priors["gmm"].diagonal is False  # 512 dimensions: still full covariances
    vcfg = parse_model_config(dict(image_size=64, channels=(8, 16, 32), latent_dim=4))
    vector = build_model(vcfg)
    vckpt = save_checkpoint(tmp_path / "vector" / "checkpoints" / "best.pt", {
        "format_version": 1, "model_config": vcfg.model_dump(mode="json"), "model_state": vector.state_dict()})
    assert set(sampling_priors(vckpt, vector, store, cfg)) == {"standard", "gmm"}  # no diffusion: a warning

"""n2v --posterior (a Gaussian prior per pixel combined with the noisy pixel, Laine et al. 2019) and early
stopping on held-out noisy patches: the posterior against numerical integration, the training likelihood
against scipy's normal density, the config's auto default, `medvae denoise --sd`, best.pt against the
logged per-checkpoint scores, and resumption."""

import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import integrate, stats

from medvae.config import DenoiseConfig, TrainStageConfig
from medvae.denoising.apply import SliceDenoiser, denoise_scans, sd_path
from medvae.denoising.evaluate import _medvae as evaluate_medvae
from medvae.denoising.selfsupervised import BlindSpotTask, held_out_rows, resolve_noise_model, resolve_posterior
from medvae.errors import ConfigError
from medvae.models import build_model
from medvae.models.denoisers.unet import BORDER_MARGIN, pad_to_multiple
from medvae.models.distributions import Likelihood, gaussian_posterior
from medvae.pipeline import train_stage
from medvae.training.checkpoint import load_checkpoint
from medvae.training.trainer import train
from tests.factories import best_is_the_logged_max, disc_images, noisy_stack, patch_store

PHOTONS, READ = 20.0, 2.0
A, B = 1 / PHOTONS, READ**2 / PHOTONS**2


def _noisy(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    clean = disc_images(n, 32, seed=seed, level=0.6, background=0.2)
    return ((rng.poisson(clean * PHOTONS) + READ * rng.standard_normal(clean.shape)) / PHOTONS).astype(np.float32)


@pytest.fixture(scope="module")
def noisy_store(tmp_path_factory):
    """Noisy discs with a val split (the val patches are the held-out set)."""
    return patch_store(tmp_path_factory.mktemp("noisy") / "store", _noisy(40, 3), patient_id=["P0"] * 40,
                       split=["train"] * 32 + ["val"] * 8, source="phantom", content_hash="noisy-post")


@pytest.fixture(scope="module")
def train_only_store(tmp_path_factory):
    """A user's noisy image alone: no val split."""
    return patch_store(tmp_path_factory.mktemp("noisy1") / "store", _noisy(48, 5), patient_id=["P0"] * 48,
                       split=["train"] * 48, source="phantom", content_hash="noisy-train-only")


def _cfg(steps=3, checkpoint_every=None, lr=2e-3, **top):
    return TrainStageConfig.model_validate({
        "task": "denoise", "objective": "n2v", "blindspot": {"fraction": 1 / 16},
        "model": {"channels": [8, 16], "norm_groups": 4}, **top,
        "train": {"batch_size": 8, "max_steps": steps, "lr": lr, "warmup_steps": 1,
                  "checkpoint_every": checkpoint_every or steps, "log_every": 1, "val_batches": 1, "amp": "off"}})


# ------------------------------------------------------------------ the closed forms
@pytest.mark.parametrize(("mu", "prior_var", "y", "noise_var"), [
    (0.3, 0.01, 0.5, 0.02), (0.7, 0.002, 0.1, 0.05), (0.5, 0.2, 0.9, 0.001), (0.05, 1e-4, 0.4, 0.01)])
def test_posterior_mean_and_variance_equal_numerical_integration(mu, prior_var, y, noise_var):
    """p(s | y) ∝ N(s; mu, prior_var) N(y; s, noise_var), its moments by quadrature (scipy) against the closed form."""
    lo, hi = mu - 12 * math.sqrt(prior_var), mu + 12 * math.sqrt(prior_var)

    def joint(s, k):
        return s**k * stats.norm.pdf(s, mu, math.sqrt(prior_var)) * stats.norm.pdf(y, s, math.sqrt(noise_var))

    z, m1, m2 = (integrate.quad(joint, lo, hi, args=(k,), epsabs=0, epsrel=1e-11, limit=200)[0] for k in range(3))
    mean, var = gaussian_posterior(*(torch.tensor([v], dtype=torch.float64) for v in (mu, prior_var, y, noise_var)))
    assert float(mean) == pytest.approx(m1 / z, rel=1e-5, abs=1e-7)
    assert float(var) == pytest.approx(m2 / z - (m1 / z) ** 2, rel=1e-4)


def test_prior_likelihood_is_the_normal_marginal_of_prior_and_noise():
    rng = np.random.default_rng(0)
    x, m = rng.random((2, 1, 4, 5)), rng.uniform(0.05, 0.95, (2, 1, 4, 5))
    logvar, weight = rng.uniform(-8, -1, (2, 1, 4, 5)), rng.integers(0, 2, (2, 1, 4, 5)).astype(float)
    lik = Likelihood("poisson-gaussian", noise_model=(A, B))
    got = lik.log_prob(torch.tensor(x), mean=torch.tensor(m), weight=torch.tensor(weight),
                       prior_logvar=torch.tensor(logvar))
    ref = (stats.norm.logpdf(x, m, np.sqrt(np.exp(logvar) + A * m + B)) * weight).reshape(2, -1).sum(1)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5)
    with pytest.raises(ValueError, match="poisson-gaussian"):
        Likelihood("l2").log_prob(torch.tensor(x), mean=torch.tensor(m), prior_logvar=torch.tensor(logvar))


def test_prior_dae_denoises_with_the_posterior_mean_of_its_prior_and_the_noisy_pixel():
    cfg = _cfg().model.model_copy(update={"prior": True, "likelihood": "poisson-gaussian", "noise_a": A,
                                          "noise_b": B, "in_channels": 1, "image_size": 32})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # a prior that is not the zero-initialised one
        model.out_conv.weight.normal_(0, 0.05)
        model.out_conv.bias.copy_(torch.tensor([0.1, -4.0]))
    x = torch.from_numpy(_noisy(2, 9))[..., :30, :27]  # not a multiple of the network's stride: padded inside
    mean, sd = model.denoise(x, return_sd=True)
    assert torch.equal(model.denoise(x), mean) and mean.shape == sd.shape == x.shape
    xp, (rows, cols) = pad_to_multiple(x, model.multiple, BORDER_MARGIN)  # what denoise pads to
    with torch.no_grad():
        out = model(xp)
    mu = out.x_hat[..., rows, cols].double().numpy()
    pv = out.prior_logvar[..., rows, cols].double().exp().numpy()
    nv, y = A * mu + B, x.double().numpy()
    np.testing.assert_allclose(mean.numpy(), (nv * mu + pv * y) / (nv + pv), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sd.numpy(), np.sqrt(nv * pv / (nv + pv)), rtol=1e-5)
    # `medvae evaluate` scores the same posterior mean as `medvae denoise` writes
    x4 = torch.from_numpy(_noisy(2, 9))
    np.testing.assert_array_equal(evaluate_medvae(model, x4.numpy(), torch.device("cpu"), 2), model.denoise(x4).numpy())
    plain = build_model(cfg.model_copy(update={"prior": False}))
    with pytest.raises(ConfigError, match="deterministic"):
        plain.denoise(x, return_sd=True)
    with pytest.raises(ConfigError, match="poisson-gaussian"):
        build_model(cfg.model_copy(update={"likelihood": "l2"}))


# ------------------------------------------------------------------ the config
def test_posterior_is_on_by_default_with_a_calibrated_or_given_noise_model(noisy_store):
    auto = resolve_posterior(noisy_store, _cfg())
    m = auto.model
    assert auto.posterior and m.prior and m.likelihood == "poisson-gaussian"
    assert m.noise_a == pytest.approx(A, rel=0.2) and m.noise_b == pytest.approx(B, rel=0.3)  # Foi's fit
    given = resolve_posterior(noisy_store, _cfg(model={"channels": [8, 16], "norm_groups": 4, "noise_a": 0.1,
                                                       "noise_b": 0.002}))
    assert (given.model.noise_a, given.model.noise_b) == (0.1, 0.002) and given.model.prior
    off = resolve_posterior(noisy_store, _cfg(posterior=False))
    assert off.posterior is False and not off.model.prior and off.model.likelihood == "l2"
    clean = patch_store(noisy_store.path.parent / "clean", np.full((4, 1, 32, 32), 0.5, np.float32),
                        patient_id=["P0"] * 4, split=["train"] * 4, source="phantom", content_hash="flat")
    assert resolve_posterior(clean, _cfg()).posterior is False  # nothing to calibrate: plain n2v
    with pytest.raises(ConfigError, match="noise"):
        resolve_posterior(clean, _cfg(posterior=True))
    with pytest.raises(ConfigError, match="objective n2v or n2s with model dae"):
        train_stage(noisy_store, noisy_store.path.parent / "bad", TrainStageConfig.model_validate(
            {"task": "denoise", "objective": "divnoising", "posterior": True}), device="cpu")


# ------------------------------------------------------------------ training, best.pt, denoise --sd
def test_posterior_run_keeps_best_by_heldout_likelihood_and_denoise_writes_the_sd(noisy_store, tmp_path):
    run = tmp_path / "post"
    summary = train_stage(noisy_store, run, _cfg(steps=4, checkpoint_every=1), device="cpu")
    m = summary["metrics"]
    assert set(m) == {"blindspot_mse", "blindspot_psnr", "blindspot_ll"} and math.isfinite(m["blindspot_ll"])
    # the held-out score is the training loss itself: the likelihood per masked pixel, recomputed here
    ck = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ck["model_config"]["prior"] and ck["model_config"]["likelihood"] == "poisson-gaussian"
    best_is_the_logged_max(run, "blindspot_ll")

    src = tmp_path / "in" / "stack.nii.gz"
    data = noisy_stack(src, 3)
    denoise_scans(run, src, tmp_path / "out", DenoiseConfig(sd=True, amp="off", modality="microscopy"),
                  device="cpu")
    dst = tmp_path / "out" / "stack.nii.gz"
    sd = np.asarray(nib.load(sd_path(dst)).dataobj)
    assert sd.shape == data.shape and sd.dtype == np.float32 and np.all(sd > 0)
    with pytest.raises(ConfigError, match="deterministic"):
        SliceDenoiser(run, DenoiseConfig(samples=2), torch.device("cpu"))


def test_a_rising_heldout_loss_keeps_the_earlier_checkpoint(tmp_path):
    """Train patches dark, held-out patches bright: the better the network learns the train patches, the worse
    its held-out objective, so the scores fall after an early checkpoint, and best.pt stays there."""
    rng = np.random.default_rng(0)
    level = np.where(np.arange(24) < 16, 0.15, 0.85)[:, None, None, None]
    store = patch_store(tmp_path / "store", (level + 0.05 * rng.standard_normal((24, 1, 32, 32))).astype(np.float32),
                        patient_id=["P0"] * 24, split=["train"] * 16 + ["val"] * 8, source="phantom",
                        content_hash="shifted")
    run = tmp_path / "run"
    for posterior, key in ((False, "blindspot_psnr"), (True, "blindspot_ll")):
        train_stage(store, run, _cfg(steps=5, checkpoint_every=1, lr=1e-2, posterior=posterior), device="cpu")
        entries = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
        scores = [e[f"val_{key}"] for e in entries if f"val_{key}" in e]
        assert len(scores) == 5 and int(np.argmax(scores)) < 4 and scores[-1] < max(scores), scores
        best = load_checkpoint(run / "checkpoints" / "best.pt")
        assert best["step"] == int(np.argmax(scores)) + 1 and best["best_score"] == max(scores)
        assert best["metrics"][key] == max(scores)


def test_a_store_without_val_split_holds_out_train_patches_and_resumes_exactly(train_only_store, tmp_path):
    held = held_out_rows(train_only_store, 1 / 16)
    assert held.tolist() == [0, 24, 47]  # 3 of 48, evenly spaced: the first, the middle, the last
    assert held_out_rows(train_only_store, 0) is None
    cfg = resolve_noise_model(train_only_store, _cfg(steps=6, checkpoint_every=2))

    class Recording(BlindSpotTask):
        """The blind-spot task, recording every row a training step reads."""
        seen: set = set()

        def training_pair(self, batch, step):
            self.seen.update(batch.rows.tolist())
            return super().training_pair(batch, step)

    task = Recording(train_only_store, "n2v", cfg.blindspot, seed=0, posterior=True)
    np.testing.assert_array_equal(task.held_out, held)
    full = tmp_path / "full"
    a = train(train_only_store, full, cfg, device="cpu", task=task)
    assert not task.seen & set(held.tolist()) and len(task.seen) > 16  # never trained on
    assert (full / "checkpoints" / "best.pt").exists() and "blindspot_ll" in a["metrics"]

    # killed after step 4's checkpoint: last.pt and best.pt as they were then, the later files gone
    part = tmp_path / "part"
    shutil.copytree(full, part)
    ck = part / "checkpoints"
    early = max((load_checkpoint(ck / f"step_{s:08d}.pt") for s in (2, 4)), key=lambda c: c["best_score"])
    shutil.copy(ck / f"step_{early['step']:08d}.pt", ck / "best.pt")
    shutil.copy(ck / "step_00000004.pt", ck / "last.pt")
    (ck / "step_00000006.pt").unlink()
    b = train_stage(train_only_store, part, cfg, device="cpu", resume=True)
    assert b["best_score"] == a["best_score"] and b["metrics"] == a["metrics"]
    sa, sb = (load_checkpoint(r / "checkpoints" / "best.pt") for r in (full, part))
    assert sa["step"] == sb["step"]
    assert all(torch.equal(sa["model_state"][k], sb["model_state"][k]) for k in sa["model_state"])

"""Self-supervised denoising objectives (n2v, n2s, divnoising): defaults that cannot waste a run, the
refusal of models that cannot denoise, the divnoising likelihood and MMSE, training on a noisy store
and `medvae denoise --samples --sd`."""

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from medvae.cli import app
from medvae.config import DenoiseConfig, TrainStageConfig, parse_model_config
from medvae.denoising.apply import SliceDenoiser, denoise_scans, sd_path
from medvae.denoising.selfsupervised import BlindSpotTask, check_config
from medvae.errors import ConfigError
from medvae.models import build_model
from medvae.models.denoisers.unet import BORDER_MARGIN, pad_to_multiple
from medvae.models.distributions import Likelihood
from medvae.pipeline import train_stage
from medvae.training.checkpoint import load_checkpoint, load_model
from tests.factories import disc_images, patch_store

PHOTONS, READ = 20.0, 2.0
A, B = 1 / PHOTONS, READ**2 / PHOTONS**2  # variance a·s + b of Poisson(photons·s)/photons + N(0, read²)/photons


@pytest.fixture(scope="module")
def noisy_store(tmp_path_factory):
    """Discs with Poisson–Gaussian noise at 20 photons, as a user's noisy scans (values may leave [0, 1])."""
    rng = np.random.default_rng(0)
    clean = disc_images(40, 32, seed=3, level=0.6, background=0.2)
    noisy = (rng.poisson(clean * PHOTONS) + READ * rng.standard_normal(clean.shape)) / PHOTONS
    return patch_store(tmp_path_factory.mktemp("noisy") / "store", noisy.astype(np.float32),
                       patient_id=[f"P{i % 4}" for i in range(40)], split=["train"] * 32 + ["val"] * 8,
                       source="phantom", content_hash="noisy-discs")


def _cfg(objective, steps=3, **model):
    return TrainStageConfig.model_validate({
        "task": "denoise", "objective": objective,
        "model": {"channels": [8, 16], "norm_groups": 4, **model,
                  **({"latent_channels": 2} if objective == "divnoising" or model.get("name") == "unet-vae" else {})},
        "train": {"batch_size": 8, "max_steps": steps, "lr": 2e-3, "warmup_steps": 1, "checkpoint_every": steps,
                  "log_every": 1, "val_batches": 1, "amp": "off", "beta_warmup_steps": 1}})


# ------------------------------------------------------------------ defaults and refusal
def test_denoise_defaults_to_a_denoiser_per_objective():
    assert TrainStageConfig.model_validate({"task": "denoise"}).model.name == "dae"
    assert TrainStageConfig().model.name == "vae"  # reconstruct keeps the ConvVAE
    n2v = TrainStageConfig.model_validate({"task": "denoise", "objective": "n2v"}).model
    assert (n2v.name, n2v.top_skip, n2v.downsample, n2v.likelihood) == ("dae", False, "blurpool", "l2")
    div = TrainStageConfig.model_validate({"task": "denoise", "objective": "divnoising"}).model
    assert (div.name, div.skip_connections, div.input_residual, div.likelihood) == \
        ("unet-vae", False, False, "poisson-gaussian")
    given = TrainStageConfig.model_validate({"task": "denoise", "objective": "n2v",
                                             "model": {"name": "unet-vae", "top_skip": True}}).model
    assert given.name == "unet-vae" and given.top_skip and given.downsample == "blurpool"
    # idempotent: a dumped config reads back the same
    cfg = _cfg("n2v")
    assert TrainStageConfig.model_validate(cfg.model_dump(mode="json")) == cfg


@pytest.mark.parametrize("data,match", [
    ({"task": "denoise", "model": {"name": "vae"}}, "model vae cannot denoise whole slices.*unet-vae or dae"),
    ({"task": "denoise", "model": {"name": "monai-kl"}}, "model monai-kl cannot denoise"),
    ({"task": "denoise", "objective": "divnoising", "model": {"name": "dae"}}, "needs model unet-vae"),
    ({"task": "denoise", "objective": "divnoising", "model": {"skip_connections": True}}, "skip_connections"),
    ({"objective": "n2v"}, "give --task denoise"),
    ({"task": "denoise", "objective": "n2s", "blindspot": {"struct": "horizontal"}}, "n2v only"),
    ({"task": "denoise", "objective": "n2v", "noise": {"flips": True}}, "supervised objective"),
    ({"task": "denoise", "objective": "n2v", "blindspot": {"struct": "box", "struct_length": 3, "fraction": 1 / 16}},
     "hides 56% of every input.*at most 0.02778"),
    ({"task": "denoise", "objective": "sure", "noise": {"target": "noisy"}}, "supervised objective"),
])
def test_configs_that_cannot_denoise_are_refused(data, match):
    with pytest.raises(ConfigError, match=match):
        check_config(TrainStageConfig.model_validate(data))


def test_cli_refuses_before_the_first_step_and_defaults_to_dae(noisy_store, tmp_path):
    run = CliRunner().invoke
    res = run(app, ["train", str(noisy_store.path), "--task", "denoise", "--model", "vaegan", "--out",
                    str(tmp_path / "bad")], terminal_width=200)
    assert res.exit_code == 2 and "unet-vae or dae" in res.output and not (tmp_path / "bad").exists()
    res = run(app, ["train", str(noisy_store.path), "--task", "denoise", "--objective", "n2v", "--noise", "gaussian",
                    "--out", str(tmp_path / "bad")], terminal_width=200)
    assert res.exit_code == 2 and "--noise does not apply" in res.output
    cfg = tmp_path / "small.yaml"  # a YAML without model.name: the command line's --task picks the denoiser
    cfg.write_text(yaml.safe_dump({"model": {"channels": [8, 16], "norm_groups": 4},
                                   "train": {"batch_size": 8, "val_batches": 1, "amp": "off"}}))
    res = run(app, ["train", str(noisy_store.path), "--task", "denoise", "--objective", "n2v", "--max-steps", "2",
                    "--config", str(cfg), "--out", str(tmp_path / "ok"), "--device", "cpu"], terminal_width=200)
    assert res.exit_code == 0, res.output
    saved = yaml.safe_load((tmp_path / "ok" / "config.yaml").read_text())
    assert saved["model"]["name"] == "dae" and saved["objective"] == "n2v" and not saved["model"]["top_skip"]
    assert json.loads((tmp_path / "ok" / "run.json").read_text())["model"] == "dae"


def test_divnoising_without_a_noise_model_calibrates_it_from_the_noisy_store(noisy_store, tmp_path):
    """No model.noise_a / noise_b: the run's Poisson–Gaussian (a, b) come from the store's own patches
    (Foi et al. 2008) and recover the simulation's within 10 %; the run's config keeps them."""
    train_stage(noisy_store, tmp_path / "div", _cfg("divnoising", steps=1), device="cpu")
    saved = yaml.safe_load((tmp_path / "div" / "config.yaml").read_text())["model"]
    assert saved["noise_a"] == pytest.approx(A, rel=0.1) and saved["noise_b"] == pytest.approx(B, rel=0.1)


# ------------------------------------------------------------------ the divnoising likelihood and MMSE
def test_poisson_gaussian_likelihood_is_normal_with_variance_a_s_plus_b():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 8, 8, generator=g) * 2
    x = torch.rand(3, 2, 8, 8, generator=g) * 1.4 - 0.2
    lik = Likelihood("poisson-gaussian", 2, noise_model=(A, B))
    s = torch.sigmoid(logits)
    ref = torch.distributions.Normal(s, torch.sqrt(A * s + B)).log_prob(x)
    torch.testing.assert_close(lik.log_prob(x, logits=logits), ref.flatten(1).sum(1))
    torch.testing.assert_close(lik.log_prob(x, mean=s), ref.flatten(1).sum(1))
    w = (torch.rand(3, 1, 8, 8, generator=g) > 0.7).float()
    torch.testing.assert_close(lik.log_prob(x, logits=logits, weight=w), (ref * w).flatten(1).sum(1))
    with pytest.raises(ConfigError, match="noise_a"):
        Likelihood("poisson-gaussian", 1)


def test_mmse_is_the_mean_of_independently_drawn_posterior_samples():
    torch.manual_seed(0)
    model = build_model(parse_model_config(dict(name="unet-vae", channels=(8, 16), norm_groups=4, image_size=32,
                                    latent_channels=2, skip_connections=False, input_residual=False,
                                    likelihood="poisson-gaussian", noise_a=A, noise_b=B))).eval()
    torch.nn.init.normal_(model.out_conv.weight, std=0.2)
    x = torch.rand(2, 1, 31, 33)  # a mirrored margin, and padded to the model's multiple (2), inside
    mean, sd = model.denoise(x, samples=5, generator=torch.Generator().manual_seed(7), return_sd=True)
    # independently: the posterior by hand, eps drawn in the same order, decoded, averaged
    xp, (rows, cols) = pad_to_multiple(x, model.multiple, BORDER_MARGIN)
    with torch.no_grad():
        stats = model.to_stats(model.mid(_encoder(model, xp)))
        mu, logvar = stats.chunk(2, 1)
        gen, outs = torch.Generator().manual_seed(7), []
        for _ in range(5):
            z = mu + torch.randn(mu.shape, generator=gen) * torch.exp(0.5 * logvar.clamp(-30, 20))
            outs.append(torch.sigmoid(model._decode(model.from_latent(z), None, None))[..., rows, cols])
    outs = torch.stack(outs)
    torch.testing.assert_close(mean, outs.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(sd, outs.std(0), rtol=0, atol=1e-6)
    assert float(sd.mean()) > 0  # the samples differ
    assert model.denoise(x, samples=1, generator=torch.Generator().manual_seed(7)).shape == x.shape


def _encoder(model, x):
    h = model.stem(x)
    for block, down in zip(model.enc, model.down, strict=True):
        h = down(block(h))
    return h


# ------------------------------------------------------------------ training and applying
def test_blindspot_task_pairs_are_the_step_masks_and_weights(noisy_store):
    task = BlindSpotTask(noisy_store, "n2v", _cfg("n2v").blindspot, seed=0, crop=16)
    from medvae.data.loader import Batch

    x = torch.from_numpy(noisy_store.get(np.arange(8)))
    batch = Batch(x, None, np.arange(8))
    a, b = task.training_pair(batch, 3), task.training_pair(batch, 3)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))  # a function of the step alone
    inp, target, weight = a
    assert inp.shape == target.shape == (8, 1, 16, 16) and weight.shape == (8, 1, 16, 16)
    changed = inp != target
    assert torch.all(weight[changed] > 0)  # every replaced pixel is in the loss
    assert not torch.equal(task.training_pair(batch, 4).weight, weight)


@pytest.mark.parametrize("objective", ["n2v", "n2s"])
@pytest.mark.parametrize("posterior", [False, None])  # None: the default, on (a noise model is calibrated)
def test_blindspot_run_on_noisy_store_validates_and_denoises(noisy_store, tmp_path, objective, posterior):
    cfg = _cfg(objective).model_copy(update={"posterior": posterior})
    summary = train_stage(noisy_store, tmp_path / objective, cfg, device="cpu")
    m = summary["metrics"]
    assert set(m) == {"blindspot_mse", "blindspot_psnr"} | ({"blindspot_ll"} if posterior is None else set())
    assert m["blindspot_psnr"] == pytest.approx(10 * math.log10(1 / m["blindspot_mse"]))
    assert (tmp_path / objective / "checkpoints" / "best.pt").exists()
    den = SliceDenoiser(tmp_path / objective, DenoiseConfig(), torch.device("cpu"))
    assert den(np.random.default_rng(0).random((2, 40, 36)).astype(np.float32)).shape == (2, 40, 36)
    with pytest.raises(ConfigError, match="deterministic"):
        SliceDenoiser(tmp_path / objective, DenoiseConfig(samples=4), torch.device("cpu"))


def test_divnoising_trains_on_noisy_store_and_denoise_writes_mmse_and_sd(noisy_store, tmp_path):
    cfg = _cfg("divnoising", steps=4, noise_a=A, noise_b=B)
    run = tmp_path / "div"
    summary = train_stage(noisy_store, run, cfg, device="cpu")
    assert set(summary["metrics"]) == {"elbo", "nll", "kl"} and math.isfinite(summary["metrics"]["elbo"])
    ck = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (ck["model_config"]["noise_a"], ck["model_config"]["noise_b"]) == (A, B)
    data = (np.random.default_rng(0).random((36, 40, 3)) * 1000).astype(np.int16)
    src = tmp_path / "in" / "stack.nii.gz"
    src.parent.mkdir()
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 2.0, 1.0])), src)
    done = denoise_scans(run, src, tmp_path / "out", DenoiseConfig(samples=3, sd=True), device="cpu")
    dst = tmp_path / "out" / "stack.nii.gz"
    assert done[0]["output"] == str(dst) and sd_path(dst).name == "stack_sd.nii.gz"
    out, sd = nib.load(dst), nib.load(sd_path(dst))
    assert out.shape == sd.shape == data.shape and out.get_data_dtype() == np.int16
    assert sd.get_data_dtype() == np.float32 and np.all(np.asarray(sd.dataobj) >= 0)
    assert float(np.asarray(sd.dataobj).mean()) > 0
    np.testing.assert_allclose(sd.affine, out.affine)
    # the MMSE is reproducible (seeded per scan) and differs from the one-pass posterior-mean decode
    den = SliceDenoiser(run, DenoiseConfig(samples=3), torch.device("cpu"))
    x = np.random.default_rng(1).random((2, 32, 32)).astype(np.float32)
    den.reseed()
    first = den(x)
    den.reseed()
    np.testing.assert_array_equal(den(x), first)
    with pytest.raises(ConfigError, match="at least 2"):
        SliceDenoiser(run, DenoiseConfig(samples=1, sd=True), torch.device("cpu"))


def _fold_energy(r: np.ndarray, period: int) -> float:
    """Variance of ``r`` averaged over every ``period`` x ``period`` cell phase: large when ``r`` repeats with
    that period (a pattern of the network's strides), as small as its neighbouring periods' otherwise."""
    n = (min(r.shape) // period) * period
    return float(r[:n, :n].reshape(n // period, period, n // period, period).mean((0, 2)).var())


@pytest.mark.parametrize("norm_groups", [0, pytest.param(8, marks=pytest.mark.xfail(strict=True, reason=(
    "the default's GroupNorm before the output conv pulls a flat image toward one level (docs/denoising.md)")))])
def test_n2v_network_keeps_a_flat_images_level_edges_and_no_stride_pattern(noisy_store, tmp_path, norm_groups):
    """The self-supervised network (16/32/64, a mirrored margin in `denoise`) without normalization, trained briefly
    on the noisy discs (background 0.2, discs 0.8): a whole 128² flat noisy image at either level comes back at its
    level, its first rows and columns at the interior's, and with no pattern at the network's strides. With the
    default's GroupNorm the level does not come back."""
    cfg = TrainStageConfig.model_validate({
        "task": "denoise", "objective": "n2v", "blindspot": {"fraction": 1 / 16},
        "model": {"norm_groups": norm_groups},
        "train": {"batch_size": 8, "max_steps": 100, "lr": 2e-3, "warmup_steps": 5, "checkpoint_every": 100,
                  "log_every": 50, "val_batches": 1, "amp": "off"}})
    assert cfg.model.channels == (16, 32, 64)
    train_stage(noisy_store, tmp_path / "n2v", cfg, device="cpu")
    model, _ = load_model(tmp_path / "n2v" / "checkpoints" / "last.pt", device="cpu")
    rng = np.random.default_rng(5)
    for level in (0.2, 0.8):
        noisy = (rng.poisson(np.full((128, 128), level * PHOTONS)) + READ * rng.standard_normal((128, 128))) / PHOTONS
        out = model.denoise(torch.from_numpy(noisy.astype(np.float32))[None, None])[0, 0].double().numpy()
        interior = out[8:-8, 8:-8]
        assert interior.mean() == pytest.approx(level, abs=0.02)  # GroupNorm: 0.17 at 0.2
        edges = [out[:3].mean(), out[-3:].mean(), out[:, :3].mean(), out[:, -3:].mean()]
        # within 4 standard errors of a 3 x 128 strip's mean (the posterior mean keeps some noise); no margin: 0.06
        assert np.abs(np.subtract(edges, interior.mean())).max() < 0.005 + 4 * interior.std() / np.sqrt(3 * 128)
        r = interior - interior.mean()
        for stride in (2, 4):  # blur-pool down, nearest up: the phases a stride pattern would repeat at
            assert _fold_energy(r, stride) < 3 * max(_fold_energy(r, stride - 1), _fold_energy(r, stride + 1))

"""PG-SURE (``--objective sure``): its expectation over noise draws against the true MSE of fixed denoisers
(exact for a linear filter, numpy's closed form of the expected MSE; the Gaussian closed-form SURE of a linear
filter; the paper's known second-order bias for a quadratic one), a short training run keeping best.pt by the
held-out estimate, and the configs it refuses."""

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from medvae.config import DenoiseConfig, TrainStageConfig
from medvae.denoising.apply import denoise_scans
from medvae.denoising.selfsupervised import build_task, check_config, resolve_noise_model
from medvae.denoising.sure import pg_sure, skewed_probe, sure
from medvae.errors import ConfigError
from medvae.pipeline import train_stage
from medvae.training.checkpoint import load_checkpoint
from medvae.training.trainer import train
from tests.factories import best_is_the_logged_max, disc_images, noisy_stack, patch_store

SIZE, DRAWS = 16, 4000
KERNEL = torch.outer(*2 * [torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16])  # binomial 5x5 blur, sums to 1


def _clean() -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE
    return (0.5 + 0.35 * np.sin(2 * np.pi * xx) * np.cos(3 * np.pi * yy)).astype(np.float64)


def blur(y: torch.Tensor) -> torch.Tensor:
    """A fixed linear denoiser: zero-padded binomial blur (every diagonal entry of its matrix is the center tap)."""
    return F.conv2d(y, KERNEL.to(y.dtype)[None, None], padding=2)


def _noisy(s: np.ndarray, a: float, b: float, draws: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    shot = a * rng.poisson(s / a, (draws, *s.shape)) if a > 0 else np.broadcast_to(s, (draws, *s.shape))
    return torch.from_numpy((shot + math.sqrt(b) * rng.standard_normal((draws, *s.shape)))[:, None]).float()


def _blur_matrix() -> np.ndarray:
    """The blur as an (N, N) matrix, column j = the blur of the j-th unit image (float64)."""
    eye = torch.eye(SIZE * SIZE, dtype=torch.float64).reshape(-1, 1, SIZE, SIZE)
    return blur(eye).reshape(SIZE * SIZE, SIZE * SIZE).T.numpy()


@pytest.mark.parametrize(("a", "b"), [(0.02, 0.01 ** 2), (0.05, 0.0), (0.01, 0.05 ** 2)])
def test_pg_sure_of_a_linear_filter_equals_its_expected_mse(a, b):
    """E[SURE] = E‖Ay − s‖²/N exactly for a linear A; the reference is numpy's closed form
    (‖(A − I)s‖² + Σⱼ (a sⱼ + b) ‖A[:, j]‖²) / N, within 3 standard errors of the mean over the draws."""
    s = _clean()
    y = _noisy(s, a, b, DRAWS, seed=1)
    est = sure(blur, y, a, b, torch.Generator().manual_seed(0)).double().numpy()
    A, sv, n = _blur_matrix(), s.ravel(), s.size
    expected = (np.sum((A @ sv - sv) ** 2) + np.sum((a * sv + b) * np.sum(A ** 2, axis=0))) / n
    se = est.std(ddof=1) / math.sqrt(DRAWS)
    assert abs(est.mean() - expected) < 3 * se, (est.mean(), expected, se)
    # and the realised MSE of the same draws (paired, a tighter interval)
    mse = ((blur(y.double()) - torch.from_numpy(s)) ** 2).flatten(1).mean(1).numpy()
    d = est - mse
    assert abs(d.mean()) < 3 * d.std(ddof=1) / math.sqrt(DRAWS)


def test_gaussian_mc_sure_matches_the_closed_form_sure_of_a_linear_filter():
    """a = 0: the Monte-Carlo divergence estimates tr(A) = N · center tap, so the MC-SURE averages to the
    closed-form SURE ‖Ay − y‖²/N − σ² + 2σ² · center tap (paired, 3 standard errors), and both to E[MSE]."""
    sigma2 = 0.08 ** 2
    s = _clean()
    y = _noisy(s, 0.0, sigma2, DRAWS, seed=2)
    est = sure(blur, y, 0.0, sigma2, torch.Generator().manual_seed(1)).double().numpy()
    yd = y.double()
    closed = (((blur(yd) - yd) ** 2).flatten(1).mean(1) - sigma2 + 2 * sigma2 * float(KERNEL[2, 2])).numpy()
    d = est - closed
    assert abs(d.mean()) < 3 * d.std(ddof=1) / math.sqrt(DRAWS) + 1e-9
    A, sv = _blur_matrix(), s.ravel()
    expected = (np.sum((A @ sv - sv) ** 2) + sigma2 * np.sum(A ** 2)) / sv.size
    assert abs(closed.mean() - expected) < 3 * closed.std(ddof=1) / math.sqrt(DRAWS)


def test_second_order_term_of_a_quadratic_filter():
    """f(y) = blur(y) + c·y² (∂²fᵢ/∂yᵢ² = 2c): E[SURE] = E[MSE] + a² · 2c · mean(s), the Poisson part's
    first-order bias of the paper (closed form for a quadratic f), within 3 paired standard errors; without
    the second-order term −2ab · 2c the estimate misses by many standard errors."""
    a, b, c, draws = 0.05, 0.2 ** 2, 1.0, 2 * DRAWS
    s = _clean()
    y = _noisy(s, a, b, draws, seed=3)

    def f(x):
        return blur(x) + c * x ** 2

    est = sure(f, y, a, b, torch.Generator().manual_seed(2)).double().numpy()
    mse = ((f(y.double()) - torch.from_numpy(s)) ** 2).flatten(1).mean(1).numpy()
    d = est - a ** 2 * 2 * c * s.mean() - mse
    se = d.std(ddof=1) / math.sqrt(draws)
    assert abs(d.mean()) < 3 * se, (d.mean(), se)
    assert 2 * a * b * 2 * c > 10 * se and a ** 2 * 2 * c * s.mean() > 10 * se  # both terms resolved here


def test_the_skewed_probe_has_the_moments_the_second_order_term_needs():
    v = skewed_probe(torch.empty(2_000_000), torch.Generator().manual_seed(0)).double()
    assert len(torch.unique(v)) == 2
    for k, want in ((1, 0.0), (2, 1.0), (3, 1.0)):
        assert abs(float((v ** k).mean()) - want) < 5 * float((v ** k).std()) / math.sqrt(v.numel())


def test_pg_sure_of_the_identity_is_zero_in_expectation_and_exact_terms():
    """f = identity: ‖f − y‖² = 0 and div = N, so SURE = −a·mean(y) − b + 2(a·mean(y) + b) = a·mean(y) + b
    for every draw and every probe (no Monte-Carlo noise for a linear f with a ±1 probe's uᵢ² = 1)."""
    y = torch.rand(3, 1, 8, 8)
    u = torch.ones_like(y)
    stack = torch.cat([y, y + 1e-3 * u])
    got = pg_sure(y, stack, u, None, 0.1, 0.0)
    torch.testing.assert_close(got, 0.1 * y.flatten(1).mean(1), rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------ training
PHOTONS, READ = 20.0, 2.0


@pytest.fixture(scope="module")
def noisy_store(tmp_path_factory):
    rng = np.random.default_rng(3)
    clean = disc_images(40, 32, seed=3, level=0.6, background=0.2)
    noisy = ((rng.poisson(clean * PHOTONS) + READ * rng.standard_normal(clean.shape)) / PHOTONS).astype(np.float32)
    return patch_store(tmp_path_factory.mktemp("noisy") / "store", noisy, patient_id=["P0"] * 40,
                       split=["train"] * 32 + ["val"] * 8, source="phantom", content_hash="noisy-sure")


def _cfg(steps=4, model=None, **train):
    return TrainStageConfig.model_validate({
        "task": "denoise", "objective": "sure", "model": {"channels": [8, 16], "norm_groups": 4, **(model or {})},
        "train": {"batch_size": 8, "max_steps": steps, "lr": 2e-3, "warmup_steps": 1, "checkpoint_every": 1,
                  "log_every": 1, "val_batches": 1, **train}})


def test_sure_run_keeps_best_by_the_heldout_estimate_and_denoises_as_trained(noisy_store, tmp_path):
    run = tmp_path / "sure"
    summary = train_stage(noisy_store, run, _cfg(), device="cpu")
    m = summary["metrics"]
    assert set(m) == {"sure_mse", "sure_psnr"} and m["sure_psnr"] == pytest.approx(10 * math.log10(1 / m["sure_mse"]))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["noise_a"] > 0 and saved["model"]["noise_b"] >= 0 and saved["train"]["amp"] == "off"
    assert saved["model"]["name"] == "dae" and not saved["model"]["prior"]
    entries = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(e["sure_mse"]) for e in entries)
    assert len(best_is_the_logged_max(run, "sure_psnr")) == 4
    # medvae denoise: the network as trained, every pixel in view (no masks, no sd)
    src = tmp_path / "in" / "stack.nii.gz"
    data = noisy_stack(src, 2)
    denoise_scans(run, src, tmp_path / "out", DenoiseConfig(amp="off", modality="microscopy"), device="cpu")
    out = np.asarray(nib.load(tmp_path / "out" / "stack.nii.gz").dataobj)
    assert out.shape == data.shape and np.isfinite(out).all()


def test_sure_uses_a_given_noise_model_and_calibrates_a_missing_one(noisy_store):
    given = resolve_noise_model(noisy_store, _cfg(model={"noise_a": 0.05, "noise_b": 0.01}))
    assert (given.model.noise_a, given.model.noise_b) == (0.05, 0.01)
    calibrated = resolve_noise_model(noisy_store, _cfg())
    assert calibrated.model.noise_a == pytest.approx(1 / PHOTONS, rel=0.5)  # Foi's fit on 32 small patches
    assert calibrated.train.amp == "off" and _cfg(amp="off").train.amp == "off"


@pytest.mark.parametrize(("model", "train", "match"), [
    ({"name": "vae"}, {}, "cannot denoise whole slices"),
    ({"name": "unet-vae"}, {}, "deterministic model dae"),
    ({"prior": True, "likelihood": "poisson-gaussian", "noise_a": 0.05, "noise_b": 0.01}, {}, "without model.prior"),
    ({}, {"amp": "bf16"}, "train.amp off"),
])
def test_check_config_refuses_what_sure_cannot_train(model, train, match):
    with pytest.raises(ConfigError, match=match):
        check_config(_cfg(model=model, **train))


def test_sure_without_val_split_validates_on_held_out_rows_and_resumes_exactly(tmp_path):
    """A user's noisy image alone (no val split): blindspot.holdout of the train patches are validated on, never
    trained on; a run killed after step 2 and resumed ends with the same weights and held-out SURE (the probes
    of step s come from (seed, s) alone)."""
    rng = np.random.default_rng(5)
    clean = disc_images(48, 32, seed=5, level=0.6, background=0.2)
    noisy = ((rng.poisson(clean * PHOTONS) + READ * rng.standard_normal(clean.shape)) / PHOTONS).astype(np.float32)
    store = patch_store(tmp_path / "store", noisy, patient_id=["P0"] * 48, split=["train"] * 48, source="phantom",
                        content_hash="noisy-sure-train-only")
    cfg = _cfg(steps=4, model={"noise_a": 1 / PHOTONS, "noise_b": READ**2 / PHOTONS**2}, checkpoint_every=2)
    task = build_task(store, resolve_noise_model(store, cfg))
    assert task.held_out.tolist() == [0, 24, 47]
    seen = set()
    original = task.training_pair

    def recording(batch, step):
        seen.update(batch.rows.tolist())
        return original(batch, step)

    task.training_pair = recording
    full = train(store, tmp_path / "full", resolve_noise_model(store, cfg), device="cpu", task=task)
    assert not seen & {0, 24, 47} and "sure_psnr" in full["metrics"]
    part = tmp_path / "part"  # stopped after 2 steps (their LRs are the 4-step run's: warmup 1, cosine from 1.0)
    train_stage(store, part, cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 2})}),
                device="cpu")
    resumed = train_stage(store, part, cfg, device="cpu", resume=True)
    assert resumed["metrics"] == full["metrics"] and resumed["best_score"] == full["best_score"]
    sa, sb = (load_checkpoint(r / "checkpoints" / "last.pt") for r in (tmp_path / "full", part))
    assert all(torch.equal(sa["model_state"][k], sb["model_state"][k]) for k in sa["model_state"])

"""Exact resume: a `medvae train` process killed with SIGKILL and resumed equals an uninterrupted run.

Also for the denoise task: its noise comes from (seed, step), so the resumed run draws the same
noisy inputs, and for the self-supervised objectives: the blind-spot masks (n2v) and crops come from
(seed, step) too, and divnoising's posterior samples from the restored RNG."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from medvae.config import TrainStageConfig
from medvae.pipeline import train_stage
from medvae.training.checkpoint import load_checkpoint
from tests.factories import tiny_config

N_STEPS = 20


def _losses(run):
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def _denoise_config(model: str, objective: str = "supervised") -> TrainStageConfig:
    extra = {"noise_a": 0.05, "noise_b": 0.01} if objective == "divnoising" else {}
    if model == "unet-vae":
        extra["latent_channels"] = 2
    return TrainStageConfig.model_validate({
        "task": "denoise", "objective": objective,
        "noise": {"kind": "poisson-gaussian", "levels": [5, 50], "crop": 32},
        "model": {"name": model, "channels": [8, 16], "norm_groups": 4, **extra},
        "train": {"batch_size": 8, "max_steps": N_STEPS, "lr": 2e-3, "warmup_steps": 2, "checkpoint_every": 5,
                  "log_every": 1, "val_batches": 1, "ema_decay": 0.9, "amp": "off", "beta": 0.01}})


@pytest.mark.parametrize("model", ["vae", "vaegan", "dae", "unet-vae", "dae:n2v", "unet-vae:divnoising"])
def test_resume_after_sigkill_matches_uninterrupted_run(tiny_store, tmp_path, model):
    # the kill lands mid-epoch (8 batches per epoch), and for the VAE-GAN after the critic started
    model, _, objective = model.partition(":")
    denoise = model in ("dae", "unet-vae")
    cfg = _denoise_config(model, objective or "supervised") if denoise else \
        tiny_config(model, max_steps=N_STEPS, checkpoint_every=5, log_every=1, ema_decay=0.9, disc_start=3,
                    amp="off")  # the CLI run below is a subprocess: conftest's fp32 for amp auto does not reach it
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))

    run_a = tmp_path / "a"
    train_stage(tiny_store, run_a, cfg, device="cpu")

    run_b = tmp_path / "b"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "medvae", "train", str(tiny_store.path), "--model", model, "--out", str(run_b),
         "--config", str(cfg_path), "--device", "cpu", *(["--task", "denoise"] if denoise else [])],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = run_b / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"run B ended before the kill: {err.decode()[-2000:]}"
    killed_at = load_checkpoint(last)["step"]
    assert 0 < killed_at < N_STEPS
    assert json.loads((run_b / "run.json").read_text())["status"] == "running"

    summary = train_stage(tiny_store, run_b, cfg, device="cpu", resume=True)
    assert summary["step"] == N_STEPS

    a, b = load_checkpoint(run_a / "checkpoints" / "last.pt"), load_checkpoint(last)
    assert a["step"] == b["step"] == N_STEPS
    for key in ("model_state", "ema_state"):
        for name, ref in a[key].items():
            torch.testing.assert_close(b[key][name], ref, rtol=0, atol=1e-6, msg=f"{key}.{name}")
    log_a, log_b = _losses(run_a), _losses(run_b)
    assert [e["step"] for e in log_b] == list(range(1, N_STEPS + 1))
    terms = [k for k in log_a[0] if k not in ("images_per_s",)]
    for ea, eb in zip(log_a, log_b, strict=False):
        for k in terms:
            assert eb[k] == pytest.approx(ea[k], rel=1e-5, abs=1e-6), (ea["step"], k)
    if denoise and not objective:
        assert "val_noisy_psnr" in log_a[-1] and log_a[-1]["val_psnr"] > 0
    elif objective:
        assert {"n2v": "val_blindspot_psnr", "divnoising": "val_elbo"}[objective] in log_a[-1]


@pytest.mark.parametrize("model", ["vae", "dae"])
def test_resume_of_a_checkpoint_from_before_conditioning(tiny_store, tmp_path, model):
    """A checkpoint of medvae <= 0.3 resumes: its model config is the flat dict with every family's keys
    (another family's at their defaults: dropped) and, older still, without condition / condition_names /
    condition_dim (they take their defaults); training ends at the same step and weights."""
    from medvae.config import flat_model_dump
    from medvae.training.checkpoint import save_checkpoint

    cfg = tiny_config("vae", max_steps=6, checkpoint_every=3, log_every=1) if model == "vae" else \
        _denoise_config("dae").model_copy(update={"train": tiny_config(max_steps=6, checkpoint_every=3).train})
    full = tmp_path / "full"
    train_stage(tiny_store, full, cfg, device="cpu")
    run = tmp_path / "old"
    train_stage(tiny_store, run, cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 3})}),
                device="cpu")
    last = run / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)
    ckpt["model_config"] = flat_model_dump(cfg.model.model_copy(update={
        "condition": "none", "in_channels": 1, "image_size": 64, "channels": cfg.model.resolved_channels()}))
    assert {"latent_channels", "disc_channels", "top_skip"} <= set(ckpt["model_config"])
    for key in ("condition", "condition_names", "condition_dim"):
        ckpt["model_config"].pop(key)
    save_checkpoint(last, ckpt)
    summary = train_stage(tiny_store, run, cfg, device="cpu", resume=True)
    assert summary["step"] == 6
    a = load_checkpoint(full / "checkpoints" / "last.pt")["model_state"]
    b = load_checkpoint(last)["model_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)

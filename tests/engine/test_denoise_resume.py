"""The denoise task resumes exactly: noise comes from (seed, step), so a killed and resumed run
draws the same noisy inputs and ends with the same weights as an uninterrupted one."""

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
from medvae.engine.checkpoint import load_checkpoint
from medvae.engine.trainer import train

N_STEPS = 16


def _cfg(model: str) -> TrainStageConfig:
    return TrainStageConfig.model_validate({
        "task": "denoise", "noise": {"kind": "poisson-gaussian", "levels": [5, 50], "crop": 32},
        "model": {"name": model, "channels": [8, 16], "norm_groups": 4, "latent_channels": 2},
        "train": {"batch_size": 8, "max_steps": N_STEPS, "lr": 2e-3, "warmup_steps": 2, "checkpoint_every": 5,
                  "log_every": 1, "val_batches": 1, "ema_decay": 0.9, "amp": "off", "beta": 0.01}})


@pytest.mark.parametrize("model", ["dae", "unet-vae"])
def test_denoise_resume_after_sigkill_matches_uninterrupted_run(tiny_store, tmp_path, model):
    cfg = _cfg(model)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    run_a = tmp_path / "a"
    train(tiny_store, run_a, cfg, device="cpu")

    run_b = tmp_path / "b"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "medvae", "train", str(tiny_store.path), "--out", str(run_b), "--config",
         str(cfg_path), "--device", "cpu", "--task", "denoise"], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    last = run_b / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"run B ended before the kill: {err.decode()[-2000:]}"
    assert 0 < load_checkpoint(last)["step"] < N_STEPS

    summary = train(tiny_store, run_b, cfg, device="cpu", resume=True)
    assert summary["step"] == N_STEPS
    a, b = load_checkpoint(run_a / "checkpoints" / "last.pt"), load_checkpoint(last)
    for key in ("model_state", "ema_state"):
        for name, ref in a[key].items():
            torch.testing.assert_close(b[key][name], ref, rtol=0, atol=1e-6, msg=f"{key}.{name}")
    log_a = [json.loads(x) for x in (run_a / "train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (run_b / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log_b] == list(range(1, N_STEPS + 1))
    for ea, eb in zip(log_a, log_b, strict=True):
        assert eb["loss"] == pytest.approx(ea["loss"], rel=1e-5, abs=1e-6)
        assert ("val_psnr" in ea) == ("val_psnr" in eb)
    assert "val_noisy_psnr" in log_a[-1] and log_a[-1]["val_psnr"] > 0

"""The training loop on a tiny store: loss falls, VAE–GAN updates both networks, NaN guard, run files."""

import json
import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

import medvae.losses
from medvae.cli import app
from medvae.engine.checkpoint import load_checkpoint, load_model
from medvae.engine.runtime import resolve_amp, seed_everything
from medvae.engine.schedule import beta_at, lr_factor
from medvae.engine.trainer import resolve_config, train
from medvae.errors import CheckpointError, TrainingError
from medvae.models import build_model
from tests.engine.conftest import make_store, tiny_config


def read_log(run):
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_schedules_closed_forms():
    assert lr_factor(0, 10, 110) == pytest.approx(0.1)
    assert lr_factor(9, 10, 110) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110) == pytest.approx(0.5)  # half way through the cosine
    assert lr_factor(110, 10, 110) == pytest.approx(0.0, abs=1e-12)
    assert beta_at(0, 2.0, 100) == 0.0 and beta_at(50, 2.0, 100) == 1.0 and beta_at(500, 2.0, 100) == 2.0
    assert beta_at(0, 2.0, 0) == 2.0
    assert resolve_amp("auto", torch.device("cpu")) is None
    assert resolve_amp("bf16", torch.device("cpu")) is torch.bfloat16


def test_vae_loss_falls_and_run_files(tiny_store, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config("vae", max_steps=30, checkpoint_every=10, log_every=1, ema_decay=0.5)
    summary = train(tiny_store, run, cfg, device="cpu")
    assert summary["step"] == 30 and summary["bad_steps"] == 0
    log = read_log(run)
    assert [e["step"] for e in log] == list(range(1, 31))
    for key in ("loss", "nll", "kl", "elbo", "lr", "beta", "images_per_s", "grad_norm"):
        assert all(math.isfinite(e[key]) for e in log), key
    first, last = sum(e["loss"] for e in log[:5]) / 5, sum(e["loss"] for e in log[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert log[0]["beta"] == 0.0 and log[-1]["beta"] == 1.0  # KL annealing over beta_warmup_steps
    assert {"val_elbo", "val_ssim", "val_psnr"} <= set(log[9]) and "val_elbo" not in log[8]

    ckdir = run / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == [
        "best.pt", "last.pt", "step_00000010.pt", "step_00000020.pt", "step_00000030.pt"]
    ckpt = torch.load(ckdir / "last.pt", weights_only=True)
    assert ckpt["step"] == 30 and ckpt["store_hash"] == tiny_store.content_hash
    assert ckpt["model_config"]["image_size"] == 64 and ckpt["model_config"]["in_channels"] == 1
    assert ckpt["ema_state"] is not None and set(ckpt["ema_state"]) == set(ckpt["model_state"])
    assert ckpt["metrics"]["elbo"] == pytest.approx(log[-1]["val_elbo"])
    model, meta = load_model(ckdir / "best.pt")
    assert meta["step"] in (10, 20, 30)
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["status"] == "done" and run_json["step"] == 30
    assert run_json["store_hash"] == tiny_store.content_hash and run_json["model"] == "vae"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["model"]["image_size"] == 64 and resolved["train"]["max_steps"] == 30


def _initial_model(cfg, store):
    cfg = resolve_config(cfg, store)
    seed_everything(cfg.train.seed)  # the trainer builds its model right after this seeding
    return build_model(cfg.model)


def test_vaegan_step_changes_both_networks(tiny_store, tmp_path):
    cfg = tiny_config("vaegan", max_steps=1, disc_start=0, warmup_steps=0, checkpoint_every=1)
    init = _initial_model(cfg, tiny_store).state_dict()
    train(tiny_store, tmp_path / "run", cfg, device="cpu")
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    after = ckpt["model_state"]
    changed = {k for k in init if init[k].is_floating_point() and not torch.equal(init[k], after[k])}
    disc = {k for k in init if k.startswith("discriminator.")}
    assert disc and changed & disc, "discriminator did not change"
    assert any(k.startswith("encoder") for k in changed) and any(k.startswith("decoder") for k in changed)
    assert set(ckpt["optimizer_states"]) == {"generator", "discriminator"}
    entry = read_log(tmp_path / "run")[0]
    assert {"adv", "fm", "adv_weight", "d_loss", "d_real", "d_fake"} <= set(entry)


def test_nan_guard_skips_and_counts(tiny_store, tmp_path, monkeypatch, caplog):
    real = medvae.losses.generator_loss

    def flaky(model, x, *, step, beta, cfg):
        loss, terms, aux = real(model, x, step=step, beta=beta, cfg=cfg)
        if step in (2, 4):
            loss = loss * float("nan")
        return loss, terms, aux

    monkeypatch.setattr(medvae.losses, "generator_loss", flaky)
    summary = train(tiny_store, tmp_path / "run", tiny_config(max_steps=6, max_bad_steps=3), device="cpu")
    assert summary["step"] == 6 and summary["bad_steps"] == 2
    log = read_log(tmp_path / "run")
    assert [e["skipped"] for e in log] == [0, 0, 1, 0, 1, 0]
    assert "non-finite loss; step skipped (1/3 bad steps)" in caplog.text
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model_state"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_nan_guard_stops_with_clear_error(tmp_path):
    store = make_store(tmp_path / "nan_store", nan_rows=range(64))  # every training patch is NaN
    with pytest.raises(TrainingError, match="non-finite.*max_bad_steps=2.*lower train.lr"):
        train(store, tmp_path / "run", tiny_config(max_steps=10, max_bad_steps=2), device="cpu")


def test_train_cli_overrides_config_and_resume_checks(tiny_store, tmp_path, caplog):
    cfg_path = tmp_path / "cfg.yaml"
    cfg = tiny_config("vaegan", max_steps=50, batch_size=4)
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    run = tmp_path / "run"
    res = _train_cli(tiny_store.path, run, "--model", "vae", "--config", cfg_path, "--max-steps", 2,
                     "--batch-size", 8, "--checkpoint-every", 2, "--resume")  # resume without checkpoint: fresh
    assert res.exit_code == 0, res.output
    assert "no checkpoint yet; starting from scratch" in caplog.text
    assert json.loads((run / "run.json").read_text())["step"] == 2
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["model"]["name"] == "vae" and resolved["train"]["batch_size"] == 8
    assert resolved["model"]["channels"] == [8, 16, 32]  # from the YAML

    other = make_store(tmp_path / "other", content_hash="another-hash")
    with pytest.raises(CheckpointError, match="tiny-store-v1.*another-hash"):
        train(other, run, resolve_config(tiny_config(max_steps=4), other), device="cpu", resume=True)
    res = _train_cli(tiny_store.path, tmp_path / "r3", "--batch-size", 0)
    assert res.exit_code == 2 and "train.batch_size is 0" in res.output
    res = _train_cli(tiny_store.path, tmp_path / "r2", "--batch-size", 200)
    assert res.exit_code == 2 and "fewer than the batch size" in res.output


def _train_cli(store, out, *args):
    return CliRunner().invoke(app, ["train", str(store), "--out", str(out), "--device", "cpu", *map(str, args)])


# fp16 convolutions are emulated on CPU: slow
@pytest.mark.parametrize("amp", ["bf16", pytest.param("fp16", marks=pytest.mark.slow)])
def test_mixed_precision_on_cpu(tiny_store, tmp_path, amp):
    summary = train(tiny_store, tmp_path / "run", tiny_config("vaegan", max_steps=3, amp=amp, disc_start=1),
                    device="cpu")
    assert summary["step"] == 3
    log = read_log(tmp_path / "run")
    assert all(math.isfinite(e["loss"]) and math.isfinite(e["d_loss"]) for e in log[1:])
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert bool(ckpt["scaler_state"]) == (amp == "fp16")  # GradScaler only for fp16

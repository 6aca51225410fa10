"""The training loop on a tiny store: loss falls, VAE–GAN updates both networks, NaN guard, run files."""

import io
import json
import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

import medvae.training.losses
import medvae.training.step
from medvae.cli import app
from medvae.errors import CheckpointError, TrainingError
from medvae.models import build_model
from medvae.training.checkpoint import load_checkpoint, load_model
from medvae.training.runtime import seed_everything
from medvae.training.schedule import (
    beta_at,
    ema_model,
    ema_state_dict,
    load_ema_state,
    load_scheduler_state,
    lr_factor,
    warmup_cosine,
)
from medvae.training.trainer import resolve_config, train
from tests.factories import tiny_config, tiny_disc_store


def read_log(run):
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_schedules_closed_forms():
    assert lr_factor(0, 10, 110) == pytest.approx(0.1)
    assert lr_factor(9, 10, 110) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110) == pytest.approx(0.5)  # half way through the cosine
    assert lr_factor(110, 10, 110) == pytest.approx(0.0, abs=1e-12)
    assert beta_at(0, 2.0, 100) == 0.0 and beta_at(50, 2.0, 100) == 1.0 and beta_at(500, 2.0, 100) == 2.0
    assert beta_at(0, 2.0, 0) == 2.0


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
    assert {"adv", "fm", "adv_weight", "d_loss", "d_real", "d_fake"} <= set(entry) and "freq" not in entry


def test_frequency_loss_is_logged_and_keys_stay_without_it(tiny_store, tmp_path):
    from medvae.pipeline import train_stage_key

    cfg = tiny_config("vaegan", max_steps=1, disc_start=0, warmup_steps=0, checkpoint_every=1, frequency_weight=10.0)
    train(tiny_store, tmp_path / "run", cfg, device="cpu")
    assert read_log(tmp_path / "run")[0]["freq"] > 0
    off = tiny_config("vaegan")
    assert "frequency_weight" not in off.stable_dump()["train"]
    assert train_stage_key("h", off) != train_stage_key("h", tiny_config("vaegan", frequency_weight=10.0))


def test_vaegan_best_checkpoint_is_chosen_after_the_critic_started(tiny_store, tmp_path):
    # Validations at steps 4, 8, 12; the critic joins after step 4. A VAE–GAN's best.pt must be a
    # step the critic trained (8 or 12), even where the pre-critic ELBO is higher.
    cfg = tiny_config("vaegan", max_steps=12, disc_start=4, checkpoint_every=4)
    train(tiny_store, tmp_path / "gan", cfg, device="cpu")
    val = {e["step"]: e["val_elbo"] for e in read_log(tmp_path / "gan") if "val_elbo" in e}
    assert sorted(val) == [4, 8, 12]
    best = load_checkpoint(tmp_path / "gan" / "checkpoints" / "best.pt")
    assert best["step"] == max((8, 12), key=val.get) and best["best_score"] == pytest.approx(val[best["step"]])
    # A plain VAE keeps choosing by val ELBO over all validations.
    train(tiny_store, tmp_path / "vae", tiny_config("vae", max_steps=12, checkpoint_every=4), device="cpu")
    val = {e["step"]: e["val_elbo"] for e in read_log(tmp_path / "vae") if "val_elbo" in e}
    assert load_checkpoint(tmp_path / "vae" / "checkpoints" / "best.pt")["step"] == max(val, key=val.get)


def test_nan_guard_skips_and_counts(tiny_store, tmp_path, monkeypatch, caplog):
    real = medvae.training.losses.vae_loss
    calls = []

    def flaky(*args, **kwargs):  # the generator loss of the 3rd and 5th step (0-based 2 and 4) is NaN
        loss, terms = real(*args, **kwargs)
        calls.append(1)
        if len(calls) in (3, 5):
            loss = loss * float("nan")
        return loss, terms

    monkeypatch.setattr(medvae.training.losses, "vae_loss", flaky)
    summary = train(tiny_store, tmp_path / "run", tiny_config(max_steps=6, max_bad_steps=3), device="cpu")
    assert summary["step"] == 6 and summary["bad_steps"] == 2
    log = read_log(tmp_path / "run")
    assert [e["skipped"] for e in log] == [0, 0, 1, 0, 1, 0]
    assert "non-finite loss; step skipped (1/3 bad steps)" in caplog.text
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model_state"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def _nan_at(monkeypatch, calls_nan):
    """Make the generator loss of the given 1-based calls NaN."""
    real = medvae.training.losses.vae_loss
    calls = []

    def flaky(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        calls.append(1)
        if len(calls) in calls_nan:
            loss = loss * float("nan")
        return loss, terms

    monkeypatch.setattr(medvae.training.losses, "vae_loss", flaky)


@pytest.mark.parametrize("model", ["vae", "vaegan"])
def test_device_path_nan_guard_skips_counts_and_resumes_exactly(tiny_store, tmp_path, monkeypatch, caplog, model):
    """The CUDA path of the NaN guard, run on the CPU: the decision stays a tensor (fused AdamW's found_inf,
    a masked EMA), the trainer reads it back only at reports; the skipped steps change no weight, are
    counted and warned about by step number, and a run resumed from a checkpoint ends bit for bit where an
    uninterrupted one does."""
    monkeypatch.setattr(medvae.training.step, "device_path", lambda device, amp: True)
    _nan_at(monkeypatch, (3, 5))  # steps 2 and 4 (0-based); the uninterrupted run's calls only
    cfg = tiny_config(model, max_steps=12, max_bad_steps=3, log_every=3, checkpoint_every=6, ema_decay=0.9,
                      disc_start=1)
    summary = train(tiny_store, tmp_path / "a", cfg, device="cpu")
    assert summary["step"] == 12 and summary["bad_steps"] == 2
    assert "step 2: non-finite loss; step skipped (1/3 bad steps)" in caplog.text
    assert "step 4: non-finite loss; step skipped (2/3 bad steps)" in caplog.text
    log = read_log(tmp_path / "a")
    assert [e["step"] for e in log] == [3, 6, 9, 12] and [e["bad_steps"] for e in log] == [1, 2, 2, 2]
    ck = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in ck["model_state"].values() if v.is_floating_point())
    step_counts = {int(s["step"]) for s in ck["optimizer_states"]["generator"]["state"].values()}
    assert step_counts == {10}  # 12 steps, 2 skipped: the fused AdamW did not count them
    # resume from step 6 (after both bad steps): the rest of the run is the same, bit for bit
    monkeypatch.setattr(medvae.training.losses, "vae_loss", _real_vae_loss)
    six = tiny_config(model, max_steps=6, max_bad_steps=3, log_every=3, checkpoint_every=6, ema_decay=0.9,
                      disc_start=1)
    b = tmp_path / "b"
    (b / "checkpoints").mkdir(parents=True)
    for f in ("config.yaml", "train_log.jsonl", "run.json"):
        (b / f).write_bytes((tmp_path / "a" / f).read_bytes())
    (b / "checkpoints" / "last.pt").write_bytes((tmp_path / "a" / "checkpoints" / "step_00000006.pt").read_bytes())
    assert load_checkpoint(b / "checkpoints" / "last.pt")["step"] == six.train.max_steps
    train(tiny_store, b, cfg, device="cpu", resume=True)
    ca, cb = ck, load_checkpoint(b / "checkpoints" / "last.pt")
    assert cb["bad_steps"] == 2
    for key in ("model_state", "ema_state"):
        for name, v in ca[key].items():
            assert torch.equal(v, cb[key][name]), (key, name)
    assert [e["loss"] for e in read_log(b)] == [e["loss"] for e in log]


_real_vae_loss = medvae.training.losses.vae_loss


def test_device_path_stops_with_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(medvae.training.step, "device_path", lambda device, amp: True)
    store = tiny_disc_store(tmp_path / "nan_store", nan_rows=range(64))
    with pytest.raises(TrainingError, match="non-finite.*max_bad_steps=2"):
        train(store, tmp_path / "run", tiny_config(max_steps=10, max_bad_steps=2, log_every=5), device="cpu")


def test_nan_guard_stops_with_clear_error(tmp_path):
    store = tiny_disc_store(tmp_path / "nan_store", nan_rows=range(64))  # every training patch is NaN
    with pytest.raises(TrainingError, match="non-finite.*max_bad_steps=2.*lower train.lr"):
        train(store, tmp_path / "run", tiny_config(max_steps=10, max_bad_steps=2), device="cpu")


def test_train_cli_overrides_config_and_resume_checks(tiny_store, tmp_path, caplog):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config("vaegan").model_dump(mode="json")))
    res = _train_cli(tiny_store.path, tmp_path / "gan", "--model", "vae", "--config", cfg_path)
    assert res.exit_code == 2 and "model.disc_channels is an option of vaegan, not of model vae" in res.output
    cfg = tiny_config("vae", max_steps=50, batch_size=4)
    cfg_path.write_text(yaml.safe_dump({**cfg.model_dump(mode="json"), "model": {**cfg.model.model_dump(mode="json"),
                                                                                "name": "monai-vae"}}))
    run = tmp_path / "run"
    res = _train_cli(tiny_store.path, run, "--model", "vae", "--config", cfg_path, "--max-steps", 2,
                     "--batch-size", 8, "--checkpoint-every", 2, "--resume")  # resume without checkpoint: fresh
    assert res.exit_code == 0, res.output
    assert "no checkpoint yet; starting from scratch" in caplog.text
    assert json.loads((run / "run.json").read_text())["step"] == 2
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["model"]["name"] == "vae" and resolved["train"]["batch_size"] == 8
    assert resolved["model"]["channels"] == [8, 16, 32]  # from the YAML

    other = tiny_disc_store(tmp_path / "other", content_hash="another-hash")
    with pytest.raises(CheckpointError, match="tiny-store-v1.*another-hash"):
        train(other, run, resolve_config(tiny_config(max_steps=4), other), device="cpu", resume=True)
    res = _train_cli(tiny_store.path, tmp_path / "r3", "--batch-size", 0)
    assert res.exit_code == 2 and "train.batch_size is 0" in res.output
    res = _train_cli(tiny_store.path, tmp_path / "r2", "--batch-size", 200)
    assert res.exit_code == 2 and "fewer than the batch size" in res.output


def _train_cli(store, out, *args):
    return CliRunner().invoke(app, ["train", str(store), "--out", str(out), "--device", "cpu", *map(str, args)])


def _record_activation_dtypes(monkeypatch) -> list:
    """Make the trainer's model record the dtype of its decoder's output conv on every call."""
    import medvae.training.trainer

    seen = []
    build = medvae.training.trainer.build_model

    def build_and_hook(cfg):
        model = build(cfg)
        model.out_conv.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
        return model

    monkeypatch.setattr(medvae.training.trainer, "build_model", build_and_hook)
    return seen


# fp16 convolutions are emulated on CPU: slow
@pytest.mark.parametrize("amp", ["bf16", pytest.param("fp16", marks=pytest.mark.slow)])
def test_mixed_precision_on_cpu(tiny_store, tmp_path, amp, monkeypatch):
    """Same run in fp32 and under autocast: the losses agree to a few percent but not bit for bit,
    and the convolutions really ran in the low precision."""
    cfg = tiny_config("vaegan", max_steps=3, disc_start=1, warmup_steps=1, lr=1e-4, checkpoint_every=3)
    seen = _record_activation_dtypes(monkeypatch)
    train(tiny_store, tmp_path / "fp32", cfg, device="cpu")
    assert seen and set(seen) == {torch.float32}
    seen.clear()
    amp_cfg = cfg.model_copy(deep=True)
    amp_cfg.train.amp = amp
    summary = train(tiny_store, tmp_path / "amp", amp_cfg, device="cpu")
    assert summary["step"] == 3
    low = torch.bfloat16 if amp == "bf16" else torch.float16
    assert set(seen) == {low}, seen  # autocast ran: the training forwards (and validation) saw low precision
    ref, log = read_log(tmp_path / "fp32"), read_log(tmp_path / "amp")
    assert all(math.isfinite(e["loss"]) and math.isfinite(e["d_loss"]) for e in log[1:])
    for key in ("loss", "nll", "kl"):
        a = [e[key] for e in ref]
        b = [e[key] for e in log]
        assert b == pytest.approx(a, rel=0.05, abs=0.5), key
    assert [e["loss"] for e in log] != [e["loss"] for e in ref]  # really another precision
    ckpt = load_checkpoint(tmp_path / "amp" / "checkpoints" / "last.pt")
    assert bool(ckpt["scaler_state"]) == (amp == "fp16")  # GradScaler only for fp16


def test_lambdalr_is_lr_factor_and_resumes_on_a_longer_schedule():
    w = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([w], lr=0.1)
    sched = warmup_cosine(opt, warmup_steps=10, total_steps=110)
    for step in range(120):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor(step, 10, 110), abs=1e-15)
        assert sched.get_last_lr()[0] == pytest.approx(0.1 * lr_factor(step, 10, 110), abs=1e-15)
        # closed form, independent of lr_factor: linear warm-up, then half a cosine
        expected = (step + 1) / 10 if step < 10 else 0.5 * (1 + math.cos(math.pi * min(1, (step - 10) / 100)))
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * expected, abs=1e-15)
        opt.step()
        sched.step()
        if step == 49:
            state = sched.state_dict()
    # checkpoint and resume after 50 steps, with max_steps 110 -> 210
    buf = io.BytesIO()
    torch.save({"s": state, "o": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    opt2.load_state_dict(saved["o"])
    sched2 = warmup_cosine(opt2, 10, 210)
    load_scheduler_state(sched2, saved["s"], step=50)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor(50, 10, 210))
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor(51, 10, 210))
    # the scheduler state of medvae <= 0.1
    sched3 = warmup_cosine(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), 10, 110)
    load_scheduler_state(sched3, {"warmup_steps": 10, "total_steps": 110, "base_lrs": [0.1], "last_lr": [0.0]}, 60)
    assert sched3.get_last_lr()[0] == pytest.approx(0.05)


def test_averaged_model_is_the_decay_weighted_average():
    """EMA_t = d^t W_0 + sum_k (1 - d) d^(t-k) W_k over the generator; the critic is not averaged."""
    torch.manual_seed(0)
    model = build_model(tiny_config("vaegan").model.model_copy(update={"image_size": 64}))
    d = 0.8
    ema, view = ema_model(model, d, exclude=model.discriminator)
    gen = {n for n, _ in model.named_parameters() if not n.startswith("discriminator.")}
    history = [{n: p.detach().clone() for n, p in model.named_parameters()}]
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        history.append({n: p.detach().clone() for n, p in model.named_parameters()})
        ema.update_parameters(view)
    t = len(history) - 1
    state = ema_state_dict(ema, model)
    assert set(state) == set(model.state_dict())
    for n in gen:
        by_hand = d**t * history[0][n] + sum((1 - d) * d ** (t - k) * history[k][n] for k in range(1, t + 1))
        torch.testing.assert_close(state[n], by_hand, rtol=1e-5, atol=1e-5)
    for n, p in model.discriminator.named_parameters():
        assert torch.equal(state[f"discriminator.{n}"], p)
    # resume: a fresh EMA restored from the state continues exactly
    ema2, view2 = ema_model(model, d, exclude=model.discriminator)
    load_ema_state(ema2, state, n_updates=t)
    assert int(ema2.n_averaged) == int(ema.n_averaged)
    ema.update_parameters(view)
    ema2.update_parameters(view2)
    for a, b in zip(ema.module.parameters(), ema2.module.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow  # inductor compiles for a minute on a CPU
def test_compiled_vaegan_trains_past_the_critic_start(tiny_store, tmp_path):
    """train.compile with a critic: the adaptive weight's retained backward through the compiled decoder
    (AOTAutograd's donated buffers refused it at the first critic step)."""
    cfg = tiny_config("vaegan", max_steps=3, disc_start=1, compile=True, checkpoint_every=3)
    summary = train(tiny_store, tmp_path / "run", cfg, device="cpu")
    assert summary["step"] == 3 and summary["bad_steps"] == 0

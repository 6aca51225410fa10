"""Mixed precision: what ``amp: auto`` picks (the capability probe faked), the precision run.json records,
and bf16 training's validation ELBO / SSIM against float32's seed-to-seed interval."""

import json
import math
import statistics

import pytest
import torch

import medvae.training.runtime as runtime
from medvae.training.runtime import bf16_supported, precision_name, resolve_amp
from medvae.training.trainer import train
from tests.factories import tiny_config

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
T_975_2 = 4.302652729911275  # Student's t, 0.975 quantile, 2 degrees of freedom (3 seeds)


def test_cpu_probe_reads_amx_or_avx512_bf16(monkeypatch):
    for amx, avx in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda avx=avx: avx)
        assert bf16_supported(CPU) is (amx or avx)
    assert bf16_supported(MPS) is False


def test_auto_is_bf16_where_supported_else_fp32_on_cpu(monkeypatch):
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: False)
    assert resolve_amp("auto", CPU) is None and resolve_amp("auto", MPS) is None
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: True)
    assert resolve_amp("auto", CPU) is torch.bfloat16
    # explicit settings do not ask the probe
    assert resolve_amp("off", CPU) is None
    assert resolve_amp("bf16", CPU) is torch.bfloat16 and resolve_amp("fp16", CPU) is torch.float16


def test_auto_on_cuda_without_bf16_is_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_amp("auto", CUDA) is torch.float16  # the trainer adds a GradScaler for fp16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_amp("auto", CUDA) is torch.bfloat16
    assert [precision_name(d) for d in (torch.bfloat16, torch.float16, None)] == ["bf16", "fp16", "fp32"]


@pytest.mark.parametrize("supported, precision", [(False, "fp32"), (True, "bf16")])
def test_training_auto_follows_the_probe_and_run_json_says_so(tiny_store, tmp_path, monkeypatch, supported,
                                                              precision):
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: supported)
    run = tmp_path / "run"
    train(tiny_store, run, tiny_config("vae", max_steps=2, checkpoint_every=2), device="cpu")
    assert json.loads((run / "run.json").read_text())["precision"] == precision


def _final_val(store, run, amp: str, seed: int) -> dict:
    cfg = tiny_config("vae", max_steps=40, checkpoint_every=40, log_every=40, val_batches=2, amp=amp, seed=seed)
    train(store, run, cfg, device="cpu")
    return json.loads((run / "train_log.jsonl").read_text().splitlines()[-1])


@pytest.mark.skipif(not bf16_supported(CPU), reason="this CPU has no AMX / AVX-512 BF16: bf16 is emulated, ~10x "
                                                    "slower than float32 (~70 s a run on 2 cores), so auto never "
                                                    "picks it here")
def test_bf16_validation_within_fp32_seed_interval(tiny_store, tmp_path):
    """3 seeds each of a 40-step vae run: the bf16 runs' mean validation ELBO and SSIM lie in the fp32 runs'
    95% interval of the mean, mean ± t(0.975, 2)·sd/√3. The half-width has a floor (1% of |ELBO|, 0.01 SSIM)
    so that seeds agreeing closely on some machine do not make float rounding a failure."""
    runs = {amp: [_final_val(tiny_store, tmp_path / f"{amp}{s}", amp, s) for s in range(3)] for amp in ("off", "bf16")}
    for key, floor in (("val_elbo", 0.01), ("val_ssim", 0.01)):
        ref = [r[key] for r in runs["off"]]
        mean, sd = statistics.mean(ref), statistics.stdev(ref)
        half = max(T_975_2 * sd / math.sqrt(3), floor * (abs(mean) if key == "val_elbo" else 1.0))
        got = statistics.mean(r[key] for r in runs["bf16"])
        assert abs(got - mean) <= half, (key, ref, [r[key] for r in runs["bf16"]], half)

"""The supervised denoise task under the trainer's autocast: validation noise and metrics in float32."""

import json

from medvae.config import TrainStageConfig
from medvae.pipeline import train_stage


def test_ct_lowdose_validates_under_bf16_with_the_fp32_noise(hu_store, tmp_path):
    """The CT projector's sparse matmul has no bf16 kernel on the CPU: the validation noise is made outside
    the autocast, so a bf16 run validates, on the very noisy patches an fp32 run sees."""
    val = {}
    for amp in ("off", "bf16"):
        cfg = TrainStageConfig.model_validate({
            "task": "denoise", "noise": {"kind": "ct-lowdose", "crop": 32},
            "model": {"name": "dae", "channels": [8, 16], "norm_groups": 4, "likelihood": "l2"},
            "train": {"batch_size": 8, "max_steps": 2, "lr": 2e-3, "warmup_steps": 1, "checkpoint_every": 2,
                      "val_batches": 1, "amp": amp}})
        train_stage(hu_store, tmp_path / amp, cfg, device="cpu")
        lines = (tmp_path / amp / "train_log.jsonl").read_text().splitlines()
        val[amp] = [json.loads(line) for line in lines if "val_psnr" in line][-1]
    assert val["bf16"]["val_noisy_psnr"] == val["off"]["val_noisy_psnr"]
    assert abs(val["bf16"]["val_psnr"] - val["off"]["val_psnr"]) < 0.5

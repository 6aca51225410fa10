"""The supervised denoise task: validation noise and metrics in float32 under the trainer's autocast; the
training pair's symmetries and Noise2Noise target."""

import json

import numpy as np
import torch

from medvae.config import NoiseConfig, TrainStageConfig
from medvae.data.loader import Batch
from medvae.denoising.noise import step_generator
from medvae.denoising.supervised import DenoiseTask, random_symmetry
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


def test_random_symmetry_draws_each_of_the_squares_eight_symmetries_as_numpy_makes_them():
    """Reference: numpy's rot90 / transpose; the same symmetry for every tensor given, all 8 reached."""
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    a = x.numpy()
    group = [np.rot90(a, k, axes=(-2, -1)) for k in range(4)]
    group += [g.swapaxes(-2, -1) for g in group]
    seen = set()
    for step in range(64):
        y, z = random_symmetry(step_generator(0, step), x, x + 100)
        match = [i for i, g in enumerate(group) if np.array_equal(y.numpy(), g)]
        assert len(match) == 1 and np.array_equal(z.numpy(), group[match[0]] + 100)
        seen.add(match[0])
    assert seen == set(range(8))


def test_noise2noise_target_is_a_second_independent_copy_at_the_same_level(hu_store):
    """noise.target noisy: input and target noise are uncorrelated (|r| < 4 / sqrt(n)), each of the level's
    variance (Gaussian kind: sigma², the closed form), and the default target is the clean patch itself."""
    store = hu_store
    rows = np.arange(16)
    batch = Batch(torch.from_numpy(store.get(rows)), None, rows)
    pair = DenoiseTask(store, NoiseConfig(kind="gaussian", levels=(0.1, 0.1)), 0).training_pair(batch, 3)
    assert torch.equal(pair.target, batch.x)
    pair = DenoiseTask(store, NoiseConfig(kind="gaussian", levels=(0.1, 0.1), target="noisy"), 0).training_pair(
        batch, 3)
    e1, e2 = (pair.input - batch.x).flatten().double(), (pair.target - batch.x).flatten().double()
    n = e1.numel()
    assert abs(float(torch.corrcoef(torch.stack([e1, e2]))[0, 1])) < 4 / n ** 0.5
    for e in (e1, e2):
        assert abs(float(e.var()) / 0.01 - 1) < 4 * (2 / n) ** 0.5

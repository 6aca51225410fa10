"""Validation: the one scaffold every task uses (batches, eval mode, the task's reduction), and the
reconstruct task's metrics (one encoder pass per batch, values as computed from scratch)."""

import numpy as np
import pytest
import torch

from medvae.config import parse_model_config
from medvae.metrics import images
from medvae.metrics.elbo import elbo
from medvae.models import build_model
from medvae.training.runtime import autocast
from medvae.training.validate import over_batches, validate
from tests.factories import TINY_VAL, disc_store


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_validation_encodes_each_batch_once_and_matches_the_metrics_by_hand(tiny_store, amp):
    """Also under the trainer's bf16 autocast: the model runs in bf16, the ELBO and the distances
    (SSIM's window matmuls, PSNR, MSE) are float32 arithmetic on its float32-cast outputs."""
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(parse_model_config(dict(image_size=64, channels=(8, 16, 32), latent_dim=16))).eval()
    calls = []
    encode = model.encode
    model.encode = lambda x: calls.append(len(x)) or encode(x)
    with autocast(cpu, amp):
        got = validate(model, tiny_store, batch_size=6, max_batches=3, device=cpu, seed=3)
    assert calls == [6, 6, 4]  # 16 val patches in batches of 6: one encoder pass each

    # by hand: the ELBO with its own encoder pass, the reconstruction decode(mu), same generator draws;
    # the model under the autocast, the distances after it
    model.encode = encode
    gen = torch.Generator().manual_seed(3)
    per: dict[str, list] = {k: [] for k in ("elbo", "nll", "kl", "ssim", "psnr", "mse")}
    rows = tiny_store.select("val")
    for start in range(0, TINY_VAL, 6):
        x = torch.from_numpy(tiny_store.get(rows[start:start + 6]))
        with torch.no_grad(), autocast(cpu, amp):
            e, terms = elbo(model, x, generator=gen, return_terms=True)
            recon = model.decode(model.encode(x)[0]).float().clamp(0, 1)
        for k, v in (("elbo", e), ("nll", terms["nll"]), ("kl", terms["kl"]), ("ssim", images.ssim(recon, x)),
                     ("psnr", images.psnr(recon, x)), ("mse", images.mse(recon, x))):
            assert v.dtype == torch.float32, k
            per[k].append(v)
    want = {k: float(torch.cat(v).double().mean()) for k, v in per.items()}
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5), k
    assert np.isfinite(list(got.values())).all()


def test_the_scaffold_hands_each_batch_its_index_and_rows_in_eval_mode_and_restores_the_mode(tiny_store):
    model = torch.nn.Linear(1, 1).train()
    seen = []

    def batch_metrics(i, rows):
        assert not model.training and not torch.is_grad_enabled()
        seen.append((i, rows.tolist()))
        return {"row": torch.from_numpy(rows).float()}

    got = over_batches(model, tiny_store, batch_size=6, max_batches=3, batch_metrics=batch_metrics)
    val = tiny_store.select("val")
    assert seen == [(0, val[:6].tolist()), (1, val[6:12].tolist()), (2, val[12:].tolist())]
    assert got == {"row": float(val.mean())} and model.training


def test_each_batch_is_summed_in_the_tasks_dtype(tiny_store):
    """2^24 + 1 is 2^24 in float32: the reconstruct task's float32 batch sums and the denoisers' float64
    ones give different means, and each task keeps its own (best.pt must not change)."""
    def batch_metrics(i, rows):
        return {"v": torch.tensor([2.0**24, 1.0] + [0.0] * (len(rows) - 2))}

    model = torch.nn.Linear(1, 1)
    f32 = over_batches(model, tiny_store, 8, 2, batch_metrics)["v"]
    f64 = over_batches(model, tiny_store, 8, 2, batch_metrics, sum_dtype=torch.float64)["v"]
    assert (f32, f64) == (2 * 2.0**24 / 16, 2 * (2.0**24 + 1) / 16)


def test_a_store_without_val_split_gives_no_metrics(tmp_path):
    store = disc_store(tmp_path / "s", {"train": 4})
    assert over_batches(torch.nn.Linear(1, 1), store, 2, 2, lambda i, rows: pytest.fail("no batch")) == {}

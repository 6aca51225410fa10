"""Validation of the reconstruct task: one encoder pass per batch, values as computed from scratch."""

import numpy as np
import pytest
import torch

from medvae.config import parse_model_config
from medvae.metrics import images
from medvae.metrics.elbo import elbo
from medvae.models import build_model
from medvae.training.validate import validate
from tests.factories import TINY_VAL


def test_validation_encodes_each_batch_once_and_matches_the_metrics_by_hand(tiny_store):
    torch.manual_seed(0)
    model = build_model(parse_model_config(dict(image_size=64, channels=(8, 16, 32), latent_dim=16))).eval()
    calls = []
    encode = model.encode
    model.encode = lambda x: calls.append(len(x)) or encode(x)
    got = validate(model, tiny_store, batch_size=6, max_batches=3, device=torch.device("cpu"), seed=3)
    assert calls == [6, 6, 4]  # 16 val patches in batches of 6: one encoder pass each

    # by hand: the ELBO with its own encoder pass, the reconstruction decode(mu), same generator draws
    model.encode = encode
    gen = torch.Generator().manual_seed(3)
    per: dict[str, list] = {k: [] for k in ("elbo", "nll", "kl", "ssim", "psnr", "mse")}
    rows = tiny_store.select("val")
    with torch.no_grad():
        for start in range(0, TINY_VAL, 6):
            x = torch.from_numpy(tiny_store.get(rows[start:start + 6]))
            e, terms = elbo(model, x, generator=gen, return_terms=True)
            recon = model.decode(model.encode(x)[0]).clamp(0, 1)
            for k, v in (("elbo", e), ("nll", terms["nll"]), ("kl", terms["kl"]), ("ssim", images.ssim(recon, x)),
                         ("psnr", images.psnr(recon, x)), ("mse", images.mse(recon, x))):
                per[k].append(v)
    want = {k: float(torch.cat(v).double().mean()) for k, v in per.items()}
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5), k
    assert np.isfinite(list(got.values())).all()

"""The latent (M1) and m2 arms and synthesis m2: the latent network at init, no label outside the budget
reaching them, and a tiny study that runs and resumes without retraining M2."""

import json

import numpy as np
import pytest
import torch

import medvae.downstream.m2 as m2
import medvae.downstream.study as study
from medvae.config import UtilityConfig, VAEConfig
from medvae.data.store import open_store
from medvae.downstream.latent import LatentNet
from medvae.downstream.study import run_utility
from medvae.downstream.subsets import SOURCE_ROW, subset_rows
from medvae.files import sha256_json
from medvae.models.vae import ConvVAE
from tests.factories import FAST_STUDY as FAST
from tests.factories import relabelled_store

TINY_M2 = {"steps": 3, "unlabelled_batch": 4, "latent_dim": 4, "channels": [4, 8], "per_image": 2,
           "prior_ratio": 1.0}
ARMS = ["real", "latent", "m2", "real+synthetic"]


def test_the_latent_network_is_a_linear_head_on_the_posterior_means():
    torch.manual_seed(0)
    vae = ConvVAE(VAEConfig(image_size=32, channels=(4, 8), latent_dim=5, condition="none")).eval()
    net = LatentNet(vae, 3)
    x = torch.rand(6, 1, 32, 32)
    with torch.no_grad():
        h = vae.encoder(x).flatten(1)
        mu = h @ vae.to_stats.weight[:5].T + vae.to_stats.bias[:5]  # the first half of the stats: the means
        want = mu @ net.head.weight.T + net.head.bias
        torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-5)


def _cfg(**kw):
    return UtilityConfig(labels_per_class=[3], synthesis="m2", arms=ARMS, m2=TINY_M2, **{**FAST, **kw})


def test_no_label_outside_the_budget_reaches_the_latent_and_m2_arms(class_store, tmp_path, monkeypatch):
    """Two stores that differ only in the labels of train images outside the budget: the same M2 model, the
    same synthetic set and the same scores of every arm."""
    rows = subset_rows(class_store, "classify", None, seed=0, per_class=3)
    other = relabelled_store(class_store, tmp_path / "relabelled", rows)
    monkeypatch.setattr(study, "subset_rows", lambda *a, **k: rows)
    a = run_utility(class_store, tmp_path / "a", _cfg(), device="cpu")
    b = run_utility(other, tmp_path / "b", _cfg(), device="cpu")
    assert a["arms"] == b["arms"] and set(ARMS) <= set(a["arms"])
    wa, wb = (torch.load(tmp_path / d / "cells/3pc_s0/m2/model.pt", weights_only=True) for d in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    syn_a, syn_b = (open_store(tmp_path / d / "cells/3pc_s0/synthetic_store") for d in "ab")
    assert np.array_equal(syn_a.get(slice(None)), syn_b.get(slice(None)))
    assert syn_a.index["class"].tolist() == syn_b.index["class"].tolist()


def test_a_study_with_latent_and_m2_runs_and_resumes(class_store, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = run_utility(class_store, out, _cfg(), device="cpu")
    cell = out / "cells/3pc_s0"
    for arm in ("latent", "m2"):
        r = json.loads((cell / f"{arm}.json").read_text())
        assert r["steps"] == 4 and r["n_real"] == 9 and 0 <= r["metrics"]["accuracy"] <= 1
    syn, real = open_store(cell / "synthetic_store"), open_store(cell / "real_store")
    info = syn.meta["synthetic"]
    # per_image posterior variants of each labelled image + prior samples, each labelled by construction
    assert info["candidates"] == 2 * 9 + 9 and info["checkpoint"].endswith("m2/model.pt")
    anchors = dict(zip(real.index[SOURCE_ROW].astype(int).tolist(), real.index["class"].tolist()))
    for r, c in zip(syn.index[SOURCE_ROW].astype(int).tolist(), syn.index["class"].tolist()):
        assert r == -1 or anchors[r] == c  # a variant keeps its anchor's class
    # resumed: the m2 arm and the synthetic set are rebuilt from the cell's model file, not retrained
    (cell / "m2.json").unlink()
    monkeypatch.setattr(m2, "train_m2", lambda *a, **k: pytest.fail("M2 retrained"))
    again = run_utility(class_store, out, _cfg(), device="cpu")
    assert again["arms"] == first["arms"]


def test_the_new_settings_enter_the_hash_only_once_changed():
    base = UtilityConfig().stable_dump(exclude={"seeds"})
    assert "m2" not in base and "latent_encoder_lr" not in base
    changed = UtilityConfig(m2={"alpha": 1.0}, latent_encoder_lr=1e-4).stable_dump(exclude={"seeds"})
    assert changed["m2"]["alpha"] == 1.0 and changed["latent_encoder_lr"] == 1e-4
    assert sha256_json(base) != sha256_json(changed)

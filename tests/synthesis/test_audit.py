"""Memorization audit: blocked nearest neighbours against brute force, calibration by patient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medvae.synthesis import audit


def _brute(q, r, qg=None, rg=None):
    d = np.sqrt(((q[:, None, :].astype(np.float64) - r[None, :, :]) ** 2).sum(-1))
    if qg is not None:
        d[qg[:, None] == rg[None, :]] = np.inf
    return d.min(1), d.argmin(1)


@pytest.mark.parametrize("qb,rb", [(7, 5), (2048, 8192)])
def test_nearest_matches_brute_force(qb, rb):
    rng = np.random.default_rng(0)
    q, r = rng.random((23, 10)).astype(np.float32), rng.random((41, 10)).astype(np.float32)
    d, i = audit.nearest(torch.from_numpy(q), torch.from_numpy(r), query_block=qb, ref_block=rb)
    bd, bi = _brute(q, r)
    np.testing.assert_allclose(d.numpy(), bd, rtol=1e-5)
    np.testing.assert_array_equal(i.numpy(), bi)


def test_nearest_excludes_own_group_and_copies_measure_zero():
    rng = np.random.default_rng(1)
    r = rng.random((30, 6)).astype(np.float32) * 100  # large values: cdist's matmul form loses precision
    rg = np.repeat(np.arange(5), 6)
    q, qg = r[::4], rg[::4]
    d, i = audit.nearest(torch.from_numpy(q), torch.from_numpy(r), torch.from_numpy(qg), torch.from_numpy(rg),
                         query_block=3, ref_block=7)
    bd, bi = _brute(q, r, qg, rg)
    np.testing.assert_allclose(d.numpy(), bd, rtol=1e-5)
    np.testing.assert_array_equal(i.numpy(), bi)
    d0, _ = audit.nearest(torch.from_numpy(q), torch.from_numpy(r))
    assert np.all(d0.numpy() == 0)  # exact copies: exactly 0, not ~1e-3 round-off


def test_group_with_no_other_member_gives_inf():
    r = torch.rand(4, 3)
    d, i = audit.nearest(r[:2], r, torch.zeros(2, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    assert torch.isinf(d).all() and (i == -1).all()


def test_thresholds_are_percentiles_of_between_patient_distances():
    rng = np.random.default_rng(2)
    feats = rng.random((40, 5)).astype(np.float32)
    patient = np.repeat(np.array(["a", "b", "c", "d"]), 10)
    ref = audit.TrainReference(feats={s: torch.from_numpy(feats) for s in audit.SPACES}, patient=patient,
                               modality=np.array(["ct"] * 40), rows=np.arange(40), percentile=10.0)
    audit._calibrate(ref, max_calibration=1000, seed=0)
    expected, _ = _brute(feats, feats, patient, patient)
    assert ref.thresholds["ct"]["pixel"] == pytest.approx(np.percentile(expected, 10.0), rel=1e-5)
    res = audit.audit_batch(ref, {s: torch.from_numpy(feats[:3] + 1e-6) for s in audit.SPACES})
    assert res["flagged"].all() and list(res["patient"]) == ["a"] * 3


def test_summarize_reports_counts_medians_and_thresholds():
    rng = np.random.default_rng(3)
    feats = rng.random((20, 4)).astype(np.float32)
    ref = audit.TrainReference(feats={s: torch.from_numpy(feats) for s in audit.SPACES},
                               patient=np.repeat(np.array(["a", "b"]), 10), modality=np.array(["ct"] * 20),
                               rows=np.arange(20), percentile=5.0)
    audit._calibrate(ref, max_calibration=1000, seed=0)
    sample_nn = {"pixel": np.array([0.5, 0.1, 0.3]), "feature": np.array([2.0, 4.0, 1.0])}
    out = audit.summarize(ref, sample_nn, flagged=2, dropped=True, figure="audit.png")
    assert out["summary"].startswith("memorization audit: 2/3 samples") and "not written" in out["summary"]
    assert out["sample_nn_median"] == {"pixel": 0.3, "feature": 2.0}
    assert out["real_nn_median"]["pixel"] == pytest.approx(float(np.median(ref.real_nn["pixel"])))
    assert out["calibration_pairs"] == 20 and out["train_patches"] == 20 and out["figure"] == "audit.png"
    assert out["thresholds"]["ct"]["pixel"] == pytest.approx(np.percentile(ref.real_nn["pixel"], 5.0))
    empty = audit.summarize(ref, {s: np.zeros(0) for s in audit.SPACES}, flagged=0, dropped=False)
    assert empty["sample_nn_median"] == {"pixel": None, "feature": None} and "0/0" in empty["summary"]

"""Memorization audit: blocked nearest neighbours against brute force, calibration by patient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medvae import audit


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

"""FID, KID, precision/recall and density/coverage against closed forms and hand-counted toy sets."""

import numpy as np
import pytest

from medvae.metrics import samples as S


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = np.sum((m1 - m2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert S.frechet_distance(m1, np.diag(s1), m2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    assert S.frechet_distance(m1, np.diag(s1), m1, np.diag(s1)) == pytest.approx(0, abs=1e-9)


def test_fid_of_samples_converges_to_the_gaussians_distance():
    rng = np.random.default_rng(1)
    cov = np.array([[1.0, 0.5], [0.5, 2.0]])
    a = rng.multivariate_normal([0, 0], cov, 200_000)
    b = rng.multivariate_normal([1, -1], 0.5 * cov, 200_000)
    expected = S.frechet_distance(np.zeros(2), cov, np.array([1.0, -1.0]), 0.5 * cov)
    # closed form for C2 = c C1: tr(C1)(1 + c - 2 sqrt(c))
    assert expected == pytest.approx(2 + 3.0 * (1 + 0.5 - 2 * np.sqrt(0.5)), rel=1e-9)
    assert S.fid(a, b) == pytest.approx(expected, rel=0.02)


def test_kid_unbiased_estimator_equals_the_direct_double_sum():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(25, 4)), rng.normal(0.3, 1, size=(25, 4))

    def k(a, b):
        return (a @ b / 4 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(25) for j in range(25) if i != j) / (25 * 24)
    yy = sum(k(y[i], y[j]) for i in range(25) for j in range(25) if i != j) / (25 * 24)
    xy = sum(k(x[i], y[j]) for i in range(25) for j in range(25)) / (25 * 25)
    assert S.kid_mmd2(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    mean, sd = S.kid(x, y, subsets=1, subset_size=100)  # one subset of all points (permuted): the same value
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10) and sd == 0.0
    same = rng.normal(size=(400, 4))
    assert abs(S.kid(same[:200], same[200:], subsets=20, subset_size=100)[0]) < 0.05  # unbiased: ~0


def test_precision_recall_density_coverage_on_a_hand_counted_line():
    real = np.arange(10, dtype=float)[:, None]  # 0..9: every 1-NN radius is 1
    fake = np.array([[0.5], [20.0]])  # 1-NN radius of each fake point: 19.5
    assert S.precision_recall(real, fake, k=1) == (0.5, 1.0)  # 0.5 lies in a real ball, 20 does not
    # 0.5 lies in the balls of real 0 and 1 (2 balls), 20 in none: density 2 / (1 * 2); coverage 2 / 10
    assert S.density_coverage(real, fake, k=1) == (1.0, 0.2)


def test_far_apart_sets_score_zero_and_identical_sets_score_one():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(300, 8))
    far = real + 100.0
    assert S.precision_recall(real, far) == (0.0, 0.0)
    assert S.density_coverage(real, far) == (0.0, 0.0)
    p, r = S.precision_recall(real, real)
    d, c = S.density_coverage(real, real)
    assert (p, r, c) == (1.0, 1.0, 1.0) and d >= 1.0
    m = S.sample_metrics(real, rng.normal(size=(300, 8)))
    assert set(m) == {"fid", "kid", "kid_sd", "precision", "recall", "density", "coverage"}
    assert m["fid"] < 1.0 and 0.6 < m["precision"] <= 1 and 0.6 < m["recall"] <= 1

"""medvae.metrics.distances against independent references: the plain O(n²) MMD² formula, brute-force
permutations, scipy's Wasserstein distance."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from medvae.metrics import distances as M


# --------------------------------------------------------------------------- MMD
def _plain_mmd2(X, Y, hs):
    """Unbiased MMD², written out with explicit loops over i != j (small n only)."""
    X, Y = X.astype(np.float64), Y.astype(np.float64)

    def k(a, b):
        d2 = ((a - b) ** 2).sum()
        return sum(math.exp(-d2 / (2 * h * h)) for h in hs)

    n, m = len(X), len(Y)
    kxx = sum(k(X[i], X[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(Y[i], Y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(X[i], Y[j]) for i in range(n) for j in range(m)) / (n * m)
    return kxx + kyy - 2 * kxy


def test_mmd2_against_plain_formula():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(30, 5)), rng.normal(0.5, 1.2, size=(25, 5))
    hs = [0.7, 2.0]
    assert M.mmd2(X, Y, bandwidths=hs) == pytest.approx(_plain_mmd2(X, Y, hs), abs=1e-5)
    med = M.median_bandwidth(torch.tensor(np.concatenate([X, Y])))
    assert M.mmd2(X, Y) == pytest.approx(_plain_mmd2(X, Y, [0.5 * med, med, 2 * med]), abs=1e-5)


def test_mmd2_blockwise_equals_whole_and_behaves():
    rng = np.random.default_rng(1)
    X, Y, Z = rng.normal(size=(300, 8)), rng.normal(size=(280, 8)), rng.normal(0.5, 1, size=(280, 8))
    whole = M.mmd2(X, Y, block=100_000)
    assert M.mmd2(X, Y, block=37) == pytest.approx(whole, abs=1e-6)
    assert abs(whole) < 0.01  # same distribution: ~0, may be negative
    assert M.mmd2(X, Z) > 10 * max(abs(whole), 1e-3)


def test_mmd_test_pvalues_and_permutation_algebra():
    rng = np.random.default_rng(2)
    X, Y, Z = rng.normal(size=(120, 6)), rng.normal(size=(100, 6)), rng.normal(0.6, 1, size=(100, 6))
    stat, p_same = M.mmd_test(X, Y, permutations=100, seed=0)
    _, p_shift = M.mmd_test(X, Z, permutations=100, seed=0)
    assert stat == pytest.approx(M.mmd2(X, Y), abs=1e-9)
    assert p_shift <= 0.02 and p_same > 0.1
    # The matrix-product null equals re-computing MMD² on each permuted split (same permutations).
    bw = M._bandwidths(torch.tensor(np.concatenate([X, Z]), dtype=torch.float32), None)
    g = torch.Generator().manual_seed(0)
    pooled = np.concatenate([X, Z])
    observed = M.mmd2(X, Z, bw)
    null = []
    for _ in range(100):
        a = np.zeros(len(pooled), bool)
        a[torch.randperm(len(pooled), generator=g)[: len(X)].numpy()] = True
        null.append(M.mmd2(pooled[a], pooled[~a], bw))
    assert p_shift == pytest.approx((1 + sum(v >= observed - 1e-12 for v in null)) / 101)


def test_mmd_test_subsamples_large_inputs():
    rng = np.random.default_rng(3)
    X, Y = rng.normal(size=(600, 4)), rng.normal(1.0, 1, size=(500, 4))
    stat, p = M.mmd_test(X, Y, permutations=50, max_points=200)
    assert stat == pytest.approx(M.mmd2(X, Y), abs=1e-9) and p <= 0.05


# --------------------------------------------------------------------------- features, intensities
def test_pixel_and_random_conv_features():
    x = torch.rand(6, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    f = M.pixel_features(x, size=32)
    assert f.shape == (6, 1024)
    torch.testing.assert_close(f[:, 0], x[:, 0, :4, :4].mean((-1, -2)))
    a, b = M.random_conv_features(x), M.random_conv_features(x.clone())
    assert a.shape == (6, 512) and torch.equal(a, b)
    M._random_net.cache_clear()
    torch.testing.assert_close(M.random_conv_features(x), a)  # rebuilt from the seed alone
    assert not torch.allclose(M.random_conv_features(x, seed=1), a)
    assert M.random_conv_features(torch.rand(2, 3, 64, 64), dim=64).shape == (2, 64)


def test_intensity_wasserstein_closed_forms():
    rng = np.random.default_rng(4)
    a = rng.normal(40, 30, 5000)
    # A shift by c moves all mass by c: W1 = |c| exactly.
    assert M.intensity_wasserstein(a, a + 25.0) == pytest.approx(25.0, rel=1e-12)
    assert M.intensity_wasserstein(a, a) == 0
    # Two point masses: W1 = |x - y|; uniform on [0, 1] vs [0, 2]: W1 = integral |u - 2u| du = 1/2.
    assert M.intensity_wasserstein([3.0], [-1.5]) == pytest.approx(4.5)
    u = (np.arange(100_000) + 0.5) / 100_000
    assert M.intensity_wasserstein(u, 2 * u) == pytest.approx(0.5, rel=1e-6)
    # Subsampling (seeded) keeps the estimate close to the full-sample value.
    b = rng.normal(60, 50, 3777)
    assert M.intensity_wasserstein(a, b, max_samples=2000) == pytest.approx(wasserstein_distance(a, b), rel=0.1)

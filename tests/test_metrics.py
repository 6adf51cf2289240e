"""fastddpm.metrics against closed forms and independent computations."""
import numpy as np
import pytest
import torch

from fastddpm import metrics as M


def _random_cov(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    v1, v2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert M.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_on_well_conditioned():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    s1, s2 = _random_cov(rng, 8) + np.eye(8), _random_cov(rng, 8) + np.eye(8)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_near_singular_is_real_and_zero_for_identical():
    rng = np.random.default_rng(2)
    s = _random_cov(rng, 64, rank=5)  # rank 5 of 64: singular
    mu = rng.standard_normal(64)
    d0 = M.frechet_distance(mu, s, mu, s)
    assert np.isfinite(d0) and abs(d0) < 1e-8 * np.trace(s)
    # a shift of the mean alone adds exactly |delta|^2
    delta = np.zeros(64)
    delta[3] = 0.5
    # sqrt of the ~1e-16 round-off eigenvalues of a singular matrix contributes ~1e-8 each: state that
    assert M.frechet_distance(mu, s, mu + delta, s) == pytest.approx(0.25, abs=1e-6 * np.trace(s))


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="sigma1"):
        M.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="mu1"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(3))


def test_streaming_stats_match_numpy_and_roundtrip(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1000, 6)) * 3 + 10
    stats = M.FeatureStats()
    for chunk in np.array_split(x, 7):
        stats.update(torch.as_tensor(chunk, dtype=torch.float32) if len(chunk) % 2 else chunk)
    xf = np.concatenate([c.astype(np.float32).astype(np.float64) if len(c) % 2 else c for c in np.array_split(x, 7)])
    np.testing.assert_allclose(stats.mu, xf.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(xf, rowvar=False), rtol=1e-10)
    path = tmp_path / "ref.npz"
    stats.save(str(path))
    mu, sigma = M.load_stats(str(path))
    np.testing.assert_array_equal(mu, stats.mu)
    with pytest.raises(ValueError, match="columns"):
        stats.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="cannot read"):
        M.load_stats(str(tmp_path / "missing.npz"))


def _mmd2_unbiased_loops(x, y):
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3
    m = len(x)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return sxx / (m * (m - 1)) + syy / (m * (m - 1)) - 2 * sxy / m**2


def test_kid_single_full_subset_equals_explicit_mmd():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((20, 4)), rng.standard_normal((20, 4)) + 0.3
    mean, std = M.kernel_inception_distance(x, y, num_subsets=1, subset_size=20)
    assert mean == pytest.approx(_mmd2_unbiased_loops(x, y), rel=1e-10)
    assert std == 0.0


def test_kid_same_distribution_near_zero_shifted_positive():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((400, 8)), rng.standard_normal((400, 8))
    same, same_std = M.kernel_inception_distance(x, y, num_subsets=20, subset_size=200)
    shifted, _ = M.kernel_inception_distance(x, y + 1.0, num_subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 10 * abs(same) and shifted > 0.05


def test_inception_score_closed_forms():
    k = 10
    one_hot = np.eye(k)[np.arange(1000) % k]
    mean, std = M.inception_score(one_hot, splits=10)
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    uniform = np.full((100, k), 1.0 / k)
    assert M.inception_score(uniform, splits=1)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="probs"):
        M.inception_score(np.ones((10, 3)))


def test_precision_recall_identical_and_disjoint():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((200, 3))
    assert M.precision_recall(x, x, k=3) == (1.0, 1.0)
    p, r = M.precision_recall(x, x + 100.0, k=3)
    assert p == 0.0 and r == 0.0

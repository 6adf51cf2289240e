"""Sample-quality metrics: Frechet distance (FID), KID, Inception Score, precision/recall.

All of them work on features from a pluggable extractor (any callable images -> [N, D] features, or
[N, K] class logits for IS). The math is float64 NumPy; features are accumulated in streaming
statistics so 50k samples never sit in memory at once.

- Frechet distance between N(mu1, S1) and N(mu2, S2):
      d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1^{1/2} S2 S1^{1/2})^{1/2})
  The last trace is computed from the eigenvalues of the symmetric PSD matrix S1^{1/2} S2 S1^{1/2}
  (negative round-off clipped to 0), so it stays real and stable for near-singular covariances,
  where scipy.linalg.sqrtm of the non-symmetric S1 S2 can return complex or NaN values.
- KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, averaged over
  random subsets, reported with its standard deviation over the subsets.
- Inception Score: exp(E_x KL(p(y|x) || p(y))), mean and standard deviation over `splits` splits.
- Precision/recall (Kynkaenniemi et al. 2019): k-NN manifold estimates in feature space.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np
import torch


# ----------------------------------------------------------------------------- streaming statistics
@dataclass
class FeatureStats:
    """Running mean and covariance of feature vectors (float64, Chan et al.'s pairwise merge).

    `update(features)` takes a batch [B, D]; `mu`, `sigma` give the mean and the unbiased covariance.
    Optionally keeps up to `max_keep` raw features (for KID and precision/recall).
    """

    dim: Optional[int] = None
    max_keep: int = 0
    count: int = 0
    mean: Optional[np.ndarray] = None
    m2: Optional[np.ndarray] = None  # sum of outer products of deviations from the mean
    kept: list = field(default_factory=list)

    def update(self, features) -> "FeatureStats":
        f = _as_2d_float64(features, "features")
        if self.dim is None:
            self.dim = f.shape[1]
            self.mean = np.zeros(self.dim)
            self.m2 = np.zeros((self.dim, self.dim))
        if f.shape[1] != self.dim:
            raise ValueError(f"features must have {self.dim} columns, got {f.shape[1]}")
        n_b = f.shape[0]
        if n_b == 0:
            return self
        mean_b = f.mean(axis=0)
        dev = f - mean_b
        m2_b = dev.T @ dev
        n = self.count + n_b
        delta = mean_b - self.mean
        self.m2 = self.m2 + m2_b + np.outer(delta, delta) * (self.count * n_b / n)
        self.mean = self.mean + delta * (n_b / n)
        self.count = n
        if self.max_keep > 0:
            have = sum(len(k) for k in self.kept)
            if have < self.max_keep:
                self.kept.append(f[: self.max_keep - have].copy())
        return self

    @property
    def mu(self) -> np.ndarray:
        self._check_count(1)
        return self.mean.copy()

    @property
    def sigma(self) -> np.ndarray:
        self._check_count(2)
        return self.m2 / (self.count - 1)

    @property
    def features(self) -> np.ndarray:
        if not self.kept:
            raise ValueError("no raw features kept: create FeatureStats(max_keep=...) to keep them")
        return np.concatenate(self.kept)

    def save(self, path: str, extra: Optional[dict] = None) -> None:
        """Write mu, sigma and count to an .npz atomically (temp file, fsync, rename).

        `extra`: more arrays to store beside them (name -> array-like; e.g. kept features for KID);
        the names mu, sigma and count are reserved. `load_stats` ignores them.
        """
        extra = dict(extra or {})
        clash = {"mu", "sigma", "count"} & set(extra)
        if clash:
            raise ValueError(f"extra must not use the reserved names {sorted(clash)}")
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, mu=self.mu, sigma=self.sigma, count=np.int64(self.count),
                         **{k: np.asarray(v) for k, v in extra.items()})
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _check_count(self, need: int) -> None:
        if self.count < need:
            raise ValueError(f"need at least {need} feature vectors, have {self.count}")


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an .npz written by FeatureStats.save (or any .npz with 'mu' and 'sigma')."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"cannot read reference statistics from {path!r}: {exc}") from exc


# ----------------------------------------------------------------------------- FID
def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (what FID reports)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must have the same shape, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"sigma1 and sigma2 must be {d}x{d}, got {s1.shape} and {s2.shape}")
    r1 = _sqrtm_psd(s1)
    inner = r1 @ s2 @ r1
    w = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = np.sqrt(np.clip(w, 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean, 0.0))


# ----------------------------------------------------------------------------- KID
def kernel_inception_distance(features1, features2, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """Unbiased polynomial-kernel MMD^2 averaged over random subsets: (mean, std over subsets)."""
    x, y = _as_2d_float64(features1, "features1"), _as_2d_float64(features2, "features2")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"features1 and features2 must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    rng = np.random.default_rng(seed)
    d = x.shape[1]
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        a = x[rng.choice(len(x), m, replace=False)]
        b = y[rng.choice(len(y), m, replace=False)]
        kxx = (a @ a.T / d + 1) ** 3
        kyy = (b @ b.T / d + 1) ** 3
        kxy = (a @ b.T / d + 1) ** 3
        values[i] = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
    return float(values.mean()), float(values.std(ddof=1) if num_subsets > 1 else 0.0)


# ----------------------------------------------------------------------------- IS
def inception_score(probs, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split: (mean, std). `probs` are class probabilities [N, K]."""
    p = _as_2d_float64(probs, "probs")
    if (p < -1e-6).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("probs must be rows of class probabilities (non-negative, summing to 1)")
    if splits < 1 or splits > len(p):
        raise ValueError(f"splits must be in [1, {len(p)}], got {splits}")
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(axis=0, keepdims=True)
        kl = np.where(part > 0, part * (np.log(np.clip(part, 1e-300, None)) - np.log(np.clip(py, 1e-300, None))), 0.0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------- precision / recall
def precision_recall(real_features, fake_features, k: int = 3) -> tuple[float, float]:
    """Kynkaenniemi et al.'s improved precision and recall with k-NN radii in feature space."""
    real = torch.as_tensor(_as_2d_float64(real_features, "real_features"))
    fake = torch.as_tensor(_as_2d_float64(fake_features, "fake_features"))
    if k < 1 or k >= min(len(real), len(fake)):
        raise ValueError(f"k must be in [1, {min(len(real), len(fake)) - 1}], got {k}")

    def radii(f):
        d = torch.cdist(f, f)
        return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0

    def coverage(ref, ref_radii, query):
        return (torch.cdist(query, ref) <= ref_radii[None, :]).any(dim=1).double().mean().item()

    return coverage(real, radii(real), fake), coverage(fake, radii(fake), real)


# ----------------------------------------------------------------------------- drivers
def collect_stats(batches: Iterable[torch.Tensor], extractor: Callable[[torch.Tensor], torch.Tensor],
                  max_keep: int = 0, progress: bool = False, total: Optional[int] = None) -> FeatureStats:
    """Stream image batches through `extractor` into FeatureStats (nothing but the stats is kept)."""
    from tqdm.auto import tqdm

    stats = FeatureStats(max_keep=max_keep)
    for images in tqdm(batches, disable=not progress, total=total, desc="features"):
        with torch.no_grad():
            stats.update(extractor(images))
    return stats


def _as_2d_float64(a, name: str) -> np.ndarray:
    if torch.is_tensor(a):
        a = a.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D], got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains non-finite values")
    return a

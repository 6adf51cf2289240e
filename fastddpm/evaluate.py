"""Evaluation drivers: streamed FID / KID / IS / precision-recall of samples, and bits/dim over a dataset.

    from fastddpm.evaluate import reference_stats, evaluate_samples, sample_batches, nll_over_dataset
    from fastddpm.features import get_extractor

    ext = get_extractor("digits")                                  # or "inception" (the FID InceptionV3)
    ref = reference_stats("digits", ext, part="heldout", cache="digits_ref.npz")
    batches = sample_batches(model, sampler, num=10_000, batch_size=250, shape=(1, 8, 8), seed=0)
    res = evaluate_samples(batches, ext, ref, metrics=("fid", "kid", "is", "pr"), num=10_000)
    res["fid"], res["kid_mean"], res["is_mean"], res["confidence_rate"], res["class_fractions"]

    nll = nll_over_dataset(diffusion, model, "digits", batch_size=128, part="heldout")
    nll["bpd"], nll["stderr"]

Streaming: generated images are consumed one batch at a time; only the running mean/covariance
(:class:`fastddpm.metrics.FeatureStats`), at most ``max_keep`` raw feature vectors (for KID and
precision/recall, which need samples; with more images than ``max_keep`` they use the first
``max_keep``), and for IS per-split sums of p(y|x) and of sum_y p log p are kept (when ``num`` is
given; without it the class probabilities are kept, float32, and split at the end as
:func:`fastddpm.metrics.inception_score` does). So 50k samples never sit in memory at once.

Reference statistics cache: an .npz written by :meth:`FeatureStats.save` with mu, sigma, count and
beside them the kept reference features (for KID / precision-recall), the extractor's name (a cache
made with another extractor is refused), and for classifiers the reference confidence rate and class
counts. :func:`fastddpm.metrics.load_stats` reads the (mu, sigma) of such a file too.

Bits/dim: :func:`nll_over_dataset` runs :meth:`GaussianDiffusion.nll_bpd` (the full bound: prior + T
terms, one noise draw per timestep) over the images in batches, with one seeded generator threaded
through the batches, and reports the mean over images and its standard error std(ddof=1)/sqrt(n).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .metrics import (FeatureStats, frechet_distance, inception_score, kernel_inception_distance,
                      precision_recall)

__all__ = [
    "METRICS",
    "ReferenceStats",
    "load_images",
    "reference_stats",
    "reference_from",
    "stats_cache_path",
    "is_stats_file",
    "fid",
    "evaluate_samples",
    "sample_batches",
    "nll_over_dataset",
]

METRICS = ("fid", "kid", "is", "pr")
DATA_PARTS = ("all", "train", "heldout")
_MAX_CLASSES_REPORTED = 100  # per-class counts are reported for classifiers with at most this many classes


# ----------------------------------------------------------------------------- helpers
def _extract(extractor: Any, images: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(features [N, D], probs [N, K] or None) from one batch, under no_grad."""
    with torch.no_grad():
        if hasattr(extractor, "features_and_probs"):
            f, p = extractor.features_and_probs(images)
        else:
            f, p = extractor(images), None
            if getattr(extractor, "num_classes", None) and hasattr(extractor, "probs"):
                p = extractor.probs(images)
    if not torch.is_tensor(f) or f.ndim != 2 or f.shape[0] != images.shape[0]:
        raise ValueError(f"the extractor must return features [N, D] for N images, got "
                         f"{tuple(getattr(f, 'shape', ()))} for {images.shape[0]} images")
    return f.detach().to("cpu", torch.float64), (None if p is None else p.detach().to("cpu", torch.float64))


def _extractor_name(extractor: Any) -> str:
    return str(getattr(extractor, "name", type(extractor).__name__))


def load_images(data: Any, part: str = "all", image_size: Optional[int] = None,
                channels: Optional[int] = None) -> torch.Tensor:
    """Float [-1, 1] NCHW images from a dataset spec ("digits", a path), an ImageDataset or a tensor.

    ``part``: "all", or for the bundled digits "train" / "heldout", the two sides of
    :func:`fastddpm.features.digits_split` (the classifier's training part and the held-out 20%).
    ``image_size`` / ``channels``: a dataset spec's images converted as ``fastddpm train`` converts them.
    """
    from .data import ImageDataset, load_dataset

    if part not in DATA_PARTS:
        raise ValueError(f"part must be one of {DATA_PARTS}, got {part!r}")
    if isinstance(data, (str, os.PathLike)):
        if part != "all" and os.fspath(data) != "digits":
            raise ValueError(f"part={part!r} is only defined for the bundled 'digits' set, not {os.fspath(data)!r}")
        data = load_dataset(os.fspath(data), image_size=image_size, channels=channels)
    elif part != "all":
        raise ValueError(f"part={part!r} needs data='digits'")
    if isinstance(data, ImageDataset):
        idx = torch.arange(len(data))
        if part != "all":
            from .features import digits_split

            tr, ho = digits_split(len(data))
            idx = torch.from_numpy(tr if part == "train" else ho)
        return data.batch(idx)[0]
    if torch.is_tensor(data):
        if data.ndim != 4 or not data.is_floating_point():
            raise ValueError(f"data must be float images [N, C, H, W] in [-1, 1], got {data.dtype} {tuple(data.shape)}")
        return data
    raise ValueError(f"data must be a dataset spec (\"digits\", a path), an ImageDataset or a tensor, "
                     f"got {type(data).__name__}")


def _batched(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, images.shape[0], batch_size):
        yield images[i:i + batch_size]


class _ISAccumulator:
    """Streaming Inception Score with the splits of numpy.array_split when the total count is known."""

    def __init__(self, splits: int, total: Optional[int]):
        self.splits, self.total = splits, total
        self.count = 0
        if total is not None:
            base, extra = divmod(total, splits)
            sizes = [base + (1 if i < extra else 0) for i in range(splits)]
            self.bounds = np.cumsum([0] + sizes)
            self.sum_p: List[Optional[np.ndarray]] = [None] * splits
            self.sum_plogp = np.zeros(splits)
        else:
            self.kept: List[np.ndarray] = []

    def update(self, p: np.ndarray) -> None:
        n = p.shape[0]
        if self.total is None:
            self.kept.append(p.astype(np.float32))
            self.count += n
            return
        if self.count + n > self.total:
            raise ValueError(f"got more than num={self.total} images")
        plogp = np.where(p > 0, p * np.log(np.clip(p, 1e-300, None)), 0.0).sum(axis=1)
        lo = self.count
        for s in range(self.splits):
            a, b = max(self.bounds[s], lo), min(self.bounds[s + 1], lo + n)
            if a >= b:
                continue
            part = p[a - lo:b - lo]
            self.sum_p[s] = part.sum(axis=0) if self.sum_p[s] is None else self.sum_p[s] + part.sum(axis=0)
            self.sum_plogp[s] += plogp[a - lo:b - lo].sum()
        self.count += n

    def result(self) -> Tuple[float, float]:
        if self.total is None:
            return inception_score(np.concatenate(self.kept).astype(np.float64), splits=self.splits)
        if self.count != self.total:
            raise ValueError(f"num={self.total} images were announced but {self.count} came")
        scores = []
        for s in range(self.splits):
            m = self.bounds[s + 1] - self.bounds[s]
            pbar = self.sum_p[s] / m
            h = np.where(pbar > 0, pbar * np.log(np.clip(pbar, 1e-300, None)), 0.0).sum()
            scores.append(math.exp(self.sum_plogp[s] / m - h))
        return float(np.mean(scores)), float(np.std(scores))


@dataclass
class _ClassTally:
    threshold: float
    counts: Optional[np.ndarray] = None
    confident: int = 0
    n: int = 0

    def update(self, p: np.ndarray) -> None:
        if self.counts is None:
            self.counts = np.zeros(p.shape[1], np.int64)
        self.counts += np.bincount(p.argmax(axis=1), minlength=p.shape[1])
        self.confident += int((p.max(axis=1) >= self.threshold).sum())
        self.n += p.shape[0]

    def report(self, out: Dict[str, Any], prefix: str = "") -> None:
        if self.n == 0:
            return
        out[prefix + "confidence_rate"] = self.confident / self.n
        if self.counts is not None and len(self.counts) <= _MAX_CLASSES_REPORTED:
            frac = self.counts / self.n
            out[prefix + "class_counts"] = [int(c) for c in self.counts]
            out[prefix + "class_fractions"] = [float(f) for f in frac]
            out[prefix + "class_fraction_min"] = float(frac.min())
            out[prefix + "class_fraction_max"] = float(frac.max())


# ----------------------------------------------------------------------------- reference statistics
@dataclass
class ReferenceStats:
    """Feature statistics of a reference set: mean, covariance, count, optional kept features, and
    for classifier extractors the confidence rate and class counts of the reference images."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    extractor: str
    features: Optional[np.ndarray] = None
    confidence_rate: Optional[float] = None
    class_counts: Optional[np.ndarray] = None
    confidence_threshold: float = 0.9
    source: str = "<memory>"

    def save(self, path: str) -> None:
        """Write the statistics to an .npz (atomic; readable by :func:`fastddpm.metrics.load_stats`)."""
        fs = FeatureStats()
        fs.dim, fs.count, fs.mean = int(self.mu.shape[0]), int(self.count), np.asarray(self.mu, np.float64)
        fs.m2 = np.asarray(self.sigma, np.float64) * (self.count - 1)
        extra: Dict[str, Any] = {"extractor": np.array(self.extractor),
                                 "confidence_threshold": np.float64(self.confidence_threshold)}
        if self.features is not None:
            extra["features"] = self.features
        if self.confidence_rate is not None:
            extra["confidence_rate"] = np.float64(self.confidence_rate)
        if self.class_counts is not None:
            extra["class_counts"] = np.asarray(self.class_counts, np.int64)
        fs.save(path, extra=extra)

    @classmethod
    def load(cls, path: str, extractor: Any = None) -> "ReferenceStats":
        """Read an .npz of reference statistics; with ``extractor``, refuse one made by another extractor."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"reference statistics {path!r} not found (write them with "
                             "reference_stats(data, extractor, cache=path) or `fastddpm eval --data ... --ref-stats path`)")
        try:
            with np.load(path, allow_pickle=False) as d:
                mu, sigma = np.asarray(d["mu"], np.float64), np.asarray(d["sigma"], np.float64)
                count = int(d["count"]) if "count" in d else 0
                name = str(d["extractor"]) if "extractor" in d else "unknown"
                feats = np.asarray(d["features"], np.float64) if "features" in d else None
                conf = float(d["confidence_rate"]) if "confidence_rate" in d else None
                counts = np.asarray(d["class_counts"], np.int64) if "class_counts" in d else None
                thr = float(d["confidence_threshold"]) if "confidence_threshold" in d else 0.9
        except Exception as exc:  # an empty or damaged file: EOFError, zipfile.BadZipFile, KeyError ...
            raise ValueError(f"cannot read reference statistics from {path!r}: "
                             f"{type(exc).__name__}: {exc or 'empty or truncated file'}") from None
        if extractor is not None and name != "unknown" and name != _extractor_name(extractor):
            raise ValueError(f"reference statistics {path!r} were computed with the {name!r} features, "
                             f"not {_extractor_name(extractor)!r}: recompute them")
        dim = getattr(extractor, "dim", None) if extractor is not None else None
        if dim is not None and mu.shape != (dim,):
            raise ValueError(f"reference statistics {path!r} have dimension {mu.shape}, the extractor gives {dim}")
        return cls(mu, sigma, count, name, feats, conf, counts, thr, source=path)


def reference_stats(data: Any, extractor: Any, part: str = "all", batch_size: int = 256,
                    max_keep: int = 10_000, cache: Optional[str] = None, progress: bool = False,
                    confidence_threshold: float = 0.9) -> ReferenceStats:
    """Feature statistics of real images (a dataset spec, an ImageDataset, a tensor, or an iterable of
    image batches), read from / written to the ``cache`` .npz when given.

    ``part`` selects the digits split ("train" / "heldout"; see :func:`load_images`). ``max_keep``
    raw features are kept for KID / precision-recall.
    """
    if cache is not None and os.path.isfile(cache):
        return ReferenceStats.load(cache, extractor)
    _check_positive("batch_size", batch_size)
    if isinstance(data, (str, os.PathLike, torch.Tensor)) or type(data).__name__ == "ImageDataset":
        images = load_images(data, part)
        batches: Iterable[torch.Tensor] = _batched(images, batch_size)
        total = -(-images.shape[0] // batch_size)
        source = os.fspath(data) if isinstance(data, (str, os.PathLike)) else type(data).__name__
    else:
        if part != "all":
            raise ValueError("part needs data=\"digits\"")
        batches, total, source = data, None, "<batches>"
    stats = FeatureStats(max_keep=max_keep)
    tally = _ClassTally(confidence_threshold)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=total, desc="reference features")
    for b in batches:
        f, p = _extract(extractor, b)
        stats.update(f)
        if p is not None:
            tally.update(p.numpy())
    if stats.count < 2:
        raise ValueError(f"reference data {source!r} has {stats.count} image(s); need at least 2")
    ref = ReferenceStats(stats.mu, stats.sigma, stats.count, _extractor_name(extractor),
                         stats.features if max_keep > 0 else None,
                         (tally.confident / tally.n) if tally.n else None,
                         tally.counts, confidence_threshold, source=f"{source}:{part}")
    if cache is not None:
        d = os.path.dirname(os.path.abspath(cache))
        os.makedirs(d, exist_ok=True)
        ref.save(cache)
    return ref


def stats_cache_dir() -> str:
    """Where computed dataset statistics are cached: $FASTDDPM_CACHE/ref_stats, default ~/.cache/fastddpm/ref_stats."""
    root = os.environ.get("FASTDDPM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastddpm")
    return os.path.join(root, "ref_stats")


def stats_cache_path(data: str, extractor: Any, part: str = "all", max_keep: int = 10_000) -> str:
    """The cache file of `data`'s statistics: keyed by its absolute path, its size and modification time
    (a folder's change when files are added or removed), the part, the extractor and max_keep."""
    import hashlib

    spec = os.fspath(data)
    ident = spec if spec == "digits" else os.path.abspath(spec)
    stamp = ""
    if os.path.exists(ident):
        st = os.stat(ident)
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    key = hashlib.sha256(f"{ident}|{stamp}|{part}|{_extractor_name(extractor)}|{max_keep}".encode()).hexdigest()[:16]
    base = os.path.basename(ident.rstrip(os.sep)) or "data"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in base)[:40]
    return os.path.join(stats_cache_dir(), f"{safe}-{_extractor_name(extractor)}-{part}-{key}.npz")


def is_stats_file(path: Any) -> bool:
    """True for an .npz of statistics ('mu' and 'sigma': fastddpm's, pytorch-fid's or clean-fid's)."""
    p = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    return bool(p) and p.endswith(".npz") and os.path.isfile(p) and not _is_image_npz(p)


def reference_from(spec: Any, extractor: Any, part: str = "all", batch_size: int = 256, max_keep: int = 10_000,
                   cache: Union[bool, str] = True, progress: bool = False) -> ReferenceStats:
    """The reference for `spec`: a statistics .npz used as it is (fastddpm's, or the published
    pytorch-fid / clean-fid files: only 'mu' and 'sigma' are read from those), or real images (the
    digits, a folder, an image .npz, CIFAR-10 batches, MNIST IDX, a tensor) whose statistics are
    computed once and cached (``cache=True``: :func:`stats_cache_path`; a str: that file; False: none).
    """
    if is_stats_file(spec):
        return ReferenceStats.load(os.fspath(spec), extractor)
    if cache is True:
        cache = stats_cache_path(spec, extractor, part, max_keep) if isinstance(spec, (str, os.PathLike)) else None
    return reference_stats(spec, extractor, part=part, batch_size=batch_size, max_keep=max_keep,
                           cache=cache or None, progress=progress)


def fid(samples: Any, reference: Any, features: Any = "inception", *, batch_size: int = 50, device: Any = "cpu",
        weights_path: Optional[str] = None, cache: Union[bool, str] = True, progress: bool = False) -> float:
    """FID of `samples` against `reference` in one call.

    Args:
        samples: float [-1, 1] NCHW images, an iterable of such batches, or a dataset spec (e.g. a
            folder of PNGs written by ``fastddpm sample``).
        reference: a statistics .npz (fastddpm, pytorch-fid, clean-fid), a dataset spec, a tensor,
            or a :class:`ReferenceStats`.
        features: "inception" (the FID InceptionV3 that papers report), "digits", or an extractor.
        cache: cache the reference's statistics (see :func:`reference_from`).
    """
    from .features import get_extractor

    extractor = features
    if isinstance(features, str):
        kw = {"weights_path": weights_path, "batch_size": batch_size} if features == "inception" else {}
        extractor = get_extractor(features, device=device, **kw)
    ref = reference if isinstance(reference, ReferenceStats) else reference_from(
        reference, extractor, batch_size=batch_size, max_keep=0, cache=cache, progress=progress)
    if isinstance(samples, (str, os.PathLike)):
        samples = load_images(samples)
    if torch.is_tensor(samples):
        samples = _batched(load_images(samples), batch_size)
    return float(evaluate_samples(samples, extractor, ref, metrics=("fid",), max_keep=0, progress=progress)["fid"])


def _check_positive(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


# ----------------------------------------------------------------------------- evaluation
def evaluate_samples(
    batches: Iterable[torch.Tensor],
    extractor: Any,
    reference: Any = None,
    metrics: Sequence[str] = ("fid",),
    *,
    num: Optional[int] = None,
    reference_part: str = "all",
    max_keep: int = 10_000,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    is_splits: int = 10,
    pr_k: int = 3,
    confidence_threshold: float = 0.9,
    seed: int = 0,
    progress: bool = False,
) -> Dict[str, Any]:
    """Stream batches of generated images (float [-1, 1] NCHW) through ``extractor`` and compute ``metrics``.

    Args:
        batches: an iterable of image batches (e.g. :func:`sample_batches`), consumed once.
        extractor: a feature extractor (:mod:`fastddpm.features`).
        reference: :class:`ReferenceStats`, a path to a cached .npz, or real images (a dataset spec,
            an ImageDataset or a tensor; their statistics are computed here). Needed for "fid", "kid"
            and "pr"; "is" needs none.
        metrics: any of "fid", "kid", "is" (needs a classifier: ``extractor.num_classes``), "pr".
        num: the number of images the batches hold (lets IS stream its splits, sizes the progress
            bar, and is checked).
        reference_part: the digits split to use when ``reference`` is "digits" ("all", "train", "heldout").
        max_keep: raw features kept of each set for KID / precision-recall.
        kid_subsets, kid_subset_size, is_splits, pr_k: the metrics' parameters.
        confidence_threshold: a sample is "confident" when its max class probability is >= this.

    Returns a dict with "num_samples", "features" (the extractor's name), and as asked "fid",
    "kid_mean"/"kid_std", "is_mean"/"is_std", "precision"/"recall"; for classifier extractors also
    "confidence_rate" (and for at most 100 classes "class_counts", "class_fractions",
    "class_fraction_min"/"max"), and the reference's "ref_confidence_rate" / "ref_class_fractions"
    when known.
    """
    metrics = tuple(metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"metrics must be among {METRICS}, got {bad}")
    if num is not None:
        _check_positive("num", num)
    if "is" in metrics and not getattr(extractor, "num_classes", None):
        raise ValueError(f"the Inception Score needs a classifier extractor (with num_classes); "
                         f"{_extractor_name(extractor)!r} has none")
    if "is" in metrics and num is not None and not 1 <= is_splits <= num:
        raise ValueError(f"is_splits must be in [1, num={num}] (one image per split at least), got {is_splits}")
    ref = _resolve_reference(reference, extractor, metrics, reference_part, max_keep, confidence_threshold)
    keep = max_keep if any(m in metrics for m in ("kid", "pr")) else 0
    stats = FeatureStats(max_keep=keep)
    is_acc = _ISAccumulator(is_splits, num) if "is" in metrics else None
    tally = _ClassTally(confidence_threshold)
    _accumulate(batches, extractor, stats, tally, is_acc, num, progress)
    if num is not None and stats.count != num:
        raise ValueError(f"num={num} images were announced but the batches held {stats.count}")
    if stats.count < 2:
        raise ValueError(f"need at least 2 generated images, got {stats.count}")

    out: Dict[str, Any] = {"num_samples": stats.count, "features": _extractor_name(extractor)}
    if "fid" in metrics:
        out["fid"] = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
    if "kid" in metrics:
        out["kid_mean"], out["kid_std"] = kernel_inception_distance(
            stats.features, ref.features, num_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    if "is" in metrics:
        out["is_mean"], out["is_std"] = is_acc.result()
    if "pr" in metrics:
        k = min(pr_k, min(len(ref.features), len(stats.features)) - 1)
        out["precision"], out["recall"] = precision_recall(ref.features, stats.features, k=k)
        out["pr_k"] = k
    tally.report(out)
    if ref is not None:
        _report_reference(ref, out)
    return out


def _resolve_reference(reference: Any, extractor: Any, metrics: Tuple[str, ...], part: str, max_keep: int,
                       confidence_threshold: float) -> Optional[ReferenceStats]:
    """The reference statistics `metrics` need (fid, kid and pr need one; kid and pr its raw features):
    given ReferenceStats, a cached .npz, or real images whose statistics are computed here."""
    needs_ref = [m for m in metrics if m in ("fid", "kid", "pr")]
    if not needs_ref:
        return reference if isinstance(reference, ReferenceStats) else None
    if reference is None:
        raise ValueError(f"metrics {needs_ref} need a reference: real data (e.g. 'digits') or cached statistics (.npz)")
    if isinstance(reference, ReferenceStats):
        ref = reference
        if ref.extractor not in ("unknown", _extractor_name(extractor)):
            raise ValueError(f"the reference statistics were computed with {ref.extractor!r} features, "
                             f"not {_extractor_name(extractor)!r}")
    elif isinstance(reference, (str, os.PathLike)) and os.fspath(reference).endswith(".npz") \
            and not _is_image_npz(os.fspath(reference)):
        ref = ReferenceStats.load(os.fspath(reference), extractor)
    else:
        ref = reference_stats(reference, extractor, part=part, max_keep=max_keep,
                              confidence_threshold=confidence_threshold)
    if any(m in metrics for m in ("kid", "pr")) and ref.features is None:
        raise ValueError("KID and precision/recall need the reference's raw features; these reference "
                         "statistics hold only mu/sigma (recompute them with max_keep > 0)")
    return ref


def _accumulate(batches: Iterable[torch.Tensor], extractor: Any, stats: FeatureStats, tally: "_ClassTally",
                is_acc: Optional["_ISAccumulator"], num: Optional[int], progress: bool) -> None:
    """Stream the batches once through the extractor into the feature statistics and, for classifiers,
    the class tally and the Inception Score accumulator."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num, desc=f"evaluating ({_extractor_name(extractor)} features)", unit="img")
    for b in batches:
        f, p = _extract(extractor, b)
        stats.update(f)
        if p is not None:
            pn = p.numpy()
            tally.update(pn)
            if is_acc is not None:
                is_acc.update(pn)
        if bar is not None:
            bar.update(b.shape[0])
    if bar is not None:
        bar.close()


def _report_reference(ref: ReferenceStats, out: Dict[str, Any]) -> None:
    """The reference's source, size and (for classifiers) confidence rate and class fractions, into `out`."""
    out["reference"] = ref.source
    out["reference_count"] = ref.count
    if ref.confidence_rate is not None:
        out["ref_confidence_rate"] = ref.confidence_rate
    if ref.class_counts is not None and len(ref.class_counts) <= _MAX_CLASSES_REPORTED:
        out["ref_class_fractions"] = [float(c) / max(ref.count, 1) for c in ref.class_counts]


def _is_image_npz(path: str) -> bool:
    """True for an .npz of images (a dataset), False for statistics (has 'mu' and 'sigma')."""
    try:
        with np.load(path, allow_pickle=False) as d:
            return not ("mu" in d and "sigma" in d)
    except Exception:  # empty or damaged: not images; ReferenceStats.load then names the file
        return False


def sample_batches(model: Any, sampler: Any, num: int, batch_size: int, shape: Sequence[int], seed: int = 0,
                   device: Any = None, clip_denoised: bool = True, progress: bool = False,
                   num_classes: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Yield ``num`` samples in batches of ``batch_size`` ([B, *shape] float in [-1, 1]).

    Image i is the sampler's image ``image_offset = i`` of ``seed`` (Philox), so the images do not
    depend on the batch size. Class-conditional models (``num_classes``) get labels i % num_classes.
    """
    _check_positive("num", num)
    _check_positive("batch_size", batch_size)
    shape = tuple(int(s) for s in shape)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num, desc=f"sampling ({type(sampler).__name__}, {sampler.num_steps} steps)", unit="img")
    try:
        for b0 in range(0, num, batch_size):
            b1 = min(b0 + batch_size, num)
            net = model
            if num_classes:
                y = torch.arange(b0, b1, dtype=torch.int64) % num_classes
                net = _Labelled(model, y.to(device) if device is not None else y)
            with torch.no_grad():
                x = sampler.sample(net, (b1 - b0,) + shape, seed=seed, image_offset=b0,
                                   clip_denoised=clip_denoised, device=device)
            if bar is not None:
                bar.update(b1 - b0)
            yield x.float().cpu()
    finally:
        if bar is not None:
            bar.close()


class _Labelled:
    def __init__(self, model: Any, y: torch.Tensor):
        self.model, self.y = model, y

    def parameters(self):
        return self.model.parameters()

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x, t, y=self.y)


# ----------------------------------------------------------------------------- bits/dim
def nll_over_dataset(diffusion: Any, model: Any, data: Any, batch_size: int = 64, num: Optional[int] = None,
                     part: str = "all", seed: int = 0, clip_denoised: bool = True, device: Any = None,
                     progress: bool = False, return_per_image: bool = False) -> Dict[str, Any]:
    """Bits/dim of real images under the full variational bound, with its standard error.

    Args:
        diffusion: a :class:`fastddpm.GaussianDiffusion`.
        model: model(x_t, t) (as for ``nll_bpd``).
        data: a dataset spec ("digits", a path), an ImageDataset or a float [-1, 1] NCHW tensor.
        batch_size: images per ``nll_bpd`` call (each costs T model calls).
        num: use only the first ``num`` images (None: all).
        part: "all", or for the digits "train" / "heldout" (see :func:`load_images`).
        seed: seeds the one torch.Generator (on ``device``) that draws the noise of every batch in turn.
        device: where to run (default: the model's device, else the CPU).

    Returns a dict: "bpd" (mean total bits/dim), "stderr" (std(ddof=1) / sqrt(n); 0 for n = 1),
    "num" (n), "prior_bpd" and "decoder_bpd" (means of the prior term and of vb[:, 0]), and with
    ``return_per_image`` "per_image" (float64 numpy [n]).
    """
    _check_positive("batch_size", batch_size)
    if num is not None:
        _check_positive("num", num)
    images = load_images(data, part)
    if num is not None:
        if num > images.shape[0]:
            raise ValueError(f"num={num} is more than the {images.shape[0]} images of the data")
        images = images[:num]
    if device is None:
        param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    totals, priors, decoders = [], [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=images.shape[0], desc=f"bits/dim ({diffusion.num_timesteps} terms per image)", unit="img")
    for b in _batched(images, batch_size):
        r = diffusion.nll_bpd(model, b.to(device), clip_denoised=clip_denoised, generator=gen)
        totals.append(r["total_bpd"].double().cpu())
        priors.append(r["prior_bpd"].double().cpu())
        decoders.append(r["vb"][:, 0].double().cpu())
        if bar is not None:
            bar.update(b.shape[0])
    if bar is not None:
        bar.close()
    per = torch.cat(totals).numpy()
    n = per.shape[0]
    out: Dict[str, Any] = {
        "bpd": float(per.mean()),
        "stderr": float(per.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        "num": int(n),
        "prior_bpd": float(torch.cat(priors).mean()),
        "decoder_bpd": float(torch.cat(decoders).mean()),
        "num_timesteps": int(diffusion.num_timesteps),
    }
    if return_per_image:
        out["per_image"] = per
    return out

"""Feature extractors for sample-quality metrics (FID / KID / IS / precision-recall).

A feature extractor is a callable ``extractor(images) -> [N, D]`` float features, where ``images``
are float NCHW tensors in [-1, 1] (what the samplers return and what :mod:`fastddpm.data` serves).
Extractors that classify also have ``.logits(images) -> [N, K]``, ``.probs(images) -> [N, K]`` and
``.features_and_probs(images) -> ([N, D], [N, K])`` (one forward pass for both), and
``num_classes = K``; non-classifiers have ``num_classes = None``. Every extractor has ``name`` (used
to refuse cached reference statistics computed with another extractor) and ``dim = D``.

Two extractors ship:

- :class:`DigitsClassifier` (``get_extractor("digits")``): a tiny CNN for 8x8 one-channel digits in
  [-1, 1], trained by ``scripts/train_digits_classifier.py`` on the bundled ``digits`` set (the
  training part of :func:`digits_split`) and shipped as ``fastddpm/assets/digits_classifier.safetensors``
  + ``.json``. Its 64-d penultimate activations give an offline "digits-FID", its softmax an IS-style
  score, a confidence rate and per-class counts. No network, no extra dependency.
- :class:`InceptionV3Features` (``get_extractor("inception")``): the FID InceptionV3 of pytorch-fid /
  the papers (pool3, 2048-d; unbiased logits for IS), defined in :mod:`fastddpm.inception` in plain
  torch (no torchvision, no torch-fidelity). Its weights ``pt_inception-2015-12-05-6726825d.pth`` come
  from ``weights_path=`` or the torch hub cache, downloaded there once (checksum verified) when online.
  Images are converted as pytorch-fid reads PNG files: [-1, 1] -> uint8 (round((x+1)*127.5)) -> /255,
  grayscale repeated to 3 channels, then 299x299 bilinear and 2x - 1.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "DIGITS_SPLIT_SEED",
    "DIGITS_HOLDOUT_FRACTION",
    "DIGITS_CLASSIFIER_PATH",
    "digits_split",
    "DigitsClassifier",
    "load_digits_classifier",
    "InceptionV3Features",
    "get_extractor",
    "EXTRACTORS",
]

_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DIGITS_CLASSIFIER_PATH = os.path.join(_ASSETS, "digits_classifier.safetensors")
DIGITS_SPLIT_SEED = 2024
DIGITS_HOLDOUT_FRACTION = 0.2
EXTRACTORS = ("digits", "inception")


def digits_split(n: int = 1797, seed: int = DIGITS_SPLIT_SEED,
                 holdout: float = DIGITS_HOLDOUT_FRACTION) -> Tuple[np.ndarray, np.ndarray]:
    """The fixed train / held-out split of the bundled digits: (train_idx, heldout_idx), sorted int64.

    A seeded permutation (``numpy.random.default_rng(seed).permutation(n)``); its last
    ``round(holdout * n)`` indices are held out (360 of the 1,797 digits with the defaults). The
    classifier trains on the rest; digits-FID and the quality report compare samples with the
    held-out part.
    """
    if not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n must be an int >= 2, got {n!r}")
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout!r}")
    perm = np.random.default_rng(seed).permutation(int(n))
    k = max(1, int(round(holdout * n)))
    return np.sort(perm[: n - k]).astype(np.int64), np.sort(perm[n - k:]).astype(np.int64)


def _check_images(images: Any, channels: Optional[int] = None, size: Optional[int] = None) -> torch.Tensor:
    if not torch.is_tensor(images) or images.ndim != 4 or not images.is_floating_point():
        raise ValueError(
            f"images must be a float tensor [N, C, H, W] in [-1, 1], got "
            f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}"
        )
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"images must have {channels} channel(s), got shape {tuple(images.shape)}")
    if size is not None and tuple(images.shape[2:]) != (size, size):
        raise ValueError(f"images must be {size}x{size}, got shape {tuple(images.shape)}")
    return images


# ----------------------------------------------------------------------------- digits classifier
class DigitsClassifier(nn.Module):
    """Tiny CNN for 8x8 one-channel digits in [-1, 1]: features (64-d) and 10-way logits.

    conv3x3(1->c1) ReLU, conv3x3 stride 2 (c1->c2) ReLU [4x4], flatten, linear(16*c2 -> feature_dim)
    ReLU = the features, linear(feature_dim -> 10) = the logits. Calling the module returns the
    features, as every extractor does. ``.eval()`` is set on load; methods run under no_grad only
    when the caller asks (the training script needs gradients).
    """

    name = "digits"

    def __init__(self, c1: int = 16, c2: int = 32, feature_dim: int = 64, num_classes: int = 10,
                 image_size: int = 8):
        super().__init__()
        if image_size % 2:
            raise ValueError(f"image_size must be even, got {image_size}")
        self.config = dict(c1=int(c1), c2=int(c2), feature_dim=int(feature_dim), num_classes=int(num_classes),
                           image_size=int(image_size))
        self.image_size = int(image_size)
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.fc = nn.Linear(c2 * (image_size // 2) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.dim = int(feature_dim)
        self.num_classes = int(num_classes)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        try:
            x = _check_images(images, channels=1, size=self.image_size).to(self.fc.weight.dtype)
        except ValueError as e:  # say which features want what, and what to use instead
            raise ValueError(f"the digits features (features='digits', `fastddpm eval --features digits`, the "
                             f"default) take {self.image_size}x{self.image_size} one-channel images: {e}; use "
                             "features='inception' (--features inception) for other images") from None
        x = x.to(self.fc.weight.device)
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features [N, 64] (what digits-FID uses)."""
        return self._features(images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits [N, 10]."""
        return self.head(self._features(images))

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax class probabilities [N, 10] (float32)."""
        return torch.softmax(self.logits(images).float(), dim=1)

    def features_and_probs(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(features [N, 64], probs [N, 10]) from one forward pass."""
        f = self._features(images)
        return f, torch.softmax(self.head(f).float(), dim=1)


def load_digits_classifier(path: Optional[str] = None, device: Any = "cpu") -> DigitsClassifier:
    """The shipped digits classifier (or one at ``path``: a .safetensors with a .json beside it), in eval mode.

    The JSON holds the architecture ("config"), the split seed and the held-out accuracy measured
    when it was trained (informational; tests recompute it from the data).
    """
    from safetensors.torch import load_file

    path = os.fspath(path) if path is not None else DIGITS_CLASSIFIER_PATH
    meta_path = os.path.splitext(path)[0] + ".json"
    if not os.path.isfile(path) or not os.path.isfile(meta_path):
        raise FileNotFoundError(
            f"digits classifier weights not found: need {path} and {meta_path} "
            "(train them with: python scripts/train_digits_classifier.py)"
        )
    from .jsonio import load_file as load_json

    meta = load_json(meta_path)
    model = DigitsClassifier(**meta["config"])
    model.load_state_dict(load_file(path))
    model.meta = meta
    return model.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------- InceptionV3 (FID)
class InceptionV3Features:
    """The FID InceptionV3's pool3 features (2048-d) and IS probabilities, exactly as pytorch-fid feeds it.

    Images (float [-1, 1] NCHW, 1 or 3 channels) are quantised as they would be saved
    (:func:`fastddpm.images.quantize`: round((x + 1) * 127.5)), read back as pytorch-fid reads a PNG
    (u8 / 255, grayscale repeated to RGB), then resized to 299x299 (bilinear, align_corners=False)
    and mapped to [-1, 1] inside :class:`fastddpm.inception.FIDInceptionV3`. So features of samples
    equal pytorch-fid's features of the same samples written as PNG files, and statistics from
    pytorch-fid (or clean-fid's "legacy_pytorch" mode) are comparable as they are.

    Args:
        weights_path: a local copy of ``pt_inception-2015-12-05-6726825d.pth`` (None: the torch hub
            cache, downloaded there once when missing and ``download``).
        device: where to run the network.
        batch_size: images per network call (the caller's batches are split to this).
        download: allow the one-time download.
        model: an already built FIDInceptionV3 (tests; skips loading weights).

    IS probabilities: the softmax of the 1008 logits without the fc bias (the TF Inception Score).
    """

    name = "inception"
    dim = 2048
    num_classes = 1008

    def __init__(self, weights_path: Optional[str] = None, device: Any = "cpu", batch_size: int = 64,
                 download: bool = True, model: Optional[nn.Module] = None):
        from .inception import load_fid_inception

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        net = model if model is not None else load_fid_inception(weights_path, device=self.device, download=download)
        self.net = net.to(self.device).eval().requires_grad_(False)

    @staticmethod
    def to_unit_rgb(images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] float NCHW (1 or 3 channels) -> float32 RGB in [0, 1] on the 256 levels u8 / 255."""
        from .images import quantize

        x = _check_images(images)
        if x.shape[1] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got shape {tuple(x.shape)}")
        u = quantize(x).float() / 255.0
        return u.expand(-1, 3, -1, -1) if u.shape[1] == 1 else u

    @torch.no_grad()
    def features_and_probs(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(pool3 features [N, 2048], softmax of the 1008 unbiased logits [N, 1008]), float32 on the CPU."""
        feats = [self.net.pool3(chunk.to(self.device)).float()
                 for chunk in self.to_unit_rgb(images).split(self.batch_size)]
        f = torch.cat(feats)
        return f.cpu(), torch.softmax(self.net.logits_unbiased(f).float(), dim=1).cpu()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_probs(images)[0]

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_probs(images)[1]

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        f = torch.cat([self.net.pool3(c.to(self.device)) for c in self.to_unit_rgb(images).split(self.batch_size)])
        return self.net.logits_unbiased(f).float().cpu()


def get_extractor(name: str, device: Any = "cpu", **kwargs: Any):
    """A feature extractor by name: "digits" (shipped classifier) or "inception" (the FID InceptionV3).

    Extra keyword arguments go to the extractor (``path=`` for digits, ``weights_path=`` /
    ``batch_size=`` / ``download=`` for inception).
    """
    if name == "digits":
        return load_digits_classifier(kwargs.pop("path", None), device=device)
    if name == "inception":
        return InceptionV3Features(device=device, **kwargs)
    raise ValueError(f"features must be one of {', '.join(repr(e) for e in EXTRACTORS)}, got {name!r}")

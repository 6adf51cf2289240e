"""The FID InceptionV3 (TF's 2015-12-05 graph, as ported by pytorch-fid) in plain torch, no torchvision.

The FID everyone reports (DDPM CIFAR-10 FID 3.17, ...) is the Frechet distance of pool3 features of
this network. It is torchvision's InceptionV3 layout with the FID weights
``pt_inception-2015-12-05-6726825d.pth`` and four differences that pytorch-fid patches in, all
reproduced here:

- the 3x3 average pools inside the A, C and first E blocks do not count the zero padding
  (TF's average pool), ``count_include_pad=False``;
- the second E block (Mixed_7c) pools with a 3x3 *max* pool (stride 1, padding 1);
- the classifier has 1008 classes (``fc``: 2048 -> 1008);
- BatchNorm eps 1e-3, convolutions without bias.

Parameter names are those of the weight file (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.
running_mean``, ..., ``fc.bias``), so ``load_state_dict`` takes it as it is.

Input handling is pytorch-fid's: images as float RGB in [0, 1] (what ``ToTensor`` makes of a PNG),
resized to 299x299 with ``F.interpolate(mode="bilinear", align_corners=False)``, then mapped to
[-1, 1] by 2x - 1. :func:`preprocess` does that; :meth:`FIDInceptionV3.pool3` returns the 2048-d
features after the global average pool, :meth:`FIDInceptionV3.logits_unbiased` the 1008 logits
without the fc bias (what the TF Inception Score code uses).

Weights: :func:`inception_weights` finds them (a given path, else the torch hub cache
``<hub>/checkpoints/pt_inception-2015-12-05-6726825d.pth``, the file pytorch-fid itself caches) or
downloads them once from pytorch-fid's release into that cache; every file is checked against the
SHA-256 prefix in its name (``6726825d``), as torch.hub does.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FIDInceptionV3", "preprocess", "inception_weights", "load_fid_inception", "WEIGHTS_URL",
           "WEIGHTS_FILENAME", "WEIGHTS_SHA256_PREFIX", "INPUT_SIZE", "FEATURE_DIM", "NUM_CLASSES"]

WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = "6726825d"
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008

Size2 = Union[int, Tuple[int, int]]


class _ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU; the submodules are named conv and bn."""

    def __init__(self, cin: int, cout: int, kernel: Size2, stride: int = 1, padding: Size2 = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average pool that averages only the pixels inside the image (TF semantics)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _same_max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)


class _BlockA(nn.Module):
    """Mixed_5b/c/d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1 (64 + 64 + 96 + pool_features channels)."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1 = _ConvBN(cin, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class _BlockB(nn.Module):
    """Mixed_6a (grid 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool 3x3/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockC(nn.Module):
    """Mixed_6b..e: factorised 7x7 convolutions (1x7 / 7x1) with `c7` inner channels; 768 out."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, **row)
        self.branch7x7_3 = _ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = _ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = _ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = _ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = _ConvBN(c7, 192, **row)
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_tf_avg_pool(x))], 1)


class _BlockD(nn.Module):
    """Mixed_7a (grid 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool 3x3/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _ConvBN(cin, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockE(nn.Module):
    """Mixed_7b/c: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1; 2048 out.

    `max_pool`: the FID graph's Mixed_7c pools with a max pool where Mixed_7b (and the paper) average.
    """

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = bool(max_pool)
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = _same_max_pool(x) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


def preprocess(images01: torch.Tensor) -> torch.Tensor:
    """pytorch-fid's input transform: float RGB [N, 3, H, W] in [0, 1] -> 299x299 bilinear
    (align_corners=False) -> 2x - 1."""
    x = F.interpolate(images01, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


class FIDInceptionV3(nn.Module):
    """The FID InceptionV3 (see the module docstring); random weights until :meth:`load_state_dict`."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _BlockA(192, 32)
        self.Mixed_5c = _BlockA(256, 64)
        self.Mixed_5d = _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, 128)
        self.Mixed_6c = _BlockC(768, 160)
        self.Mixed_6d = _BlockC(768, 160)
        self.Mixed_6e = _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, max_pool=False)
        self.Mixed_7c = _BlockE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x

    def pool3(self, images01: torch.Tensor) -> torch.Tensor:
        """pool3 features [N, 2048] of float RGB images in [0, 1] (any size: resized to 299 here)."""
        return self._trunk(preprocess(images01)).mean(dim=(2, 3))

    def logits_unbiased(self, features: torch.Tensor) -> torch.Tensor:
        """The 1008 class logits of pool3 features without the fc bias (TF Inception Score)."""
        return features @ self.fc.weight.t()

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.pool3(images01)


# ----------------------------------------------------------------------------- weights
def _check_hash(path: str, prefix: str, what: str) -> None:
    from .fileio import sha256_file

    digest = sha256_file(path)
    if not digest.startswith(prefix):
        raise ValueError(f"{what} {path!r} is not the FID InceptionV3 weight file: its SHA-256 {digest[:16]}... "
                         f"does not start with {prefix} (a partial download or another file)")


def default_weights_path() -> str:
    """Where the weights are cached: torch hub's checkpoints folder (shared with pytorch-fid)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILENAME)


def inception_weights(weights_path: Optional[str] = None, download: bool = True, url: str = WEIGHTS_URL,
                      sha256_prefix: str = WEIGHTS_SHA256_PREFIX) -> str:
    """The path of verified FID InceptionV3 weights.

    Args:
        weights_path: a local copy (checked against `sha256_prefix`); None: the hub cache.
        download: when the cache has no copy, fetch `url` into it once (torch.hub's downloader,
            which checks the hash before moving the file into place).
        url, sha256_prefix: the source and its checksum prefix (tests point them at local files).

    Raises ValueError for a file with the wrong checksum, FileNotFoundError when there is no copy
    and `download` is off, RuntimeError (naming the URL) when the download fails.
    """
    if weights_path is not None:
        path = os.fspath(weights_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights_path {path!r}: no such file (the FID InceptionV3 weights: {url})")
        _check_hash(path, sha256_prefix, "weights_path")
        return path
    path = default_weights_path()
    if os.path.isfile(path):
        _check_hash(path, sha256_prefix, "the cached weights")
        return path
    if not download:
        raise FileNotFoundError(f"the FID InceptionV3 weights are not in {path}; download {url} there or pass "
                                "weights_path=")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, path, hash_prefix=sha256_prefix, progress=True)
    except RuntimeError as exc:  # torch.hub's hash mismatch
        raise ValueError(f"the download of {url} failed its checksum ({exc}); nothing was cached") from exc
    except OSError as exc:  # offline, HTTP errors
        raise RuntimeError(f"could not download the FID InceptionV3 weights from {url} ({exc}); download the file "
                           f"by hand and pass weights_path=, or place it at {path}") from exc
    return path


def load_fid_inception(weights_path: Optional[str] = None, device: Union[str, torch.device] = "cpu",
                       download: bool = True) -> FIDInceptionV3:
    """FIDInceptionV3 with the standard weights (see :func:`inception_weights`), in eval mode, no grad."""
    path = inception_weights(weights_path, download=download)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = FIDInceptionV3()
    load_weights(model, state)
    return model.to(device).eval().requires_grad_(False)


def load_weights(model: FIDInceptionV3, state: dict) -> None:
    """Load a state dict of the weight file's layout; BatchNorm's num_batches_tracked may be absent."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"not an FID InceptionV3 state dict: missing {missing[:5]}, unexpected {unexpected[:5]}")


def state_dict_layout(model: Optional[nn.Module] = None) -> Sequence[Tuple[str, Tuple[int, ...]]]:
    """(key, shape) of every tensor of the weight file's state dict, num_batches_tracked left out."""
    model = model or FIDInceptionV3()
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]

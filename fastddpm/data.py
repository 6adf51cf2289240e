"""Datasets for training: built-in digits, image folders, .npz arrays, CIFAR-10 batches, MNIST IDX.

Every loader returns an :class:`ImageDataset`, which holds the whole dataset as one uint8 NCHW tensor
(the data sets this library trains on fit in memory: CIFAR-10 is 150 MB as uint8) and serves float
images in [-1, 1] (``x = u8 / 127.5 - 1``), optionally flipped left-right at random.

    ds = load_dataset("digits")                       # 1,797 8x8 handwritten digits, 1 channel, 10 classes
    ds = load_dataset("path/to/folder", image_size=64, random_flip=True)
    ds = load_dataset("images.npz")                   # key "images" (else the first array), NHWC or NCHW
    ds = load_dataset("cifar-10-batches-py")          # CIFAR-10's python batches (restricted unpickler)
    ds = load_dataset("mnist/")                       # a folder holding train-images-idx3-ubyte[.gz]
    ds = load_dataset("t10k-images-idx3-ubyte.gz")    # or the IDX file itself

Choices (documented here since the design leaves them open):
- Resizing (``image_size``) first centre-crops non-square images to a square, then resizes with
  antialiasing (Pillow's bicubic for image files, torch's antialiased bilinear for arrays), and
  rounds back to uint8 once, at load time.
- Without ``image_size`` all images must share one size; with it, images of any size are accepted.
- Channels are inferred (grayscale -> 1, colour -> 3). Mixed channel counts are an error unless
  ``channels=1`` or ``channels=3`` is given, which converts every image. Alpha is dropped.
- Image folders: when every image lies in a first-level sub-folder, the sorted sub-folder names are
  the classes (``ds.classes``) and the images get integer labels; otherwise there are no labels.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ImageDataset",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "open_image",
    "load_npz",
    "load_cifar10",
    "safe_load_pickle",
    "UnsafePickleError",
    "load_idx",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


class ImageDataset(torch.utils.data.Dataset):
    """An in-memory image dataset: uint8 NCHW storage, float [-1, 1] NCHW output.

    Args:
        images: uint8 tensor or array [N, C, H, W] with C in {1, 3}.
        labels: optional integer labels [N] (class-conditional training).
        random_flip: flip each served image left-right with probability 1/2.
        classes: optional class names, index = label.
        source: where the data came from (for messages).

    ``ds[i]`` returns ``(image, label)`` with a float32 [C, H, W] image in [-1, 1] and an int label
    (-1 when the dataset has none); the flip there uses torch's global RNG. :meth:`batch` gathers many
    images at once and draws the flips from an explicit generator (the training loop uses it, so a
    resumed run sees exactly the same flips).
    """

    def __init__(
        self,
        images,
        labels=None,
        random_flip: bool = False,
        classes: Optional[Sequence[str]] = None,
        source: str = "<memory>",
    ):
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"images must be a uint8 tensor [N, C, H, W] with C in (1, 3), got {images.dtype} "
                f"{tuple(images.shape)} (from {source})"
            )
        if images.shape[0] == 0:
            raise ValueError(f"no images in {source}")
        self.images = images.contiguous()
        if labels is not None:
            labels = torch.as_tensor(np.asarray(labels)).to(torch.int64).reshape(-1)
            if labels.numel() != images.shape[0]:
                raise ValueError(
                    f"{source}: {labels.numel()} labels for {images.shape[0]} images"
                )
            if (labels < 0).any():
                raise ValueError(f"{source}: labels must be non-negative integers")
        self.labels = labels
        self.random_flip = bool(random_flip)
        self.classes = list(classes) if classes is not None else None
        self.source = source

    # ------------------------------------------------------------------ properties
    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        """Side of the (square) images; for non-square data, the height."""
        return int(self.images.shape[2])

    @property
    def num_classes(self) -> Optional[int]:
        """Number of classes (len(classes), else max label + 1), or None without labels."""
        if self.labels is None:
            return None
        if self.classes is not None:
            return len(self.classes)
        return int(self.labels.max()) + 1

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        lab = f", {self.num_classes} classes" if self.labels is not None else ""
        return f"ImageDataset({n} images, {c}x{h}x{w}{lab}, flip={self.random_flip}, from {self.source})"

    # ------------------------------------------------------------------ access
    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        x = _to_float(self.images[index])
        if self.random_flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        label = int(self.labels[index]) if self.labels is not None else -1
        return x, label

    def batch(
        self,
        indices,
        generator: Optional[torch.Generator] = None,
        device=None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Images ``indices`` as float32 [B, C, H, W] in [-1, 1] (on ``device``) and their labels.

        Flips (when ``random_flip``) are drawn from ``generator`` (a CPU generator), one per image.
        """
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        u8 = self.images.index_select(0, idx)
        if self.random_flip:
            flip = torch.rand(idx.numel(), generator=generator) < 0.5
            u8 = torch.where(flip[:, None, None, None], u8.flip(-1), u8)
        # non_blocking: a blocking host-to-device copy waits for the GPU (the training loop's steps have no
        # host sync); from pageable memory CUDA stages the source before returning, so this is safe
        x = _to_float(u8.to(device, non_blocking=True) if device is not None else u8)
        y = None
        if self.labels is not None:
            y = self.labels.index_select(0, idx)
            if device is not None:
                y = y.to(device, non_blocking=True)
        return x, y


def _to_float(u8: torch.Tensor) -> torch.Tensor:
    return u8.to(torch.float32) / 127.5 - 1.0


# ---------------------------------------------------------------------- array helpers
def _center_crop_square(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return x[..., top : top + s, left : left + s]


def _resize_u8(images: torch.Tensor, image_size: Optional[int]) -> torch.Tensor:
    """Centre-crop to square and resize uint8 NCHW images to image_size (antialiased bilinear)."""
    if image_size is None:
        return images
    h, w = images.shape[-2:]
    if h == w == image_size:
        return images
    sq = _center_crop_square(images)
    if sq.shape[-1] == image_size:
        return sq.contiguous()
    out = []
    for chunk in sq.split(1024):  # bounded float memory
        f = F.interpolate(chunk.float(), size=(image_size, image_size), mode="bilinear",
                          align_corners=False, antialias=True)
        out.append(f.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def _convert_channels(images: torch.Tensor, channels: Optional[int]) -> torch.Tensor:
    """uint8 NCHW with C in {1, 3} -> `channels` (1: ITU-R 601 luma, 3: gray replicated)."""
    c = images.shape[1]
    if channels is None or channels == c:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def _check_options(image_size: Optional[int], channels: Optional[int]) -> None:
    if image_size is not None and (not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")


def _array_to_nchw(arr: np.ndarray, path: str) -> torch.Tensor:
    """A uint8 array [N, H, W], [N, H, W, C] or [N, C, H, W] (C in 1, 3, 4) -> uint8 NCHW, C in 1, 3."""
    if arr.dtype != np.uint8:
        raise ValueError(f"{path}: images must be uint8 (0..255), got dtype {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4:
        last_is_c = arr.shape[-1] in (1, 3, 4)
        second_is_c = arr.shape[1] in (1, 3, 4)
        if last_is_c and not (second_is_c and arr.shape[-1] == arr.shape[-2] and arr.shape[1] != arr.shape[2]):
            arr = arr.transpose(0, 3, 1, 2)  # NHWC -> NCHW
        elif not second_is_c:
            raise ValueError(
                f"{path}: cannot tell the channel axis of an array of shape {arr.shape}; expected NHWC or "
                "NCHW with 1, 3 or 4 channels"
            )
    else:
        raise ValueError(f"{path}: images must have 3 or 4 dimensions (N,H,W[,C] or N,C,H,W), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[2] == 0 or arr.shape[3] == 0:
        raise ValueError(f"{path}: the image array is empty (shape {arr.shape})")
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:
        arr = arr.copy()
    t = torch.from_numpy(arr)
    if t.shape[1] == 4:
        t = t[:, :3]  # drop alpha
    return t.contiguous()


# ---------------------------------------------------------------------- loaders
def load_digits(image_size: Optional[int] = None, random_flip: bool = False,
                channels: Optional[int] = None) -> ImageDataset:
    """The 1,797 8x8 UCI handwritten digits (bundled; 1 channel, labels 0..9)."""
    path = os.path.join(_ASSETS, "digits.npz")
    return load_npz(path, image_size=image_size, random_flip=random_flip, channels=channels,
                    classes=[str(i) for i in range(10)])


def load_npz(path: str, image_size: Optional[int] = None, random_flip: bool = False,
             channels: Optional[int] = None, classes: Optional[Sequence[str]] = None) -> ImageDataset:
    """Images from an .npz file: array "images" (else the first array), uint8 NHWC or NCHW (or NHW).

    Labels are read from an array "labels" or "y" when present.
    """
    _check_options(image_size, channels)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            if not keys:
                raise ValueError(f"{path}: the .npz file holds no arrays")
            key = "images" if "images" in keys else keys[0]
            arr = z[key]
            labels = None
            for lk in ("labels", "y"):
                if lk in keys and lk != key:
                    labels = z[lk]
                    break
    except ValueError as e:
        if str(e).startswith(path):
            raise
        raise ValueError(f"{path}: cannot read the .npz file ({e})") from e
    except Exception as e:  # zipfile.BadZipFile, OSError, EOFError ...
        raise ValueError(f"{path}: cannot read the .npz file ({type(e).__name__}: {e})") from e
    images = _array_to_nchw(arr, path)
    images = _resize_u8(_convert_channels(images, channels), image_size)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{path}: labels must be an integer array of length {images.shape[0]}, "
                             f"got {labels.dtype} {labels.shape}")
    return ImageDataset(images, labels, random_flip=random_flip, classes=classes, source=path)


def _pil_channels(mode: str) -> Optional[int]:
    if mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
        return 1
    if mode in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"):
        return 3
    return None


def open_image(path: str, channels: Optional[int] = None, image_size: Optional[int] = None) -> np.ndarray:
    """One image file read with Pillow as uint8 [H, W, C].

    `channels` (1 or 3; default: the file's, grey or RGB) converts the image; `image_size` center-crops it
    to a square and resizes it (bicubic) to that side. An unreadable file, an unsupported mode or a 16-bit /
    float image raises ValueError naming the path.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            c = _pil_channels(mode)
            if c is None:
                raise ValueError(f"{path}: unsupported image mode {mode!r}")
            if mode.startswith("I") or mode == "F":
                raise ValueError(f"{path}: {mode!r} images (16-bit / float) are not supported; use 8-bit images")
            target = channels if channels is not None else c
            im = im.convert("L" if target == 1 else "RGB")
            if image_size is not None:
                w, h = im.size
                s = min(w, h)
                left, top = (w - s) // 2, (h - s) // 2
                im = im.crop((left, top, left + s, top + s))
                if s != image_size:
                    im = im.resize((image_size, image_size), Image.BICUBIC, reducing_gap=None)
            arr = np.asarray(im, dtype=np.uint8)
    except ValueError:
        raise
    except Exception as e:  # PIL.UnidentifiedImageError, OSError (truncated) ...
        raise ValueError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from e
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def image_paths(root: str) -> List[str]:
    """The sorted paths of the .png/.jpg/.jpeg files under folder ``root``, found by a walk that reads
    each real directory once (a symlink loop such as ``ln -s . root/x`` is not followed again) and
    stays inside ``root``: symbolic links are followed only when their target lies inside it, and each
    real file is listed once. Links leaving the root are skipped with one warning."""
    import warnings

    real_root = os.path.realpath(root)
    seen_dirs, seen_files, paths, outside = set(), set(), [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs or not _within(real, real_root):
            if not _within(real, real_root):
                outside.append(dirpath)
            dirnames[:] = []  # already walked (a loop or a second link to it), or outside the root
            continue
        seen_dirs.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            if not name.lower().endswith(IMAGE_EXTENSIONS) or not os.path.isfile(p):
                continue
            rp = os.path.realpath(p)
            if not _within(rp, real_root):
                outside.append(p)
            elif rp not in seen_files:
                seen_files.add(rp)
                paths.append(p)
    if outside:
        warnings.warn(f"{root}: skipped {len(outside)} symbolic link(s) leading outside the folder (first: "
                      f"{outside[0]})", stacklevel=3)
    return sorted(paths)


def load_image_folder(root: str, image_size: Optional[int] = None, random_flip: bool = False,
                      channels: Optional[int] = None) -> ImageDataset:
    """All .png/.jpg/.jpeg images under ``root`` (recursive, sorted paths), read with Pillow; symbolic
    links are followed inside ``root`` only, each real directory and file once (:func:`image_paths`).

    If every image lies in a first-level sub-folder, the sorted sub-folder names are the classes.
    """
    _check_options(image_size, channels)
    if not os.path.isdir(root):
        raise ValueError(f"{root}: no such folder")
    paths = image_paths(root)
    if not paths:
        raise ValueError(f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} files, recursively)")
    arrays: List[np.ndarray] = []
    first: Optional[Tuple[str, Tuple[int, ...]]] = None
    for p in paths:
        a = open_image(p, channels, image_size)
        if first is None:
            first = (p, a.shape)
        elif a.shape != first[1]:
            what = "channel counts" if a.shape[:2] == first[1][:2] else "sizes"
            hint = (" (pass channels=1 or 3 to convert)" if what == "channel counts"
                    else " (pass image_size to resize)")
            raise ValueError(
                f"{p}: mixed image {what}: {a.shape[1]}x{a.shape[0]}x{a.shape[2]} (WxHxC) here but "
                f"{first[1][1]}x{first[1][0]}x{first[1][2]} in {first[0]}{hint}"
            )
        arrays.append(a)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    rels = [os.path.relpath(p, root) for p in paths]
    labels = classes = None
    if all(os.sep in r for r in rels):
        tops = [r.split(os.sep, 1)[0] for r in rels]
        classes = sorted(set(tops))
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[t] for t in tops]
    return ImageDataset(images, labels, random_flip=random_flip, classes=classes, source=root)


# ---------------------------------------------------------------------- CIFAR-10 (restricted unpickling)
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"
CIFAR_META = "batches.meta"


class UnsafePickleError(ValueError):
    """A pickle asked for something a CIFAR-10 batch never holds; the file was not loaded."""


def _numpy_reconstructors() -> Tuple[Any, Any]:
    """numpy's own ndarray and scalar reconstruction functions (whatever module numpy keeps them in)."""
    return np.empty(0).__reduce__()[0], np.float64(0).__reduce__()[0]


_NUMERIC_KINDS = "biufc"  # bool, signed/unsigned ints, floats, complex: plain numbers only


def _numeric_dtype(spec: Any, *args: Any) -> np.dtype:
    # Python 2 pickles (the CIFAR-10 files) read with encoding="bytes" give the dtype code as bytes
    code = spec.decode("latin1") if isinstance(spec, bytes) else spec
    try:
        dt = np.dtype(code) if isinstance(code, str) else None
    except TypeError:
        dt = None
    if dt is None or dt.kind not in _NUMERIC_KINDS or dt.fields is not None:
        raise UnsafePickleError(f"a numpy dtype {spec!r} (only numeric dtypes are allowed)")
    return np.dtype(code, *args)


def _array_reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"an array of type {subtype!r} (only numpy.ndarray is allowed)")
    return _numpy_reconstructors()[0](np.ndarray, shape, dtype_code)


def _scalar_reconstruct(dtype: Any, *args: Any) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS:
        raise UnsafePickleError(f"a numpy scalar of dtype {dtype!r} (only numeric dtypes are allowed)")
    return _numpy_reconstructors()[1](dtype, *args)


def _latin1_encode(text: Any, encoding: str = "utf-8") -> bytes:
    # how Python 3's pickle protocol <= 2 writes bytes: _codecs.encode(str, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


_SAFE_GLOBALS = {}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _SAFE_GLOBALS[(_mod, "_reconstruct")] = _array_reconstruct
    _SAFE_GLOBALS[(_mod, "scalar")] = _scalar_reconstruct
_SAFE_GLOBALS[("numpy", "ndarray")] = np.ndarray
_SAFE_GLOBALS[("numpy", "dtype")] = _numeric_dtype
_SAFE_GLOBALS[("_codecs", "encode")] = _latin1_encode


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what the CIFAR-10 python batches hold: dicts, lists, bytes, str, ints and numeric numpy
    arrays (through numpy's reconstruction functions). Any other global (os.system, builtins.eval, any
    class) is refused before it is looked up, so no code in the file runs."""

    def find_class(self, module: str, name: str) -> Any:
        fn = _SAFE_GLOBALS.get((module, name))
        if fn is None:
            raise UnsafePickleError(f"the global {module}.{name}")
        return fn


def safe_load_pickle(path: str) -> Any:
    """Unpickle a CIFAR-10 batch file with :class:`_CifarUnpickler`.

    Raises ValueError naming the file: it is refused (and nothing in it executed) when it references
    anything beyond plain containers and numeric numpy arrays; unreadable when it is truncated/corrupt.
    """
    try:
        with open(path, "rb") as fh:
            return _CifarUnpickler(fh, encoding="bytes").load()
    except UnsafePickleError as e:
        raise UnsafePickleError(
            f"{path}: refused to unpickle {e}; a CIFAR-10 batch holds only dicts, lists, bytes, str, ints "
            "and numeric numpy arrays. The file was not loaded (nothing in it was run)"
        ) from None
    except Exception as e:
        raise ValueError(f"{path}: cannot read the CIFAR-10 batch ({type(e).__name__}: {e})") from e


def _is_cifar_dir(d: str) -> bool:
    """The real layout: batches.meta plus data_batch_1..5 and/or test_batch (exact names)."""
    has = lambda n: os.path.isfile(os.path.join(d, n))  # noqa: E731
    return has(CIFAR_META) and (any(has(n) for n in CIFAR_TRAIN_BATCHES) or has(CIFAR_TEST_BATCH))


def _find_cifar_dir(root: str) -> Optional[str]:
    for d in (root, os.path.join(root, "cifar-10-batches-py")):
        if _is_cifar_dir(d):
            return d
    return None


_CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_classes(d: str) -> List[str]:
    """Class names from batches.meta ("label_names"), read with the restricted unpickler."""
    meta = safe_load_pickle(os.path.join(d, CIFAR_META))
    names = meta.get(b"label_names", meta.get("label_names")) if isinstance(meta, dict) else None
    if isinstance(names, list) and names and all(isinstance(n, (bytes, str)) for n in names):
        return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]
    return list(_CIFAR_CLASSES)


def load_cifar10(root: str, image_size: Optional[int] = None, random_flip: bool = False,
                 channels: Optional[int] = None, split: str = "train") -> ImageDataset:
    """CIFAR-10 from its python batches: ``data_batch_1..5`` (split="train") or ``test_batch`` ("test").

    The folder must have the real layout (``batches.meta`` and the batch files); every file is read
    with a restricted unpickler that refuses anything but plain data (see :func:`safe_load_pickle`).
    """
    _check_options(image_size, channels)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = _find_cifar_dir(root) if os.path.isdir(root) else None
    if d is None:
        raise ValueError(f"{root}: not a CIFAR-10 python batches folder (needs {CIFAR_META} and "
                         f"data_batch_1..5 and/or {CIFAR_TEST_BATCH})")
    names = CIFAR_TRAIN_BATCHES if split == "train" else (CIFAR_TEST_BATCH,)
    files = [os.path.join(d, n) for n in names if os.path.isfile(os.path.join(d, n))]
    if not files:
        raise ValueError(f"{d}: no {' / '.join(names)} files for split={split!r}")
    datas, labels = [], []
    for f in files:
        batch = safe_load_pickle(f)
        try:
            data = np.asarray(batch[b"data"] if b"data" in batch else batch["data"], dtype=np.uint8)
            lab = batch.get(b"labels", batch.get("labels"))
        except Exception as e:
            raise ValueError(f"{f}: cannot read the CIFAR-10 batch ({type(e).__name__}: {e})") from e
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{f}: expected 'data' of shape [N, 3072], got {data.shape}")
        if not isinstance(lab, (list, np.ndarray)) or len(lab) != data.shape[0]:
            raise ValueError(f"{f}: missing or wrong-length 'labels'")
        datas.append(data.reshape(-1, 3, 32, 32))
        labels.extend(int(v) for v in lab)
    images = torch.from_numpy(np.concatenate(datas))
    images = _resize_u8(_convert_channels(images, channels), image_size)
    classes: Optional[List[str]] = _cifar_classes(d)
    if max(labels) >= len(classes):
        classes = None
    return ImageDataset(images, labels, random_flip=random_flip, classes=classes, source=d)


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (MNIST's format), gzip-compressed (.gz) or raw."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except Exception as e:
        raise ValueError(f"{path}: cannot read the IDX file ({type(e).__name__}: {e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    count = int(np.prod(dims))
    if len(raw) - header < count * dtype.itemsize:
        raise ValueError(f"{path}: truncated IDX file: expected {count * dtype.itemsize} data bytes for "
                         f"shape {dims}, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)


def _idx_labels_path(images_path: str) -> Optional[str]:
    d, name = os.path.split(images_path)
    if "images-idx3" not in name:
        return None
    base = name.replace("images-idx3", "labels-idx1")
    for cand in (base, base[:-3] if base.endswith(".gz") else base + ".gz"):
        p = os.path.join(d, cand)
        if os.path.isfile(p):
            return p
    return None


def load_idx(path: str, image_size: Optional[int] = None, random_flip: bool = False,
             channels: Optional[int] = None, labels_path: Optional[str] = None) -> ImageDataset:
    """MNIST / Fashion-MNIST images from an IDX file (``*-images-idx3-ubyte[.gz]``).

    Labels come from ``labels_path``, else from the matching ``*-labels-idx1-ubyte[.gz]`` beside it.
    """
    _check_options(image_size, channels)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    arr = read_idx(path)
    if arr.ndim != 3 or arr.dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 images of shape [N, H, W], got {arr.dtype} {arr.shape}")
    images = _array_to_nchw(arr, path)
    images = _resize_u8(_convert_channels(images, channels), image_size)
    labels = None
    lp = labels_path or _idx_labels_path(path)
    if lp is not None:
        labels = read_idx(lp)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"{lp}: expected {images.shape[0]} labels, got shape {labels.shape}")
        labels = labels.astype(np.int64)
    return ImageDataset(images, labels, random_flip=random_flip, source=path)


def _find_idx_images(root: str, split: str) -> Optional[str]:
    prefix = "train" if split == "train" else "t10k"
    for name in (f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"):
        for cand in (name, name + ".gz"):
            p = os.path.join(root, cand)
            if os.path.isfile(p):
                return p
    return None


def _is_idx_file(path: str) -> bool:
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as fh:
            head = fh.read(4)
    except Exception:
        return False
    return len(head) == 4 and head[0] == 0 and head[1] == 0 and head[2] in _IDX_TYPES


def load_dataset(
    spec: str,
    image_size: Optional[int] = None,
    random_flip: bool = False,
    channels: Optional[int] = None,
    split: str = "train",
) -> ImageDataset:
    """Load a dataset from a spec string.

    Args:
        spec: "digits" (built in), a folder (CIFAR-10 python batches if it has their layout:
            ``batches.meta`` with ``data_batch_1..5`` and/or ``test_batch``;
            MNIST if it holds ``train-images-idx3-ubyte[.gz]``, else a folder of images), an .npz
            file, or an IDX file.
        image_size: resize (centre crop to square + antialiased resize) to this side; None keeps
            the stored size (all images must then share one size).
        random_flip: random left-right flips when serving images.
        channels: None (infer), 1 or 3 (convert).
        split: "train" or "test" for CIFAR-10 / MNIST folders.

    Returns:
        an :class:`ImageDataset` (float [-1, 1] NCHW images).

    Raises:
        ValueError: unknown spec, empty or unreadable input (naming the file), mixed sizes or channels.
    """
    _check_options(image_size, channels)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"spec must be a string (\"digits\" or a path), got {type(spec).__name__}")
    spec = os.fspath(spec)
    if spec == "digits":
        return load_digits(image_size=image_size, random_flip=random_flip, channels=channels)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        if _find_cifar_dir(path) is not None:
            return load_cifar10(path, image_size=image_size, random_flip=random_flip, channels=channels, split=split)
        idx = _find_idx_images(path, split)
        if idx is not None:
            return load_idx(idx, image_size=image_size, random_flip=random_flip, channels=channels)
        return load_image_folder(path, image_size=image_size, random_flip=random_flip, channels=channels)
    if os.path.isfile(path):
        low = path.lower()
        if low.endswith(".npz"):
            return load_npz(path, image_size=image_size, random_flip=random_flip, channels=channels)
        if _is_idx_file(path):
            return load_idx(path, image_size=image_size, random_flip=random_flip, channels=channels)
        raise ValueError(
            f"{path}: unrecognised dataset file (expected an .npz file or an IDX file such as "
            "train-images-idx3-ubyte[.gz])"
        )
    raise ValueError(
        f"dataset {spec!r} not found: expected \"digits\", a folder (images, CIFAR-10 batches or MNIST IDX files), "
        "an .npz file or an IDX file"
    )

"""Images out: samples (float [-1, 1] NCHW tensors) to uint8 arrays, PIL images and image grids.

    images = fast(seed=0)                     # or sampler.sample(...), pipe(...) of fd.load
    fd.to_pil(images)                          # [PIL.Image] like a diffusers pipeline's .images
    fd.to_uint8(images)                        # uint8 NHWC numpy
    fd.save_grid(images, "samples.png", nrow=8)

One quantisation everywhere (these functions, `fastddpm sample`, training snapshots and the
InceptionV3 features' input): u8 = round((clamp(x, -1, 1) + 1) * 127.5), i.e. the 256 levels
x = u8 / 127.5 - 1 that the data loaders serve map back to themselves exactly.
"""
from __future__ import annotations

import os
from typing import Any, List, Optional, Union

import numpy as np
import torch

__all__ = ["quantize", "to_uint8", "to_pil", "make_grid", "image_format", "save_grid", "grid_scale"]


def _check(images: Any) -> torch.Tensor:
    if not torch.is_tensor(images) or images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor [N, C, H, W] in [-1, 1], got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
    return images


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Float [-1, 1] NCHW -> uint8 NCHW tensor on the same device: round((clamp(x, -1, 1) + 1) * 127.5).
    NaN (which would quantise to black) is refused with a ValueError; +-inf clamp like any value."""
    x = _check(images).detach().float()
    nan = torch.isnan(x)
    if bool(nan.any()):
        raise ValueError(f"images hold {int(nan.sum())} NaN values (of {x.numel()}); refusing to write them as "
                         "black pixels (the sampler or model produced NaN)")
    x = x.clamp(-1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float [-1, 1] NCHW images -> uint8 NHWC numpy array (the quantisation of :func:`quantize`)."""
    return quantize(images).permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: torch.Tensor) -> Union[List[Any], Any]:
    """Float [-1, 1] images -> PIL images (mode "L" for one channel, "RGB" for three).

    A batch [N, C, H, W] gives a list of N images (a diffusers pipeline's ``.images``); one image
    [C, H, W] gives one PIL image.
    """
    from PIL import Image

    single = torch.is_tensor(images) and images.ndim == 3
    u8 = to_uint8(images.unsqueeze(0) if single else images)
    if u8.shape[3] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels for PIL, got {u8.shape[3]}")
    out = [Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a) for a in u8]
    return out[0] if single else out


def make_grid(u8_nhwc: np.ndarray, nrow: Optional[int] = None, padding: int = 1, pad_value: int = 0) -> np.ndarray:
    """Tile uint8 NHWC images into one HxWxC array, ``nrow`` images per row (default: ceil(sqrt(N)))."""
    n, h, w, c = u8_nhwc.shape
    if n == 0:
        raise ValueError("make_grid needs at least one image")
    if nrow is None:
        nrow = int(np.ceil(np.sqrt(n)))
    if isinstance(nrow, bool) or not isinstance(nrow, (int, np.integer)) or nrow < 1:
        raise ValueError(f"nrow must be a positive int, got {nrow!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    ncol = int(nrow)
    nrows = -(-n // ncol)
    grid = np.full((padding + nrows * (h + padding), padding + ncol * (w + padding), c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        y0, x0 = padding + r * (h + padding), padding + q * (w + padding)
        grid[y0 : y0 + h, x0 : x0 + w] = u8_nhwc[i]
    return grid


def image_format(path: str) -> str:
    """The Pillow format that `path`'s suffix names ("PNG" for .png, "JPEG" for .jpg, ...); ValueError
    naming the suffixes Pillow can write when it names none."""
    from PIL import Image

    suffix = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"{path}: cannot tell the image format from the suffix {suffix or '(none)'!r}; "
                         "use .png, .jpg, .webp, .bmp or another suffix Pillow writes")
    return fmt


def grid_scale(image_size: int) -> int:
    """The default enlargement of a grid of `image_size`-pixel images: tiles of up to 32 pixels (8x8
    digits are drawn 4x), as ``fastddpm sample`` writes them."""
    return max(1, 32 // int(image_size))


def save_grid(images: torch.Tensor, path: str, nrow: Optional[int] = None, scale: Optional[int] = None,
              padding: int = 1) -> str:
    """Save float [-1, 1] NCHW images as one grid image, ``nrow`` images per row, in the format `path`'s
    suffix names (:func:`image_format`: .png, .jpg, ...); ``scale`` enlarges it (nearest neighbour;
    None: :func:`grid_scale`, what ``fastddpm sample`` writes). Written atomically (temporary file, then
    rename); returns ``path``."""
    from PIL import Image

    if scale is None:
        scale = grid_scale(_check(images).shape[-2])
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    fmt = image_format(path)
    grid = make_grid(to_uint8(images), nrow=nrow, padding=padding)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    im = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp")
    if fmt == "JPEG" and im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    im.save(tmp, format=fmt)
    os.replace(tmp, path)
    return path

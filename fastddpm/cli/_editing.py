"""What `fastddpm inpaint` and `fastddpm img2img` share: reading --image / --mask, writing --out."""
from __future__ import annotations

import argparse
import os
from typing import Any, Optional

from .._names import ETA_SAMPLERS, SAMPLER_NAMES
from ._common import CLIError, add_threads_option

# --mask presets: the region to GENERATE (the rest is kept)
MASK_PRESETS = ("bottom-half", "top-half", "left-half", "right-half", "center")


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, metavar="IMG",
                   help="the image(s): an image file (.png, .jpg, ...) or an .npz with uint8 'images' (NHWC, as "
                        "`fastddpm sample --npz` writes), at the model's size and channels")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="where to write the results: an image grid (.png, .jpg, ...) or an .npz (uint8 'images')")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="a checkpoint directory, run directory or .safetensors file (default: the bundled model)")
    p.add_argument("--num", type=int, default=None, help="use the first N images of --image (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed; image i of a seed does not depend on the batch (default: 0)")
    p.add_argument("--eta", type=float, default=None,
                   help=f"eta in [0, 1] of --sampler {', '.join(ETA_SAMPLERS)} and of inpaint's --method repaint")
    p.add_argument("--class-label", type=int, default=None, help="class-conditional models: the class of every image")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance w (with --class-label)")
    p.add_argument("--no-clip", action="store_true", help="do not clip x0-hat to [-1, 1] at each step")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--scale", type=int, default=4, help="enlarge an image grid by this factor (default: 4)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    add_threads_option(p)


def sampler_option(p: argparse.ArgumentParser, default: Optional[str], extra: str = "") -> None:
    p.add_argument("--sampler", default=default, choices=SAMPLER_NAMES, help=f"default: {default}{extra}")


def read_images(path: str, model: Any, num: Optional[int], flag: str = "--image") -> Any:
    """float [-1, 1] NCHW images from an image file or an .npz; CLIError naming `flag` otherwise."""
    import numpy as np
    import torch

    from ..data import load_npz, open_image

    c, size = int(model.in_channels), int(model.image_size)
    if not os.path.isfile(path):
        raise CLIError(f"{flag} {path}: no such file")
    try:
        if path.lower().endswith(".npz"):
            u8 = load_npz(path, channels=c).images
        else:
            u8 = torch.from_numpy(np.array(open_image(path, c))).permute(2, 0, 1)[None]
        x = u8.to(torch.float32) / 127.5 - 1.0
    except ValueError as e:
        raise CLIError(f"{flag} {e}") from None
    if tuple(x.shape[2:]) != (size, size):
        raise CLIError(f"{flag} {path}: images are {x.shape[2]}x{x.shape[3]}, the model's image_size is {size}x{size}")
    return x[:num] if num else x


def read_mask(spec: str, image: Any) -> Any:
    """A 0/1 mask [N or 1, 1, H, W] (1 = keep) from a preset name or a file (white = keep)."""
    import torch

    n, _, h, w = image.shape
    if spec in MASK_PRESETS:
        m = torch.ones(1, 1, h, w)
        region = {"bottom-half": (slice(h // 2, None), slice(None)), "top-half": (slice(None, h // 2), slice(None)),
                  "left-half": (slice(None), slice(None, w // 2)), "right-half": (slice(None), slice(w // 2, None)),
                  "center": (slice(h // 4, h - h // 4), slice(w // 4, w - w // 4))}[spec]
        m[0, 0][region] = 0
        return m
    if not os.path.isfile(spec):
        raise CLIError(f"--mask {spec}: no such file, and not a preset ({', '.join(MASK_PRESETS)})")
    from types import SimpleNamespace

    m = read_images(spec, SimpleNamespace(in_channels=1, image_size=h), None, "--mask")
    return (m > 0).float()  # white (255 -> 1.0) keeps, black (0 -> -1.0) is generated


def write_output(x: Any, path: str, scale: int) -> None:
    import io

    import numpy as np

    from ..fileio import atomic_write_bytes
    from ..images import save_grid, to_uint8

    if path.lower().endswith(".npz"):
        buf = io.BytesIO()
        np.savez(buf, images=to_uint8(x))
        atomic_write_bytes(path, buf.getvalue())
    else:
        save_grid(x, path, scale=scale)


def check_out(path: str) -> None:
    if not path.lower().endswith(".npz"):
        from ..images import image_format

        try:
            image_format(path)
        except ValueError as e:
            raise CLIError(f"--out {e}") from None


def check_eta(args: argparse.Namespace) -> None:
    """A non-zero --eta with a sampler that takes none is refused, as `fastddpm sample` refuses it."""
    from ..editing import REPLACE_SAMPLER

    if not args.eta or getattr(args, "method", "replace") != "replace":
        return  # inpaint's --method repaint takes eta
    sampler = args.sampler or REPLACE_SAMPLER
    if sampler not in ETA_SAMPLERS:
        raise CLIError(f"--eta applies to --sampler {', '.join(ETA_SAMPLERS)} (and inpaint's --method repaint) "
                       f"only; --sampler {sampler} has no eta (drop --eta, or use --sampler ddim)")


def prepare(args: argparse.Namespace) -> Any:
    """(model, diffusion, images, device, labels) for an editing command; flags checked first."""
    import torch

    from ._common import check_positive, load_model, resolve_device

    check_positive(args, "num", "scale", "steps")
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    if args.eta is not None and not 0.0 <= args.eta <= 1.0:
        raise CLIError(f"--eta must be in [0, 1], got {args.eta}")
    check_eta(args)
    check_out(args.out)
    device = resolve_device(args.device)
    model, diffusion, _ = load_model(args, device)
    images = read_images(args.image, model, args.num).to(device)
    labels = None
    if args.class_label is not None:
        labels = torch.full((images.shape[0],), args.class_label, dtype=torch.int64, device=device)
    elif args.guidance_scale is not None:
        raise CLIError("--guidance-scale needs --class-label")
    return model, diffusion, images, device, labels

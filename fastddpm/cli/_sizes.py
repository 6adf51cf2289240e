"""Size checks the sampling commands make before any work starts: the grid image (``--scale``,
``--nrow``), the images held in memory (``--num``) and one batch's activations (``--batch-size``).

A request that cannot fit is refused with one line naming the flag; a batch that is merely large gets a
one-line note, so that a run that will take gigabytes says so before it takes them.
"""
from __future__ import annotations

import math
import os
import sys
from typing import Any, Dict, Optional

from ._common import CLIError

__all__ = ["available_memory", "grid_bytes", "batch_bytes", "check_sample_sizes", "MAX_GRID_BYTES"]

MAX_GRID_BYTES = 1 << 30  # one grid image: 1 GiB of pixels (Pillow holds it, then the encoder a copy)
NOTE_BYTES = 2 << 30      # a batch estimated above this gets a note on stderr
GIB = float(1 << 30)


def available_memory(device: Any = "cpu") -> Optional[int]:
    """Bytes free for new allocations: the GPU's free memory on CUDA, else MemAvailable (Linux) or the
    physical memory; None when unknown."""
    if str(getattr(device, "type", device)).startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def grid_bytes(num: int, size: int, channels: int, nrow: Optional[int], scale: int, padding: int = 1) -> int:
    """Bytes of the uint8 grid image :func:`fastddpm.images.save_grid` makes of `num` images."""
    ncol = nrow if nrow is not None else math.isqrt(max(num, 1) - 1) + 1  # make_grid's ceil(sqrt(num))
    rows = -(-num // ncol)
    return (padding + rows * (size + padding)) * scale * (padding + ncol * (size + padding)) * scale * channels


def batch_bytes(batch: int, size: int, model_config: Dict[str, Any]) -> int:
    """A generous estimate of one sampling batch's peak memory: the U-Net's widest activations (fp32),
    eight of them alive at once, at full resolution."""
    base = model_config.get("base_channels", 64)
    mults = model_config.get("channel_mults", (1,)) or (1,)
    widest = int(base) * max(int(m) for m in mults)
    return int(batch) * size * size * widest * 4 * 8


def check_sample_sizes(args: Any, size: int, channels: int, model_config: Dict[str, Any], device: Any,
                       grid: bool, images_per_rank: int) -> None:
    """CLIError naming ``--scale`` / ``--num`` / ``--batch-size`` when the request cannot fit."""
    free = available_memory(device)
    held = images_per_rank * size * size * channels
    cpu_free = available_memory("cpu")
    if cpu_free is not None and held > cpu_free:
        raise CLIError(f"--num {args.num}: the images take {held / GIB:.3g} GiB in memory, more than the "
                       f"{cpu_free / GIB:.3g} GiB available; lower --num")
    if grid:
        from ..images import grid_scale

        scale = args.scale if args.scale is not None else grid_scale(size)
        need = grid_bytes(args.num, size, channels, args.nrow, scale)
        if need > MAX_GRID_BYTES:
            raise CLIError(f"--scale {scale} / --num {args.num}: the grid image would take {need / GIB:.3g} GiB (at "
                           f"most {MAX_GRID_BYTES / GIB:g} GiB); lower --scale or --num, or write --npz only")
    batch = min(args.batch_size, max(images_per_rank, 1))
    need = batch_bytes(batch, size, model_config)
    if free is not None and need > free:
        fit = max(1, int(free // max(need // batch, 1)))
        raise CLIError(f"--batch-size {args.batch_size}: one batch needs about {need / GIB:.3g} GiB, more than the "
                       f"{free / GIB:.3g} GiB free; use --batch-size {fit} or less")
    if need > NOTE_BYTES:
        print(f"note: --batch-size {batch} takes about {need / GIB:.3g} GiB per batch", file=sys.stderr)

"""``fastddpm sample``: draw images from a checkpoint (default: the bundled digits model).

    fastddpm sample                                    # 64 digits from the bundled model -> samples.png
    fastddpm sample --sampler ddim --steps 50 --num-images 1000 --batch-size 250 --npz digits.npz
    torchrun --nproc_per_node 2 -m fastddpm sample --num-images 64 --npz out.npz  # each rank samples its share
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from .._names import DEFAULT_DDP_TIMEOUT, DEFAULT_SAMPLER, DEFAULT_SPACING, SAMPLER_NAMES, SPACING_NAMES
from ._common import (CLIError, add_threads_option, check_output, check_positive, check_seed, diffusers_pipeline,
                      load_model, model_and_sampler, resolve_device, sampler_steps, steps_help, write_output)

HELP = "draw samples from a checkpoint (default: the bundled digits model)"

def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="a checkpoint directory, a run directory (its newest checkpoint) or a .safetensors "
                        "file; default: the bundled digits model")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLER_NAMES, help=f"default: {DEFAULT_SAMPLER}")
    p.add_argument("--steps", type=int, default=None,
                   help=steps_help() + "; a distilled checkpoint (`fastddpm distill`): its model calls K, one of "
                   "the counts it holds (default: the largest)")
    p.add_argument("--spacing", default=None, choices=SPACING_NAMES + ("tuned",),
                   help="timestep spacing (default: the checkpoint's tuned schedule for this sampler and step "
                        "count when `fastddpm tune-steps` stored one, else " + ", ".join(
                            f"{v} for {k}" for k, v in DEFAULT_SPACING.items()) + ")")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="precision of the model calls; the sampler state stays fp32 (default: fp32)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity in [0, 1] (default: 0)")
    # --num-images first: torchrun's own parser rejects "--num" (a prefix of its --numa-binding) even
    # after the script name, so DDP commands must spell the long form
    p.add_argument("--num-images", "--num", dest="num", type=int, default=64,
                   help="number of images (default: 64); write --num-images under torchrun")
    p.add_argument("--batch-size", type=int, default=64, help="images per model call (default: 64)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed; image i of a seed is the same whatever the batch size or process count (default: 0)")
    p.add_argument("--out", default=None, metavar="IMAGE",
                   help="write the grid as an image in the format its suffix names (.png, .jpg, .webp, ...; "
                        "default: samples.png when --npz is not given)")
    p.add_argument("--npz", default=None, metavar="NPZ", help="write the images as uint8 NHWC array 'images'")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: ceil(sqrt(num)))")
    p.add_argument("--scale", type=int, default=None,
                   help="enlarge the grid by this integer factor (default: up to 32-pixel tiles)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--class-label", type=int, default=None,
                   help="class-conditional models: draw this class (default: cycle through the classes)")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="classifier-free guidance scale w for class-conditional models (1: plain conditional)")
    p.add_argument("--no-clip", action="store_true", help="do not clip x0-hat to [-1, 1] at each step")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar (rank 0)")
    p.add_argument("--ddp-timeout", type=float, default=DEFAULT_DDP_TIMEOUT, metavar="SECONDS",
                   help="under torchrun: how long a process waits for a dead or stalled peer (default: 300)")
    add_threads_option(p)


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from ..dist_util import ddp_failure, dist_info, join_process_group

    out_png = _check_args(args)
    rank, world, local_rank = dist_info()
    device = resolve_device(args.device, local_rank)
    if not args.ddp_timeout > 0:
        raise CLIError(f"--ddp-timeout must be > 0 seconds, got {args.ddp_timeout}")
    own_group = join_process_group(world, device, args.ddp_timeout)
    distributed = world > 1 and dist.is_initialized()
    if not distributed:
        world, rank = 1, 0
    try:
        job = _prepare(args, device)
        # this rank's contiguous share of the global image indices
        per = -(-args.num // world)
        start, stop = min(rank * per, args.num), min((rank + 1) * per, args.num)
        from ._sizes import check_sample_sizes

        check_sample_sizes(args, job.size, job.channels, job.model_config, device, grid=bool(out_png) and rank == 0,
                           images_per_rank=args.num if rank == 0 else stop - start)
        t0 = time.perf_counter()
        images, labels = _sample_share(args, job, start, stop, device, show=args.progress and rank == 0)
        elapsed = time.perf_counter() - t0
        if distributed:
            images, labels = _gather(images, labels, rank, world)
        if rank == 0:
            _write(args, out_png, images, labels, job, f"{elapsed:.1f} s" + (f" on rank 0 of {world}" if world > 1
                                                                           else ""))
        if distributed:
            dist.barrier()
    except Exception as e:
        err = ddp_failure(e, rank, world, args.ddp_timeout) if distributed else e
        if err is not e:  # a dead or stalled peer: one line naming it
            raise err from e
        raise
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _check_args(args: argparse.Namespace) -> Optional[str]:
    """Every check that needs no model, before anything is loaded; returns the grid image to write (or None)."""
    check_positive(args, "num", "batch_size", "steps", "scale", "nrow")
    check_eta_guidance(args)
    check_seed(args)
    check_output("--out", args.out)
    check_output("--npz", args.npz)
    out_png = args.out if (args.out or args.npz) else "samples.png"
    if out_png:
        from ..images import image_format

        try:
            image_format(out_png)  # refuse a suffix that names no image format before sampling
        except ValueError as e:
            raise CLIError(f"--out {e}") from None
    return out_png


@dataclass
class _Job:
    """What sampling needs from the checkpoint: the model (in --dtype), its sampler and image shape."""

    model: Any
    sampler: Any
    model_config: Dict[str, Any]
    size: int
    channels: int
    num_classes: Optional[int]


def _prepare(args: argparse.Namespace, device: Any) -> _Job:
    """Load the checkpoint, choose its sampler (a tuned schedule where `fastddpm tune-steps` stored one) and
    check the class options against the model."""
    from .. import checkpoint as ckpt
    from ..precision import reduced_precision
    from ..tune import sampler_for_checkpoint

    model, diffusion, config = load_model(args, device)
    mc = config["model"]
    num_classes = mc.get("num_classes")
    # where `fastddpm tune-steps` stored its schedules
    ck_path = args.checkpoint if diffusers_pipeline(args.checkpoint) else ckpt.resolve_checkpoint(args.checkpoint)
    if not num_classes and args.guidance_scale != 1.0:
        raise CLIError(f"--guidance-scale {args.guidance_scale} needs a class-conditional model; this one has no "
                       "classes (leave it at 1)")
    model, sampler = model_and_sampler(args, model, diffusion, config, lambda: sampler_for_checkpoint(
        ck_path, diffusion, args.sampler, sampler_steps(args.sampler, args.steps, diffusion), args.spacing,
        eta=args.eta))
    model = reduced_precision(model, args.dtype)
    if args.class_label is not None:
        if not num_classes:
            raise CLIError("--class-label needs a class-conditional model; this one has no classes")
        if not 0 <= args.class_label < num_classes:
            raise CLIError(f"--class-label must be in [0, {num_classes}), got {args.class_label}")
    return _Job(model, sampler, mc, int(mc["image_size"]), int(mc["in_channels"]), num_classes)


def _sample_share(args: argparse.Namespace, job: _Job, start: int, stop: int, device: Any,
                  show: bool) -> Tuple[Any, Optional[Any]]:
    """Images start..stop-1 of the seed as uint8 NHWC (and their class labels for a class-conditional model)."""
    import numpy as np
    import torch

    from ..images import to_uint8

    labels_all = None
    if job.num_classes:
        labels_all = (torch.full((args.num,), args.class_label, dtype=torch.int64) if args.class_label is not None
                      else torch.arange(args.num, dtype=torch.int64) % job.num_classes)
    nbatches = -(-(stop - start) // args.batch_size) if stop > start else 0
    outer = None
    if show and nbatches > 1:
        from tqdm.auto import tqdm

        outer = tqdm(total=stop - start, desc=f"sampling ({args.sampler}, {job.sampler.num_steps} steps)",
                     unit="img", file=sys.stderr)
    chunks, label_chunks = [], []
    with torch.no_grad():
        for b0 in range(start, stop, args.batch_size):
            b1 = min(b0 + args.batch_size, stop)
            net = job.model
            if labels_all is not None:
                label_chunks.append(labels_all[b0:b1].numpy())
                net = _labelled(job, labels_all[b0:b1].to(device), args.guidance_scale)
            x = job.sampler.sample(net, (b1 - b0, job.channels, job.size, job.size), seed=args.seed, image_offset=b0,
                                   clip_denoised=not args.no_clip, progress=show and nbatches == 1, device=device)
            chunks.append(to_uint8(x))
            if outer is not None:
                outer.update(b1 - b0)
    if outer is not None:
        outer.close()
    images = np.concatenate(chunks) if chunks else np.zeros((0, job.size, job.size, job.channels), np.uint8)
    return images, (np.concatenate(label_chunks) if label_chunks else None)


def _labelled(job: _Job, y: Any, guidance_scale: float) -> Any:
    """The model with class labels y bound (and classifier-free guidance at `guidance_scale` when it is not 1)."""
    if guidance_scale == 1.0:
        return _WithLabels(job.model, y)
    from ..guidance import GuidedModel

    return GuidedModel(job.model, y, guidance_scale, null_label=job.num_classes, channels=job.channels)


def _gather(images: Any, labels: Optional[Any], rank: int, world: int) -> Tuple[Any, Optional[Any]]:
    """Every rank's share on rank 0, in rank order (other ranks get their own share back)."""
    import numpy as np
    import torch.distributed as dist

    gathered: List[Any] = [None] * world if rank == 0 else None
    dist.gather_object((images, labels), gathered, dst=0)
    if rank != 0:
        return images, labels
    images = np.concatenate([g[0] for g in gathered])
    if labels is not None:
        labels = np.concatenate([g[1] for g in gathered if g[1] is not None])
    return images, labels


def _write(args: argparse.Namespace, out_png: Optional[str], images: Any, labels: Optional[Any], job: _Job,
           timing: str) -> None:
    """Write --npz and the grid image (atomically, errors naming the flag) and print one summary line."""
    import numpy as np
    import torch

    from ..fileio import atomic_write_bytes
    from ..images import grid_scale, save_grid

    assert images.shape[0] == args.num
    written = []
    if args.npz:
        import io

        buf = io.BytesIO()
        np.savez(buf, images=images, **({"labels": labels} if labels is not None else {}))
        write_output("--npz", args.npz, lambda: atomic_write_bytes(args.npz, buf.getvalue()))
        written.append(args.npz)
    if out_png:
        scale = args.scale if args.scale is not None else grid_scale(job.size)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        write_output("--out", out_png, lambda: save_grid(x, out_png, nrow=args.nrow, scale=scale))
        written.append(out_png)
    print(f"{args.num} images ({args.sampler}, {job.sampler.num_steps} steps, {job.sampler.spacing} spacing, "
          f"{args.dtype}, {timing}) -> {', '.join(written)}")


def check_eta_guidance(args: argparse.Namespace) -> None:
    """CLIError for an --eta outside [0, 1] or given to a sampler without one, and a non-finite --guidance-scale."""
    import math

    if not 0.0 <= args.eta <= 1.0:
        raise CLIError(f"--eta must be in [0, 1], got {args.eta}")
    if args.eta != 0.0 and args.sampler != "ddim":
        raise CLIError(f"--eta applies to --sampler ddim only; --sampler {args.sampler} has no eta (drop --eta, or "
                       "use --sampler ddim, or an -sde sampler for stochastic sampling)")
    if not math.isfinite(getattr(args, "guidance_scale", 1.0)):
        raise CLIError(f"--guidance-scale must be a finite number, got {args.guidance_scale}")


class _WithLabels:
    """model(x, t) -> model(x, t, y=labels) (plain class-conditional sampling)."""

    def __init__(self, model: Any, y: Any):
        self.model, self.y = model, y

    def parameters(self):
        return self.model.parameters()

    def __call__(self, x: Any, t: Any) -> Any:
        return self.model(x, t, y=self.y)

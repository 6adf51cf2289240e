"""``fastddpm nll``: bits/dim of a dataset under a checkpoint.

    fastddpm nll --checkpoint runs/digits --data digits --part heldout --json bpd.json

Reports the full variational bound in bits/dim (prior + T terms; T model calls per image) averaged over
the images, with its standard error, as one line (every figure as JSON with ``--json FILE``).
"""
from __future__ import annotations

import argparse
import time

from ._common import CLIError, check_positive, load_model, resolve_device, write_json
from .eval import add_common_options, data_part

HELP = "bits/dim of a dataset under a checkpoint (full variational bound, with its standard error)"


def configure(p: argparse.ArgumentParser) -> None:
    """Add the ``nll`` arguments to a parser."""
    add_common_options(p)
    p.add_argument("--data", default="digits", metavar="SPEC",
                   help='images: "digits" (default), a folder, an .npz, CIFAR-10 / MNIST files')
    p.add_argument("--part", default=None, choices=("all", "train", "heldout"),
                   help="for --data digits: which part of the fixed split (default: heldout)")
    p.add_argument("--num", type=int, default=None, help="use the first N images (default: all)")


def run(args: argparse.Namespace) -> int:
    """``fastddpm nll``: bits/dim of ``--data`` under the checkpoint; prints JSON."""
    from .. import checkpoint as ckpt
    from ..evaluate import nll_over_dataset

    check_positive(args, "num", "batch_size")
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    device = resolve_device(args.device)
    model, diffusion, config = load_model(args, device)
    if config["model"].get("num_classes"):
        from ..guidance import Conditioned

        model = Conditioned(model, None)  # unconditional bound (null class)
    t0 = time.perf_counter()
    res = nll_over_dataset(diffusion, model, args.data, batch_size=args.batch_size, num=args.num,
                           part=data_part(args, args.data), seed=args.seed, device=device, progress=args.progress)
    res.update({"checkpoint": ckpt.resolve_checkpoint(args.checkpoint), "data": args.data,
                "part": data_part(args, args.data), "seed": args.seed,
                "seconds": round(time.perf_counter() - t0, 2)})
    write_json(res, args.json)
    print(f"{res['bpd']:.3f} +- {res['stderr']:.3f} bits/dim (standard error) over {res['num']} images of "
          f"{args.data} ({res['part']}); prior {res['prior_bpd']:.4f}, decoder {res['decoder_bpd']:.3f} bits/dim; "
          f"{res['seconds']:.1f} s" + (f"; all figures: {args.json}" if args.json else ""))
    return 0

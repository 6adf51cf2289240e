"""``fastddpm eval`` (and the options ``fastddpm nll`` shares): sample quality (FID / KID / IS / precision-recall) and bits/dim.

    fastddpm eval                                              # bundled model, dpm++ 20 steps, 1000 samples,
                                                               #   digits-FID/KID/IS/PR vs the held-out digits
    fastddpm eval --checkpoint runs/cifar --sampler ddim --steps 50 --num 50000 --batch-size 500 \\
        --data cifar-10-batches-py --features inception --ref-stats cifar_train_inception.npz --json fid.json
    fastddpm nll --checkpoint runs/digits --data digits --part heldout --json bpd.json

``eval`` compares samples with a reference: ``--data`` (real images; their statistics are computed,
and written to ``--ref-stats`` when that is also given, then reused) or ``--ref-stats`` alone (an .npz
of cached statistics). Without either, the bundled digits held-out split is the reference. Samples
are streamed from the sampler batch by batch (image i of a seed does not depend on the batch size).
``--features digits`` (default) is the shipped offline digits classifier, for 8x8 one-channel
images; ``--features inception`` is the FID InceptionV3 that papers report (pytorch-fid's network and
preprocessing, its weights downloaded once into the torch hub cache or given by --inception-weights).
``--ref-stats`` also takes published statistics as they are (pytorch-fid's / clean-fid's .npz with
mu and sigma: then only FID and IS are computed unless --metrics says otherwise), or real images (a
folder, an image .npz, CIFAR-10 batches) whose statistics are computed once and cached
($FASTDDPM_CACHE, default ~/.cache/fastddpm). ``--stats-only`` stops after the reference statistics.

``nll`` reports the full variational bound in bits/dim (prior + T terms; T model calls per image)
averaged over the images, with its standard error.

Both print a JSON object (and write it to ``--json``).
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any

from .._names import SAMPLER_NAMES
from ._common import CLIError, check_positive, emit_json, resolve_device

HELP = "sample quality: FID / KID / IS / precision-recall of a checkpoint's samples against real data"


def add_common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="a checkpoint directory, a run directory (its newest checkpoint) or a .safetensors file; "
                        "default: the bundled digits model")
    p.add_argument("--batch-size", type=int, default=250, help="images per batch (default: 250)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the result JSON here")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")


def configure(p: argparse.ArgumentParser) -> None:
    """Add the ``eval`` arguments to a parser."""
    add_common_options(p)
    p.add_argument("--sampler", default="dpm++", choices=SAMPLER_NAMES, help="default: dpm++")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: 20 for dpm++, 50 for ddim, all T for ddpm)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity in [0, 1] (default: 0)")
    p.add_argument("--num", type=int, default=1000, help="number of samples (default: 1000)")
    p.add_argument("--data", default=None, metavar="SPEC",
                   help='reference images: "digits", a folder, an .npz, CIFAR-10 / MNIST files '
                        "(default with no --ref-stats: digits, held-out part)")
    p.add_argument("--part", default=None, choices=("all", "train", "heldout"),
                   help="for --data digits: which part of the fixed split (default: heldout)")
    p.add_argument("--ref-stats", default=None, metavar="NPZ|DATA",
                   help="reference statistics: an .npz (fastddpm's, pytorch-fid's or clean-fid's) read as it is; "
                        "with --data, a path to write the statistics of --data to (read when it exists); or real "
                        "images (folder, image .npz, CIFAR-10) whose statistics are computed once and cached")
    p.add_argument("--stats-only", action="store_true",
                   help="compute (or read) the reference statistics, print their summary and stop (no sampling)")
    p.add_argument("--features", default="digits", metavar="NAME",
                   help="feature extractor: digits (shipped, offline) or inception (the FID InceptionV3 of the papers)")
    p.add_argument("--inception-weights", default=None, metavar="PTH",
                   help="--features inception: a local copy of pt_inception-2015-12-05-6726825d.pth "
                        "(default: the torch hub cache, downloaded there once)")
    p.add_argument("--metrics", default=None,
                   help="comma-separated subset of fid,kid,is,pr (default: all; fid,is for a reference that has "
                        "only mu and sigma)")
    p.add_argument("--max-keep", type=int, default=10_000,
                   help="raw feature vectors kept per set for KID / precision-recall (default: 10000)")
    p.add_argument("--no-clip", action="store_true", help="do not clip x0-hat to [-1, 1] at each step")


def data_part(args: argparse.Namespace, data: str) -> str:
    if args.part is not None:
        if args.part != "all" and data != "digits":
            raise CLIError(f"--part {args.part} is only defined for --data digits")
        return args.part
    return "heldout" if data == "digits" else "all"



def run(args: argparse.Namespace) -> int:
    """``fastddpm eval``: sample ``--num`` images and compare them with the reference; prints JSON."""
    from .. import checkpoint as ckpt
    from ..evaluate import METRICS, evaluate_samples, is_stats_file, reference_from, sample_batches
    from ..features import EXTRACTORS, get_extractor
    from ..train import _make_sampler

    check_positive(args, "num", "batch_size", "steps", "max_keep")
    if args.features not in EXTRACTORS:
        raise CLIError(f"--features must be one of {', '.join(EXTRACTORS)}, got {args.features!r}")
    metrics = tuple(m.strip() for m in (args.metrics or ",".join(METRICS)).split(",") if m.strip())
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise CLIError(f"--metrics must be a comma-separated subset of {','.join(METRICS)}, got {args.metrics!r}")
    if not 0.0 <= args.eta <= 1.0:
        raise CLIError(f"--eta must be in [0, 1], got {args.eta}")
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    if args.ref_stats and not args.data and not os.path.exists(args.ref_stats):
        raise CLIError(f"--ref-stats {args.ref_stats}: no such file (give --data to compute and write it)")
    if args.data and args.ref_stats and os.path.exists(args.ref_stats) and not is_stats_file(args.ref_stats):
        raise CLIError(f"--ref-stats {args.ref_stats} with --data: must be a statistics .npz to read or write")
    device = resolve_device(args.device)

    try:
        kw = {"weights_path": args.inception_weights} if args.features == "inception" else {}
        extractor = get_extractor(args.features, device=device, **kw)
    except (ImportError, OSError, RuntimeError, ValueError) as e:  # no weights offline, a bad checksum
        raise CLIError(str(e)) from e

    # the reference: --data (statistics written to --ref-stats when given), a statistics .npz, or real
    # images named by --ref-stats (statistics cached); by default the digits' held-out part
    t0 = time.perf_counter()
    data = args.data if args.data is not None else (
        args.ref_stats if args.ref_stats and not is_stats_file(args.ref_stats) else None)
    if data is None and args.ref_stats is None:
        data = "digits"
    if data is None:
        ref: Any = reference_from(args.ref_stats, extractor)
    else:
        ref = reference_from(data, extractor, part=data_part(args, data), batch_size=args.batch_size,
                             max_keep=args.max_keep, progress=args.progress,
                             cache=args.ref_stats if args.data else args.ref_stats is not None)
    if args.stats_only:
        emit_json({"reference": ref.source, "reference_count": ref.count, "features": ref.extractor,
                   "dim": int(ref.mu.shape[0]), "raw_features_kept": 0 if ref.features is None else len(ref.features),
                   "seconds": round(time.perf_counter() - t0, 2)}, args.json)
        return 0
    if args.metrics is None and ref.features is None:  # published statistics: mu and sigma only
        metrics = tuple(m for m in metrics if m not in ("kid", "pr"))
    model, diffusion, config = ckpt.load_model(args.checkpoint, use_ema=not args.no_ema, device=device)
    mc = config["model"]
    size, channels, num_classes = int(mc["image_size"]), int(mc["in_channels"]), mc.get("num_classes")
    if args.features == "digits" and (size, channels) != (8, 1):
        raise CLIError(f"--features digits needs 8x8 one-channel images; this model makes {channels}x{size}x{size} "
                     "(use --features inception)")
    sampler = _make_sampler(args.sampler, diffusion, args.steps, eta=args.eta)

    batches = sample_batches(model, sampler, args.num, args.batch_size, (channels, size, size), seed=args.seed,
                             device=device, clip_denoised=not args.no_clip, progress=args.progress,
                             num_classes=num_classes)
    result = evaluate_samples(batches, extractor, ref, metrics=metrics, num=args.num, max_keep=args.max_keep,
                              seed=args.seed, progress=False, is_splits=min(10, args.num))
    result.update({
        "checkpoint": ckpt.resolve_checkpoint(args.checkpoint),
        "sampler": args.sampler,
        "steps": sampler.num_steps,
        "eta": args.eta if args.sampler == "ddim" else None,
        "seed": args.seed,
        "seconds": round(time.perf_counter() - t0, 2),
    })
    emit_json(result, args.json)
    return 0

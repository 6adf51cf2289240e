"""``fastddpm eval`` (and the options ``fastddpm nll`` shares): sample quality (FID / KID / IS / precision-recall) and bits/dim.

    fastddpm eval                                              # bundled model, unipc 10 steps, 1000 samples, 
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

``eval`` prints a short table (metric, value, unit, sample counts, and the note that FID / KID depend
on the sample count); ``nll`` prints one line. ``--json FILE`` writes every figure as JSON.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any, Dict, List, Optional, Tuple

from .._names import DEFAULT_SAMPLER, SAMPLER_NAMES
from ._common import (CLIError, add_threads_option, check_output, check_positive, check_seed, load_model,
                      model_and_sampler, resolve_device, sampler_steps, steps_help, write_json)

HELP = "sample quality: FID / KID / IS / precision-recall of a checkpoint's samples against real data"


def add_common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="a checkpoint directory, a run directory (its newest checkpoint) or a .safetensors file; "
                        "default: the bundled digits model")
    p.add_argument("--batch-size", type=int, default=250, help="images per batch (default: 250)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--json", default=None, metavar="FILE", help="write every figure of the result as JSON here")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    add_threads_option(p)


def configure(p: argparse.ArgumentParser) -> None:
    """Add the ``eval`` arguments to a parser."""
    add_common_options(p)
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLER_NAMES, help=f"default: {DEFAULT_SAMPLER}")
    p.add_argument("--steps", type=int, default=None, help=steps_help())
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity in [0, 1] (default: 0)")
    p.add_argument("--num", type=int, default=1000, help="number of samples (default: 1000)")
    p.add_argument("--data", default=None, metavar="SPEC",
                   help='reference images: "digits", a folder, an .npz, CIFAR-10 / MNIST files '
                        "(default with no --ref-stats: digits, held-out part)")
    p.add_argument("--part", default=None, choices=("all", "train", "heldout"),
                   help="for --data digits: which part of the fixed split (default: heldout)")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="resize --data (centre crop + antialiased resize) to this side, as `fastddpm train "
                        "--image-size` does (default: as stored)")
    p.add_argument("--channels", type=int, default=None, choices=(1, 3),
                   help="convert --data to 1 or 3 channels, as `fastddpm train --channels` does (default: as stored)")
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
    from ..samplers import make_sampler

    check_positive(args, "num", "batch_size", "steps", "max_keep")
    if args.features not in EXTRACTORS:
        raise CLIError(f"--features must be one of {', '.join(EXTRACTORS)}, got {args.features!r}")
    metrics = tuple(m.strip() for m in (args.metrics or ",".join(METRICS)).split(",") if m.strip())
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise CLIError(f"--metrics must be a comma-separated subset of {','.join(METRICS)}, got {args.metrics!r}")
    from .sample import check_eta_guidance

    check_eta_guidance(args)
    check_seed(args)
    check_output("--json", args.json)
    if args.ref_stats and not args.data and not os.path.exists(args.ref_stats):
        raise CLIError(f"--ref-stats {args.ref_stats}: no such file (give --data to compute and write it)")
    if args.data and args.ref_stats and os.path.exists(args.ref_stats) and not is_stats_file(args.ref_stats):
        raise CLIError(f"--ref-stats {args.ref_stats} with --data: must be a statistics .npz to read or write")
    device = resolve_device(args.device)

    try:
        kw = {"weights_path": args.inception_weights} if args.features == "inception" else {}
        extractor = get_extractor(args.features, device=device, **kw)
    except (ImportError, OSError, RuntimeError, ValueError) as e:  # no weights offline, a bad checksum
        raise CLIError(str(e).replace("weights_path=", "--inception-weights").replace("weights_path", "--inception-weights")) from None

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
        spec, part = reference_data(args, data)  # --image-size / --channels convert it as train does
        ref = reference_from(spec, extractor, part=part, batch_size=args.batch_size,
                             max_keep=args.max_keep, progress=args.progress,
                             cache=args.ref_stats if args.data else args.ref_stats is not None)
    if args.stats_only:
        summary = {"reference": ref.source, "reference_count": ref.count, "features": ref.extractor,
                   "dim": int(ref.mu.shape[0]), "raw_features_kept": 0 if ref.features is None else len(ref.features),
                   "seconds": round(time.perf_counter() - t0, 2)}
        write_json(summary, args.json)
        print(f"reference statistics: {summary['reference']} ({summary['reference_count']} images, "
              f"{summary['features']} features, dim {summary['dim']}; {summary['seconds']} s)"
              + (f" -> {args.json}" if args.json else ""))
        return 0
    if args.metrics is None and ref.features is None:  # published statistics: mu and sigma only
        metrics = tuple(m for m in metrics if m not in ("kid", "pr"))
    model, diffusion, config = load_model(args, device)
    mc = config["model"]
    size, channels, num_classes = int(mc["image_size"]), int(mc["in_channels"]), mc.get("num_classes")
    if args.features == "digits" and (size, channels) != (8, 1):
        raise CLIError(f"--features digits needs 8x8 one-channel images; this model makes {channels}x{size}x{size} "
                     "(use --features inception)")
    model, sampler = model_and_sampler(args, model, diffusion, config, lambda: make_sampler(
        args.sampler, diffusion, sampler_steps(args.sampler, args.steps, diffusion), eta=args.eta))

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
    write_json(result, args.json)
    print(format_report(result, args.json))
    return 0


def reference_data(args: argparse.Namespace, data: str) -> Tuple[Any, str]:
    """(data, part) for :func:`fastddpm.evaluate.reference_stats`: the ``--data`` spec as it is, or,
    with ``--image-size`` / ``--channels``, its images converted as ``fastddpm train`` converts them
    (the ``--part`` of the digits split taken here)."""
    part = data_part(args, data)
    size, channels = getattr(args, "image_size", None), getattr(args, "channels", None)
    if size is None and channels is None:
        return data, part
    check_positive(args, "image_size")
    from ..evaluate import load_images

    return load_images(data, part, image_size=size, channels=channels), "all"


def _pm(mean: float, std: Optional[float], digits: int = 2) -> str:
    return f"{mean:.{digits}f}" + (f" +- {std:.{digits}g}" if std is not None and math.isfinite(std) else "")


def format_report(result: Dict[str, Any], json_path: Optional[str] = None) -> str:
    """The table ``fastddpm eval`` prints: one row per figure in `result` (metric, value, unit), the
    sample counts, and the note that FID / KID are only comparable at equal sample counts."""
    n, ref_n = result.get("num_samples"), result.get("reference_count")
    feats = result.get("features", "?")
    rows: List[Tuple[str, str, str]] = []
    if "fid" in result:
        rows.append(("FID", f"{result['fid']:.2f}", f"Frechet distance of {feats} features; lower is better"))
    if "kid_mean" in result:
        rows.append(("KID", _pm(result["kid_mean"], result.get("kid_std"), 3),
                     "MMD^2, cubic polynomial kernel, as computed (not x1000); mean +- std over subsets"))
    if "is_mean" in result:
        rows.append(("IS", _pm(result["is_mean"], result.get("is_std")),
                     "Inception Score of the classifier's softmax; higher is better"))
    if "precision" in result:
        rows.append(("precision / recall", f"{result['precision']:.3f} / {result['recall']:.3f}",
                     f"k-NN manifolds, k = {result.get('pr_k', '?')}; fraction in [0, 1]"))
    if "confidence_rate" in result:
        real = result.get("ref_confidence_rate")
        rows.append(("confident samples", f"{result['confidence_rate']:.3f}",
                     "fraction with max class probability >= 0.9" + (f" (real: {real:.3f})" if real is not None else "")))
    if "class_fraction_min" in result:
        k = len(result.get("class_fractions") or []) or None
        rows.append(("class share min / max", f"{result['class_fraction_min']:.3f} / {result['class_fraction_max']:.3f}",
                     "fraction of samples per predicted class" + (f" (uniform: {1 / k:.3f})" if k else "")))
    w0, w1 = max(len(r[0]) for r in rows + [("metric", "", "")]), max(len(r[1]) for r in rows + [("", "value", "")])
    lines = []
    steps = f", {result['steps']} steps" if result.get("steps") is not None else ""
    lines.append(f"{result.get('checkpoint', '?')}: {result.get('sampler', '?')}{steps}, seed {result.get('seed', 0)}; "
                 f"{n} samples vs {ref_n if ref_n is not None else '?'} reference images ({result.get('reference', '?')})"
                 + (f", {result['seconds']:.1f} s" if "seconds" in result else ""))
    lines.append(f"{'metric':<{w0}}  {'value':>{w1}}  unit / meaning")
    lines += [f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows]
    lines.append(f"note: FID and KID depend on the number of samples (FID is biased upward at small counts): "
                 f"compare only runs with the same --num ({n} here) and the same reference and features.")
    lines.append(f"all figures: {json_path}" if json_path else "all figures as JSON: --json FILE")
    return "\n".join(lines)

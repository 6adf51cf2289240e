"""``fastddpm tune-steps``: tune a sampler's timesteps for a checkpoint and store them with it.

    fastddpm tune-steps --sampler unipc --steps 10                 # the bundled digits model
    fastddpm tune-steps --checkpoint runs/digits --sampler dpm++ --steps 6,8,10

For each step count, `fastddpm.tune.tune_timesteps` searches the timesteps at which the sampler best
reproduces a high-step ODE solution from the same x_T (checked on fresh x_T) and the result is added
to the checkpoint's sidecar file (``X.schedules.json`` beside ``X.safetensors``, ``schedules.json`` in
a checkpoint directory). `fastddpm sample` then uses it by default for that sampler and step count.
"""
from __future__ import annotations

import argparse

from .._names import DEFAULT_SAMPLER, DETERMINISTIC_SAMPLERS
from ._common import (CLIError, add_threads_option, apply_threads, check_output, check_positive, check_seed,
                      check_weights, count_parameters, resolve_device, write_json)

HELP = "tune a sampler's timesteps for a checkpoint (stored with it; used by `fastddpm sample`)"


def configure(p: argparse.ArgumentParser) -> None:
    """Add the ``tune-steps`` arguments to a parser."""
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="a checkpoint directory, a run directory or a .safetensors file (default: the bundled model)")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, help=f"one of {', '.join(DETERMINISTIC_SAMPLERS)} (default: {DEFAULT_SAMPLER})")
    p.add_argument("--steps", default="10", help="model calls per image, or a comma-separated list (default: 10)")
    p.add_argument("--num-samples", type=int, default=256, help="x_T used by the search (default: 256)")
    p.add_argument("--val-samples", type=int, default=256, help="fresh x_T for the validation check (default: 256)")
    p.add_argument("--reference-steps", type=int, default=200,
                   help="DPM-Solver++ logSNR steps of the reference solution (default: 200)")
    p.add_argument("--max-rounds", type=int, default=4, help="step fractions of the descent (default: 4)")
    p.add_argument("--keep-last", action="store_true",
                   help="start from the trailing spacing and keep its last timestep (tune only the path to it)")
    p.add_argument("--max-seconds", type=float, default=600.0, help="time bound per step count (default: 600)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tuning x_T (validation: seed + 1)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--dry-run", action="store_true", help="report, do not store")
    p.add_argument("--no-ema", action="store_true", help="tune for the raw weights instead of the EMA weights")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report here")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="print the search")
    add_threads_option(p)


def run(args: argparse.Namespace) -> int:
    """``fastddpm tune-steps``: tune, store, print a JSON report."""
    import sys

    from .. import build
    from .. import checkpoint as ckpt
    from ..spacing import make_timesteps
    from ..tune import save_tuned_schedule, tune_timesteps

    if args.sampler not in DETERMINISTIC_SAMPLERS:
        raise CLIError(f"--sampler must be one of {DETERMINISTIC_SAMPLERS} (deterministic samplers), got {args.sampler!r}")
    try:
        steps = [int(s) for s in str(args.steps).split(",")]
    except ValueError:
        raise CLIError(f"--steps must be an int or a comma-separated list of ints, got {args.steps!r}") from None
    if any(s < 2 for s in steps):
        raise CLIError(f"--steps must be >= 2, got {args.steps}")
    check_positive(args, "num_samples", "val_samples", "reference_steps", "max_rounds", "batch_size")
    if not args.max_seconds > 0:  # also refuses NaN
        raise CLIError(f"--max-seconds must be a number of seconds > 0, got {args.max_seconds}")
    check_seed(args)
    check_output("--json", args.json)
    device = resolve_device(args.device)
    path = ckpt.resolve_checkpoint(args.checkpoint)
    model, diffusion, config = build.load_model(path, use_ema=not args.no_ema, device=device)
    check_weights(model, path)
    apply_threads(args.threads, count_parameters(model), device)
    if config["model"].get("num_classes"):
        raise CLIError("tune-steps supports unconditional models only")
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.progress else None
    cache: dict = {}
    report = {"checkpoint": path, "sampler": args.sampler, "results": []}
    for n in steps:
        init = make_timesteps(diffusion.schedule, n, "trailing") if args.keep_last else None
        r = tune_timesteps(model, diffusion, args.sampler, n, num_samples=args.num_samples, val_samples=args.val_samples,
                           reference_steps=args.reference_steps, seed=args.seed, max_rounds=args.max_rounds,
                           max_seconds=args.max_seconds, batch_size=args.batch_size, cache=cache, init=init,
                           keep_last=args.keep_last, log=log)
        if args.keep_last:
            r.initial_spacing = "trailing"
        entry = r.to_dict()
        if not args.dry_run:
            entry["stored_in"] = save_tuned_schedule(path, r, extra={"weights": "raw" if args.no_ema else "ema"})
        report["results"].append(entry)
    import json

    write_json(report, args.json)
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0

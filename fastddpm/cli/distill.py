"""``fastddpm distill``: few-call students of a trained model, data-free (`fastddpm.distillation`).

    fastddpm distill --calls 1,2,4 --steps 2000 --out-dir runs/distill          # the bundled digits model
    fastddpm distill --checkpoint runs/cifar --calls 2,4 --steps 20000 --out-dir runs/cifar-distill
    fastddpm distill ... --resume                                                # continue exactly
    fastddpm sample --checkpoint runs/distill --steps 2                          # sample student K = 2
"""
from __future__ import annotations

import argparse
from typing import Optional

from .._names import DETERMINISTIC_SAMPLERS, SPACING_NAMES
from ._common import CLIError, add_threads_option, apply_threads, write_json

# fastddpm.distillation.DistillConfig's defaults (tests check they agree), here so that --help imports no torch
_DEFAULTS = argparse.Namespace(steps=2000, batch_size=64, lr=3e-4, warmup_steps=100, lr_schedule="cosine", grad_clip=1.0,
                               amp="none", num_pairs=32768, val_pairs=1024, loss="auto", teacher_sampler="unipc",
                               teacher_steps=20, teacher_spacing="trailing", spacing="trailing", ema_decay=0.995,
                               save_every=500, log_every=25, seed=0)

HELP = "distil a trained model into 1-4-call students, data-free (sampled with `fastddpm sample --steps K`)"


def configure(p: argparse.ArgumentParser) -> None:
    """Add the ``distill`` arguments to a parser."""
    d = _DEFAULTS
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="the teacher: a checkpoint directory, run directory or .safetensors file (default: the "
                        "bundled digits model)")
    p.add_argument("--calls", default="1,2,3,4",
                   help="model calls per image of the students, comma-separated: one student each (default: 1,2,3,4)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default: {d.steps})")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="the run directory (checkpoints, log, pairs)")
    p.add_argument("--resume", action="store_true", help="continue the distillation run in --out-dir exactly")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run --out-dir holds (its config.json, log.jsonl, checkpoints/)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"pairs per step (default: {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW peak learning rate (default: {d.lr})")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help=f"linear learning-rate warm-up (default: {d.warmup_steps})")
    p.add_argument("--lr-schedule", default=d.lr_schedule, choices=("cosine", "constant"),
                   help=f"after the warm-up: cosine decay to 0 at --steps, or constant (default: {d.lr_schedule})")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip,
                   help=f"max global gradient norm, 0 disables (default: {d.grad_clip})")
    p.add_argument("--amp", default=d.amp, choices=("none", "bf16", "auto"),
                   help=f"bf16 autocast of the model calls (auto: on CUDA) (default: {d.amp})")
    p.add_argument("--loss", default=d.loss, choices=("auto", "pseudo-huber", "x0"),
                   help="per-image distance of a student's x_0 to the teacher's: pseudo-huber (about the L2 "
                        "norm: less pull towards the average of two outcomes than a squared loss), x0 (mean "
                        f"squared error), or auto: x0 for 1 and 2 calls, pseudo-huber for more (default: {d.loss})")
    p.add_argument("--num-pairs", type=int, default=d.num_pairs,
                   help=f"teacher trajectories (x_T, x_0) drawn once (default: {d.num_pairs})")
    p.add_argument("--val-pairs", type=int, default=d.val_pairs,
                   help="more teacher pairs, held out: the students' validation loss, logged at the checkpoint "
                        f"steps that are log steps and at the end (0: none) (default: {d.val_pairs})")
    p.add_argument("--pairs", default=None, metavar="PATH",
                   help="reuse the teacher pairs of another run (its directory or teacher_pairs.safetensors) drawn "
                        "with the same teacher and pair settings, e.g. one run per K (default: draw them)")
    p.add_argument("--teacher-sampler", default=d.teacher_sampler, choices=DETERMINISTIC_SAMPLERS,
                   help=f"the teacher's solver (default: {d.teacher_sampler})")
    p.add_argument("--teacher-steps", type=int, default=d.teacher_steps,
                   help=f"the teacher solver's model calls (default: {d.teacher_steps})")
    p.add_argument("--teacher-spacing", default=d.teacher_spacing, choices=SPACING_NAMES,
                   help=f"(default: {d.teacher_spacing})")
    p.add_argument("--spacing", default=d.spacing, choices=SPACING_NAMES,
                   help=f"the students' timesteps (default: {d.spacing})")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="class-conditional teachers: distil the guided model at this scale w")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help=f"(default: {d.ema_decay})")
    p.add_argument("--save-every", type=int, default=d.save_every, help=f"(default: {d.save_every})")
    p.add_argument("--log-every", type=int, default=d.log_every, help=f"(default: {d.log_every})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the pairs' x_T and the batches (default: {d.seed})")
    p.add_argument("--student-prediction", default="auto", choices=("auto", "teacher", "eps", "x0", "v"),
                   help="how the students read their output per step (default auto: x0 at the first step of an eps "
                        "teacher, the teacher's after it; teacher: the student starts as the teacher's DDIM)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--no-clip", action="store_true", help="do not clip x0-hat to [-1, 1] (teacher and students)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the result here")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    add_threads_option(p)


def _teacher_params(checkpoint: Optional[str]) -> int:
    """The teacher's parameter count (for the default thread count; built on the meta device: no memory, no
    time); 0 when it does not load (distill then says why)."""
    import torch

    from .. import build
    from .. import checkpoint as ckpt

    try:
        probe = ckpt.load_checkpoint(ckpt.resolve_checkpoint(checkpoint), load_state=False, load_model=False,
                                     load_ema=False)
        with torch.device("meta"):
            return sum(p.numel() for p in build.build_model(probe.config).parameters())
    except Exception:  # noqa: BLE001 - any failure is reported by distill itself
        return 0


def run(args: argparse.Namespace) -> int:
    """``fastddpm distill``: distil, print where the students are and how to sample them."""
    from ..distillation import DistillConfig, distill

    try:
        calls = tuple(int(c) for c in str(args.calls).split(","))
    except ValueError:
        raise CLIError(f"--calls must be a comma-separated list of positive ints, got {args.calls!r}") from None
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    apply_threads(args.threads, _teacher_params(args.checkpoint), "cuda" if args.device.startswith("cuda") else "cpu")
    cfg = DistillConfig(checkpoint=args.checkpoint, calls=calls, steps=args.steps, out_dir=args.out_dir,
                        resume=args.resume, overwrite=args.overwrite, batch_size=args.batch_size, lr=args.lr,
                        warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule, grad_clip=args.grad_clip,
                        amp=args.amp, loss=args.loss, num_pairs=args.num_pairs, val_pairs=args.val_pairs, pairs=args.pairs,
                        teacher_sampler=args.teacher_sampler, teacher_steps=args.teacher_steps,
                        teacher_spacing=args.teacher_spacing, spacing=args.spacing,
                        guidance_scale=args.guidance_scale, ema_decay=args.ema_decay, clip=not args.no_clip,
                        seed=args.seed, save_every=args.save_every, log_every=args.log_every, progress=args.progress,
                        student_prediction=args.student_prediction, device=args.device)
    try:
        r = distill(cfg)
    except ValueError as e:  # errors name the library field; on the command line name the flag
        msg = str(e)
        first = msg.split(" ", 1)[0]
        flags = ("calls", "steps", "checkpoint", "lr", "seed", "loss", "batch_size", "warmup_steps", "grad_clip",
                 "pairs", "val_pairs")
        raise CLIError(f"--{first.replace('_', '-')} {msg.split(' ', 1)[1]}" if first in flags else msg) from None
    last = r.losses[-1] if r.losses else {}
    val = {k: v for k, v in (r.val_losses[-1] if r.val_losses else {}).items() if k.startswith("val_") or k == "step"}
    summary = {"out_dir": r.out_dir, "checkpoint": r.checkpoint, "timesteps": {str(k): v for k, v in r.timesteps.items()},
               "final_losses": last, "final_val_losses": val, "seconds": round(r.seconds, 1),
               "cpu_seconds": round(r.cpu_seconds, 1)}
    write_json(summary, args.json)
    ks = ",".join(str(k) for k in r.timesteps)
    print(f"students for {ks} model calls -> {r.checkpoint} ({r.seconds:.0f} s, {r.cpu_seconds:.0f} s CPU); sample one with "
          f"`fastddpm sample --checkpoint {r.out_dir} --steps K`")
    if r.val_losses:
        print(_fit_line(r.val_losses[-1]))
    return 0


def _fit_line(rec: dict) -> str:
    """The students' loss on their training pairs (the last log window, raw weights) beside the held-out one (the
    sampled EMA weights), and what a large gap means."""
    parts, gap = [], 0.0
    for key in sorted((k for k in rec if k.startswith("val_loss_")), key=lambda k: int(k.rsplit("_", 1)[1])):
        k = key.rsplit("_", 1)[1]
        train = rec.get(f"loss_{k}", float("nan"))
        parts.append(f"K={k} {train:.4g} / {rec[key]:.4g}")
        gap = max(gap, rec[key] / train if train > 0 else 0.0)
    hint = ("; the held-out loss is well above the training one: the students fit their training pairs more "
            "closely than new ones (more --num-pairs narrows the gap; see docs/distillation.md)" if gap > 1.5 else "")
    return "loss on training / held-out pairs: " + ", ".join(parts) + hint

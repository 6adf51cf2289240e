"""How closely distilled students fit their training pairs, against pairs they never saw (squared error).

    python scripts/distill_fit.py runs/d4 --pairs runs/d1                 # a run's students, its pairs in runs/d1
    python scripts/distill_fit.py digits-distilled --pairs runs/d1 --num 2048 --heldout-seed 987654321

For each student K of each checkpoint: the mean squared error of its K-call chain (EMA weights, as sampled)
to the teacher's x_0 on the first `--num` pairs of `--pairs` (a teacher_pairs.safetensors file or the run
directory holding one) and on `--num` fresh pairs of the teacher (UniPC-20, trailing: `fastddpm distill`'s default solver) from x_T under
`pair_seed(--heldout-seed)` (never a run's training noise). A held-out error well above the training one means
the students fit their pairs more closely than the teacher's map. `fastddpm distill` logs the same comparison
for every run in its own loss (`val_loss_K`, from `--val-pairs`); this script scores any checkpoint after the
fact in one common unit.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import torch


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="distilled checkpoints or run directories")
    ap.add_argument("--pairs", required=True, help="the training pairs: teacher_pairs.safetensors or its run directory")
    ap.add_argument("--teacher", default=None, help="the teacher checkpoint (default: the bundled digits model)")
    ap.add_argument("--num", type=int, default=2048, help="pairs of each kind (default: 2048)")
    ap.add_argument("--heldout-seed", type=int, default=987654321, help="seed of the held-out x_T (hashed by pair_seed)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file

    from fastddpm import build
    from fastddpm.distillation import PAIRS_FILE, ChainObjective, pair_seed, teacher_pairs
    from fastddpm.student import student_for

    path = os.path.join(args.pairs, PAIRS_FILE) if os.path.isdir(args.pairs) else args.pairs
    train = {k: v[:args.num] for k, v in load_file(path).items()}
    teacher, diffusion, _ = build.load_model(args.teacher)
    shape = tuple(train["x_T"].shape[1:])
    x_T, x_0 = teacher_pairs(teacher, diffusion, shape, args.num, pair_seed(args.heldout_seed))
    held = {"x_T": x_T, "x_0": x_0}
    for ckpt in args.checkpoints:
        model, diff, cfg = build.load_model(ckpt)
        for k in sorted(int(c) for c in cfg["distill"]["calls"]):
            _, smp = student_for(model, diff, cfg, k)
            objective = ChainObjective(model, {k: smp}, loss="x0")
            with torch.no_grad():
                err = {name: torch.cat([objective.per_image(model, d["x_T"][i:i + 256], d["x_0"][i:i + 256])[0]
                                        for i in range(0, args.num, 256)]).mean().item()
                       for name, d in (("training", train), ("held-out", held))}
            print(f"{ckpt} K={k}: squared error on training pairs {err['training']:.6g}, held-out "
                  f"{err['held-out']:.6g} ({err['held-out'] / err['training']:.2f}x)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

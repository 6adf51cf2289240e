"""Measure the warm-up / final-step and formula choices of the multistep solvers (DPM-Solver++(3M), UniPC).

    python scripts/multistep_choices.py                 # exact Gaussian model + the bundled digits model
    python scripts/multistep_choices.py --no-digits     # the exact Gaussian model only (seconds)

Two error measures, both of the probability-flow ODE solve (deterministic solvers, same x_T):
- exact Gaussian model: data N(0, s2) with the exact denoiser, where every solver is a linear map
  x_T -> k x_T; the relative error of k against the exact ODE map, mean over s2 in {0.05, 0.25, 1} and
  the linear and cosine schedules (T = 1000);
- bundled digits model: RMS difference (in [-1, 1] pixel units) between the solver's samples and a
  reference solution of the same ODE from the same x_T (UniPC bh2 order 3 with 200 time-quadratic steps),
  --num images, clip_denoised=True, at the step counts DIGITS_COUNTS.
This is the solver's error, not sample quality (digits-FID): a solver can be further from the exact
ODE solution and still score well. Timesteps: "quadratic" (the samplers' int `steps`) and "linspace"
(diffusers' default: round(linspace(0, T-1, n+1))[::-1][:-1], no model call at t = 0).
Prints one markdown table per spacing.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastddpm.diffusion import GaussianDiffusion  # noqa: E402
from fastddpm.samplers import (DPMSolver3MSampler, DPMSolverSampler, UniPCSampler, gaussian_gain,  # noqa: E402
                               quadratic_timesteps)
from fastddpm.schedule import NoiseSchedule  # noqa: E402

T = 1000
COUNTS = (5, 6, 8, 10, 15, 20)
DIGITS_COUNTS = (5, 10, 20)
CONFIGS: Dict[str, Callable] = {
    "dpm++ 2M": lambda d, ts: DPMSolverSampler(d, steps=ts),
    "3M taylor, lof": lambda d, ts: DPMSolver3MSampler(d, steps=ts),
    "3M taylor, no lof": lambda d, ts: DPMSolver3MSampler(d, steps=ts, lower_order_final=False),
    "3M diffusers, lof": lambda d, ts: DPMSolver3MSampler(d, steps=ts, third_order="diffusers"),
    "UniPC bh2-3, lof": lambda d, ts: UniPCSampler(d, steps=ts),
    "UniPC bh2-3, no lof": lambda d, ts: UniPCSampler(d, steps=ts, lower_order_final=False),
    "UniPC bh1-3, lof": lambda d, ts: UniPCSampler(d, steps=ts, variant="bh1"),
    "UniPC bh2-2, lof": lambda d, ts: UniPCSampler(d, steps=ts, order=2),
    "UniPC bh1-2, lof": lambda d, ts: UniPCSampler(d, steps=ts, order=2, variant="bh1"),
    "UniP bh2-3 (no corrector)": lambda d, ts: UniPCSampler(d, steps=ts, corrector=False),
}


def spacing(kind: str, n: int) -> List[int]:
    if kind == "quadratic":
        return quadratic_timesteps(T, n)
    out = [round(v) for v in torch.linspace(0, T - 1, n + 1, dtype=torch.float64).tolist()][::-1][:-1]
    return out


def gaussian_error(make: Callable, kind: str, n: int) -> float:
    errs = []
    for sched in (NoiseSchedule.linear(T), NoiseSchedule.cosine(T)):
        sampler = make(GaussianDiffusion(sched), spacing(kind, n))
        ab = sched.alphas_cumprod
        t0, t1 = int(sampler.timesteps[0]), int(sampler.timesteps[-1])
        for s2 in (0.05, 0.25, 1.0):
            var = lambda t: float(ab[t]) * s2 + 1 - float(ab[t])  # noqa: E731
            exact = math.sqrt(float(ab[t1])) * s2 / var(t1) * math.sqrt(var(t1) / var(t0))
            errs.append(abs(gaussian_gain(sampler, s2) / exact - 1))
    return sum(errs) / len(errs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--no-digits", action="store_true", help="skip the bundled digits model")
    p.add_argument("--num", type=int, default=64, help="digits images per setting (default 64)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    digits = None
    if not args.no_digits:
        from fastddpm import build

        model, diffusion, _config = build.load_model(None, device="cpu")
        model.eval()
        shape = (args.num, model.in_channels, model.image_size, model.image_size)
        with torch.no_grad():
            ref = UniPCSampler(diffusion, steps=200).sample(model, shape, seed=0)
        digits = (model, diffusion, shape, ref)
    print(f"Command: python scripts/multistep_choices.py{' --no-digits' if args.no_digits else ''} --num {args.num} "
          f"--threads {args.threads}; {platform.machine()} CPU, torch {torch.__version__}.\n")
    for kind in ("quadratic", "linspace"):
        head = " | ".join(f"{n}" for n in COUNTS)
        print(f"### {kind} timesteps: Gaussian mean relative error of k"
              + (f" / digits RMS error vs the 200-step reference at {DIGITS_COUNTS}" if digits else "") + "\n")
        print(f"| solver | {head} |\n|---|" + "---:|" * len(COUNTS))
        for name, make in CONFIGS.items():
            cells = []
            for n in COUNTS:
                cell = f"{gaussian_error(make, kind, n):.3f}"
                if digits and n in DIGITS_COUNTS:
                    model, diffusion, shape, ref = digits
                    with torch.no_grad():
                        x = make(diffusion, spacing(kind, n)).sample(model, shape, seed=0)
                    cell += f" / {(x - ref).pow(2).mean().sqrt().item():.3f}"
                cells.append(cell)
            print(f"| {name} | " + " | ".join(cells) + " |")
        print()
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()

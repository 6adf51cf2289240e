"""How much of an SDE sampler's digits-FD is its noise realisation: one x_T, many step-noise draws.

    python scripts/sde_noise_spread.py --calls 15 --philox-seeds 0,1,2,3 --torch-seeds 1000,1001,1002

Runs fastddpm's SDE-DPM-Solver++(2M) through `step()` on the bundled digits model from the x_T of
scripts/quality_table.py's seed 0 (``--xt-seed``), with the per-step noise z drawn either from
fastddpm's Philox stream (what ``sample(seed=s)`` uses: stream 0, counter = step) or from
``torch.randn`` with ``torch.Generator().manual_seed(g)``, one draw per step in loop order (what
scripts/quality_table.py's diffusers adapter feeds DPMSolverMultistepScheduler.step for seed
g - 1000). The trajectories equal diffusers' given the same noise
(tests/test_multistep_solvers.py::test_dpm_solver_2m_matches_diffusers), so each line is also what
diffusers would score with that noise. Scored like quality_table.py (2,000 samples, digits-FD against
all 1,797 digits).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, List, Optional, Sequence

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import quality_table as qt  # noqa: E402
from fastddpm import build  # noqa: E402
from fastddpm.images import to_uint8  # noqa: E402
from fastddpm.ops.philox import philox_normal  # noqa: E402
from fastddpm.samplers import make_sampler  # noqa: E402


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=15)
    ap.add_argument("--spacing", default="trailing")
    ap.add_argument("--sampler", default="dpm++sde", choices=("dpm++sde", "dpm++3m-sde"))
    ap.add_argument("--num", type=int, default=2000)
    ap.add_argument("--xt-seed", type=int, default=0)
    ap.add_argument("--philox-seeds", default="0,1,2,3")
    ap.add_argument("--torch-seeds", default="1000,1001,1002")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, diffusion, config = build.load_model(None, device="cpu")
    mc = config["model"]
    full = (args.num, int(mc["in_channels"]), int(mc["image_size"]), int(mc["image_size"]))
    scorer = qt.Scorer()
    x_T = qt.x_T(args.xt_seed, full)

    def score(noise: Callable[[int], torch.Tensor]) -> float:
        sampler = make_sampler(args.sampler, diffusion, steps=args.calls, spacing=args.spacing)
        x = x_T.clone()
        with torch.no_grad():
            for i, t in enumerate(sampler.timesteps.tolist()):
                out = model(x, torch.full((args.num,), t, dtype=torch.int64))
                x = sampler.step(out, t, x, noise=noise(i))
        return scorer(to_uint8(x))

    for kind, seeds in (("philox", _ints(args.philox_seeds)), ("torch", _ints(args.torch_seeds))):
        scores = []
        for k in seeds:
            t0 = time.time()
            if kind == "philox":
                key = torch.tensor([k])
                fd = score(lambda i: philox_normal(key, full, torch.tensor([i]), stream=0))
            else:
                gen = torch.Generator().manual_seed(k)
                fd = score(lambda i: torch.randn(full, generator=gen))
            scores.append(fd)
            print(f"{args.sampler} {args.spacing} {args.calls} calls, x_T seed {args.xt_seed}, {kind} noise seed {k}: "
                  f"{fd:.4f} ({time.time() - t0:.0f} s)", flush=True)
        if len(scores) > 1:
            print(f"{kind}: mean {statistics.mean(scores):.4f}, sd {statistics.stdev(scores):.4f} over {len(scores)} draws",
                  flush=True)


if __name__ == "__main__":
    main()

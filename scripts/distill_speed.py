"""Time to DDPM-1000-level quality: a distilled student (fastddpm) against diffusers' best scheduler.

    python scripts/distill_speed.py --student digits-distilled --calls 2 --diffusers unipc-bh2-3:trailing:8
    python scripts/distill_speed.py --student digits-distilled --calls 2 --dtype bf16 --repeats 7

Both sides sample the bundled digits model's architecture in one process on 1 thread, timed interleaved
repeat by repeat (on a shared CPU, load hits both alike), `--batch` images per call:

* fastddpm: the student for `--calls` K (`FastSampler`: deterministic DDIM at its K timesteps, one fused
  step op per call), the model in `--dtype`;
* diffusers: its scheduler (`--diffusers name:spacing:calls`, as scripts/quality_table.py names them;
  default UniPC bh2 order 3, trailing, 8 calls: the fewest calls at which a diffusers scheduler scores within
  1.1x DDPM-1000 in docs/quality_table.md) driving the teacher (the same fd.UNet, same dtype) with
  diffusers' own loop (scale_model_input, model, step).

Which settings reach DDPM-1000-level quality (digits-FD within 1.1x DDPM-1000) is read from the quality
table, not measured here. Prints and writes (--json) images/s per side, their ratio, and the CPU flags.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from fastddpm import build  # noqa: E402
from fastddpm import checkpoint as ckpt  # noqa: E402
from fastddpm.fileio import atomic_write_json  # noqa: E402
from fastddpm.graphs import FastSampler  # noqa: E402
from fastddpm.precision import parse_dtype, reduced_precision  # noqa: E402
from fastddpm.student import student_for  # noqa: E402


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = set(fh.read().split())
    except OSError:
        return "?"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)


def main(argv=None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="digits-distilled")
    ap.add_argument("--calls", type=int, default=2, help="the student's model calls K")
    ap.add_argument("--teacher", default=None, help="default: the bundled digits model")
    ap.add_argument("--diffusers", default="unipc-bh2-3:trailing:8", help="name:spacing:calls")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from quality_table import diffusers_sample, diffusers_scheduler, x_T

    dtype = parse_dtype(args.dtype)
    smodel, sdiff, scfg = build.load_model(args.student)
    net, smp = student_for(smodel, sdiff, scfg, args.calls)
    fast = FastSampler(net, smp, args.batch, dtype=dtype)
    teacher, tdiff, tcfg = build.load_model(args.teacher)
    tnet = reduced_precision(teacher, dtype)
    name, spacing, dcalls = args.diffusers.split(":")
    sch = diffusers_scheduler(name, spacing, tdiff.schedule.betas.numpy(), tdiff.prediction)
    shape = (args.batch, int(teacher.in_channels), int(teacher.image_size), int(teacher.image_size))

    def run_fast(seed: int) -> None:
        fast(seed=seed)

    def run_diffusers(seed: int) -> None:
        with torch.no_grad():
            diffusers_sample(tnet, sch, x_T(seed, shape), int(dcalls), seed)

    times: Dict[str, list] = {"fastddpm": [], "diffusers": []}
    run_fast(0), run_diffusers(0)  # warm-up
    for r in range(args.repeats):
        for side, fn in (("fastddpm", run_fast), ("diffusers", run_diffusers)) if r % 2 == 0 else (
                ("diffusers", run_diffusers), ("fastddpm", run_fast)):
            t0 = time.perf_counter()
            fn(r + 1)
            times[side].append(time.perf_counter() - t0)
    ips = {k: args.batch / statistics.median(v) for k, v in times.items()}
    out = {"student": ckpt.resolve_checkpoint(args.student), "calls": args.calls, "diffusers": args.diffusers,
           "dtype": args.dtype, "batch": args.batch, "repeats": args.repeats,
           "images_per_s": {k: round(v, 1) for k, v in ips.items()},
           "speedup": round(ips["fastddpm"] / ips["diffusers"], 2),
           "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
           "machine": f"{platform.machine()} CPU ({cpu_flags()}), torch {torch.__version__}, 1 thread, shared",
           "command": "python scripts/distill_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(out, indent=1))
    if args.json:
        atomic_write_json(args.json, out, indent=1)
    return out


if __name__ == "__main__":
    main()

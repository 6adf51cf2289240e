"""Time to DDPM-1000-level quality: a distilled student (fastddpm) against diffusers' best scheduler.

    python scripts/distill_speed.py                                   # the headline: fp32 and bf16, picked settings
    python scripts/distill_speed.py --dtypes bf16 --repeats 7 --json out.json
    python scripts/distill_speed.py --calls 2 --diffusers unipc-bh2-3:trailing:8 --dtypes fp32   # a chosen pair

"DDPM-1000-level quality" is a digits-FD within `--within` (1.1x) of DDPM-1000's, read from the quality table
(docs/quality_table.json, scripts/quality_table.py: 2,000 samples x 3 seeds, mean). For each dtype the
fastest setting of each side that qualifies is picked there (the fewest model calls, the best score among
them: both sides call the same U-Net architecture, so calls set the cost):

* fastddpm: the student of `--student` for K calls (`FastSampler`: deterministic DDIM at its K timesteps, one
  fused step op per call), entries "fastddpm:distilled:digits-distilled[:bf16]@K";
* diffusers: any "diffusers:<scheduler>:<spacing>[:bf16]@calls" entry, run with diffusers' own loop
  (scale_model_input, model, step) on the teacher.

Both sides run in one process on 1 thread, timed interleaved repeat by repeat (on a shared CPU, load hits both
alike), `--batch` images per call, the model calls in the row's dtype (bf16: weights and activations in bf16,
the sampler state in fp32). Prints and writes (--json) images/s per side, their ratio, the settings and their
scores, and the CPU flags. `--calls K --diffusers name:spacing:calls` times a chosen pair instead.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from benchmarks.common import cpu_flags  # noqa: E402
from fastddpm import build  # noqa: E402
from fastddpm.fileio import atomic_write_json  # noqa: E402
from fastddpm.graphs import FastSampler  # noqa: E402
from fastddpm.precision import parse_dtype, reduced_precision  # noqa: E402
from fastddpm.student import student_for  # noqa: E402

DDPM_1000 = "fastddpm:ddpm:uniform@1000"


def cpu_flag_line() -> str:
    return " ".join(cpu_flags(("avx2", "avx512f", "avx512_bf16", "amx_bf16"))) or "?"


def _mean(entry: Dict[str, Any]) -> float:
    return sum(entry["scores"]) / len(entry["scores"])


def pick(entries: Dict[str, Any], dtype: str, within: float, student: str = "digits-distilled"
         ) -> Tuple[Optional[Tuple[str, int, float]], Optional[Tuple[str, int, float]]]:
    """(fastddpm, diffusers): the (setting, calls, score) each side reaches `within` x DDPM-1000 with in the
    fewest calls (best score among equal calls), None where no entry does; `dtype` "fp32" or "bf16"."""
    limit = within * _mean(entries[DDPM_1000])
    best: Dict[str, Tuple[int, float, str]] = {}
    for key, e in entries.items():
        setting, calls = key.rsplit("@", 1)
        lib, name, spacing, *rest = setting.split(":")
        if (rest[0] if rest else "fp32") != dtype or len(e["scores"]) < 3 or _mean(e) > limit:
            continue
        if lib not in ("fastddpm", "diffusers") or (lib == "fastddpm" and (name, spacing) != ("distilled", student)):
            continue
        cand = (int(calls), _mean(e), f"{lib}:{name}:{spacing}")
        if lib not in best or cand[:2] < best[lib][:2]:
            best[lib] = cand
    return tuple((best[s][2], best[s][0], best[s][1]) if s in best else None  # type: ignore[return-value]
                 for s in ("fastddpm", "diffusers"))


def measure(student: str, calls: int, diffusers: str, dcalls: int, dtype_name: str, batch: int, repeats: int
            ) -> Dict[str, Any]:
    """images/s of student K = `calls` (FastSampler) and of diffusers' `diffusers` ("name:spacing") at `dcalls`,
    interleaved; the model calls in `dtype_name`."""
    from quality_table import diffusers_sample, diffusers_scheduler, x_T

    dtype = parse_dtype(dtype_name)
    smodel, sdiff, scfg = build.load_model(student)
    net, smp = student_for(smodel, sdiff, scfg, calls)
    fast = FastSampler(net, smp, batch, dtype=dtype)
    teacher, tdiff, _ = build.load_model(None)
    tnet = reduced_precision(teacher, dtype)
    name, spacing = diffusers.split(":")[:2]
    sch = diffusers_scheduler(name, spacing, tdiff.schedule.betas.numpy(), tdiff.prediction)
    shape = (batch, int(teacher.in_channels), int(teacher.image_size), int(teacher.image_size))

    def run_diffusers(seed: int) -> None:
        with torch.no_grad():
            diffusers_sample(tnet, sch, x_T(seed, shape), dcalls, seed)

    sides = {"fastddpm": lambda seed: fast(seed=seed), "diffusers": run_diffusers}
    times: Dict[str, List[float]] = {"fastddpm": [], "diffusers": []}
    for fn in sides.values():
        fn(0)  # warm-up
    for r in range(repeats):
        for side in (("fastddpm", "diffusers") if r % 2 == 0 else ("diffusers", "fastddpm")):
            t0 = time.perf_counter()
            sides[side](r + 1)
            times[side].append(time.perf_counter() - t0)
    ips = {k: batch / statistics.median(v) for k, v in times.items()}
    return {"dtype": dtype_name, "fastddpm": {"calls": calls, "images_per_s": round(ips["fastddpm"], 1)},
            "diffusers": {"setting": diffusers, "calls": dcalls, "images_per_s": round(ips["diffusers"], 1)},
            "speedup": round(ips["fastddpm"] / ips["diffusers"], 2),
            "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()}}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="digits-distilled")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--quality", default=os.path.join(ROOT, "docs", "quality_table.json"))
    ap.add_argument("--within", type=float, default=1.1, help="x DDPM-1000's digits-FD (default: 1.1)")
    ap.add_argument("--calls", type=int, default=None, help="time this student K instead of the picked one")
    ap.add_argument("--diffusers", default=None, help="name:spacing:calls instead of the picked one")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with open(args.quality, encoding="utf-8") as fh:
        entries = json.load(fh)["entries"]
    rows = []
    for dtype in args.dtypes.split(","):
        ours, theirs = pick(entries, dtype, args.within, os.path.basename(args.student))
        if args.calls is not None:
            ours = (f"fastddpm:distilled:{args.student}", args.calls, None)
        if args.diffusers is not None:
            name, spacing, dcalls = args.diffusers.split(":")
            theirs = (f"diffusers:{name}:{spacing}", int(dcalls), None)
        if ours is None or theirs is None:
            rows.append({"dtype": dtype, "skipped": f"no qualifying entry: fastddpm {ours}, diffusers {theirs}"})
            continue
        row = measure(args.student, ours[1], theirs[0].split(":", 1)[1], theirs[1], dtype, args.batch, args.repeats)
        row["fastddpm"]["score"], row["diffusers"]["score"] = ours[2], theirs[2]
        rows.append(row)
        print(json.dumps(row))
    out = {"student": args.student, "within": args.within,
           "ddpm_1000": round(_mean(entries[DDPM_1000]), 4), "batch": args.batch, "repeats": args.repeats,
           "rows": rows, "machine": f"{platform.machine()} CPU ({cpu_flag_line()}), torch {torch.__version__}, 1 thread, "
                                    "shared",
           "command": "python scripts/distill_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.json:
        atomic_write_json(args.json, out, indent=1)
    return out


if __name__ == "__main__":
    main()

"""Per-call time of one sampler step() on the CPU, fastddpm beside diffusers, and aten ops per step.

Two modes:

    python -m pytest benchmarks/bench_step.py            # pytest-benchmark suite (not part of tests/)
    python benchmarks/bench_step.py --json               # script: prints JSON, writes results/step_cpu.json

Cases: DDPM (all 1000 timesteps, fixed_small, epsilon, clip on, noise drawn with a torch.Generator
inside step() by both) and DDIM (50 steps as diffusers' set_timesteps(50), eta 0, clip on), at batch 8
and 64 of 3x32x32 float32, at a middle timestep. fastddpm's step() goes through the
`fastddpm::sampler_step` custom op, on the CPU its plain-PyTorch reference path.

Op counts are device-independent: a TorchDispatchMode records every op dispatched during one step().
fastddpm's custom op is seen as one op (on CUDA it is one Triton launch); the aten ops of its CPU
reference implementation are counted separately by running that function under the same mode.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import timeit
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # script mode from a checkout
    sys.path.insert(0, str(ROOT))

from fastddpm.ops.sampler_step import sampler_step_reference  # noqa: E402
from fastddpm.samplers import DDIMSampler, DDPMSampler  # noqa: E402
from fastddpm.schedule import NoiseSchedule  # noqa: E402

T = 1000
IMAGE = (3, 32, 32)
BATCHES = (8, 64)
SAMPLERS = ("ddpm", "ddim")
DDIM_STEPS = 50


def _diffusion(schedule: NoiseSchedule) -> Any:
    try:
        from fastddpm.diffusion import GaussianDiffusion
    except ImportError:  # stand-in: the samplers read only these attributes
        from types import SimpleNamespace

        return SimpleNamespace(schedule=schedule, prediction="eps", variance="fixed_small", num_timesteps=T)
    return GaussianDiffusion(schedule, prediction="eps", variance="fixed_small")


def make_case(kind: str, batch: int, impl: str) -> Tuple[Callable[[], Any], Dict[str, Any]]:
    """A zero-argument callable performing one step() of `impl` ("fastddpm" | "diffusers"), and its info."""
    schedule = NoiseSchedule.linear(T)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *IMAGE, generator=g)
    m = torch.randn(batch, *IMAGE, generator=g)
    gen = torch.Generator().manual_seed(1)
    if impl == "diffusers":
        import diffusers

        if kind == "ddpm":
            sched = diffusers.DDPMScheduler(num_train_timesteps=T, trained_betas=schedule.betas.numpy(),
                                            variance_type="fixed_small", clip_sample=True)
            t = 500
            fn = lambda: sched.step(m, t, x, generator=gen)  # noqa: E731
        else:
            sched = diffusers.DDIMScheduler(num_train_timesteps=T, trained_betas=schedule.betas.numpy(), clip_sample=True)
            sched.set_timesteps(DDIM_STEPS)
            t = int(sched.timesteps[DDIM_STEPS // 2])
            fn = lambda: sched.step(m, t, x, eta=0.0)  # noqa: E731
        return fn, {"t": t}
    diff = _diffusion(schedule)
    if kind == "ddpm":
        sampler = DDPMSampler(diff, steps=None)
        t = 500
        fn = lambda: sampler.step(m, t, x, generator=gen)  # noqa: E731
    else:
        import diffusers

        ref = diffusers.DDIMScheduler(num_train_timesteps=T)
        ref.set_timesteps(DDIM_STEPS)
        sampler = DDIMSampler(diff, steps=ref.timesteps.tolist(), eta=0.0)
        t = int(sampler.timesteps[DDIM_STEPS // 2])
        fn = lambda: sampler.step(m, t, x)  # noqa: E731
    info = {"t": t, "sampler": sampler, "x": x, "m": m}
    return fn, info


class OpCounter(TorchDispatchMode):
    """Records the name of every op dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func))
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], Any]) -> List[str]:
    fn()  # warm caches (device tables) outside the count
    with OpCounter() as c:
        fn()
    return c.ops


def reference_op_count(info: Dict[str, Any]) -> List[str]:
    """aten ops of fastddpm's CPU reference implementation of the fused step for this case."""
    sampler, x, m, t = info["sampler"], info["x"], info["m"], info["t"]
    coefs, steps, _ = sampler.device_tables(x.device)
    s = int((sampler.timesteps == t).nonzero()[0, 0])
    noise = torch.randn_like(x) if sampler.coefs[s, 6] != 0 else None
    with OpCounter() as c:
        sampler_step_reference(x, m, coefs, steps[s:s + 1], None, noise, None, 0, True, False)
    return c.ops


def _calibrate(fn: Callable[[], Any], target: float) -> int:
    """Number of calls that take about `target` seconds."""
    fn()
    n = 1
    while True:
        dt = timeit.timeit(fn, number=n)
        if dt >= target / 4 or n >= 1 << 16:
            return max(1, int(n * target / max(dt, 1e-9)))
        n *= 2


def time_interleaved(fns: Dict[str, Callable[[], Any]], min_time: float, repeats: int = 31) -> Dict[str, Dict[str, float]]:
    """Median / min seconds per call of each fn, timed in alternation (repeat r of every fn, then
    repeat r + 1, ...) so that load changes on a shared machine hit all of them alike."""
    per_repeat = min_time / 4
    ns = {k: _calibrate(f, per_repeat) for k, f in fns.items()}
    wall: Dict[str, List[float]] = {k: [] for k in fns}
    cpu: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(ns[k]):
                f()
            w1, c1 = time.perf_counter(), time.process_time()
            wall[k].append((w1 - w0) / ns[k])
            cpu[k].append((c1 - c0) / ns[k])
    return {k: {"median_s": statistics.median(wall[k]), "min_s": min(wall[k]),
                "cpu_median_s": statistics.median(cpu[k]), "calls_per_repeat": ns[k], "repeats": repeats}
            for k in fns}


def run_all(min_time: float = 0.2) -> Dict[str, Any]:
    rows = []
    for kind in SAMPLERS:
        for batch in BATCHES:
            res: Dict[str, Any] = {"sampler": kind, "batch": batch, "shape": [batch, *IMAGE], "dtype": "float32"}
            cases = {impl: make_case(kind, batch, impl) for impl in ("fastddpm", "diffusers")}
            times = time_interleaved({impl: fn for impl, (fn, _) in cases.items()}, min_time)
            for impl, (fn, info) in cases.items():
                ops = count_ops(fn)
                tm = times[impl]
                res[impl] = {"us_per_step": tm["median_s"] * 1e6, "us_per_step_min": tm["min_s"] * 1e6,
                             "cpu_us_per_step": tm["cpu_median_s"] * 1e6,
                             "ops_per_step": len(ops), "ops": sorted(set(ops)), "t": info["t"]}
                if impl == "fastddpm":
                    res[impl]["custom_ops_per_step"] = sum(o.startswith("fastddpm.") for o in ops)
                    res[impl]["reference_aten_ops_inside_op"] = len(reference_op_count(info))
            res["speedup_vs_diffusers"] = res["diffusers"]["us_per_step"] / res["fastddpm"]["us_per_step"]
            res["speedup_vs_diffusers_min"] = res["diffusers"]["us_per_step_min"] / res["fastddpm"]["us_per_step_min"]
            res["speedup_vs_diffusers_cpu"] = res["diffusers"]["cpu_us_per_step"] / res["fastddpm"]["cpu_us_per_step"]
            rows.append(res)
    return {
        "benchmark": "sampler step() per call, CPU (median of interleaved repeats; wall and process CPU time)",
        "note": "process CPU time (cpu_us_per_step) is the figure least disturbed by other load on a shared machine",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "rows": rows,
    }


# ------------------------------------------------------------------------------ pytest-benchmark
try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("batch", BATCHES)
    @pytest.mark.parametrize("kind", SAMPLERS)
    @pytest.mark.parametrize("impl", ["fastddpm", "diffusers"])
    def test_step(benchmark, impl, kind, batch):
        if impl == "diffusers":
            pytest.importorskip("diffusers")
        if kind == "ddim":
            pytest.importorskip("diffusers")  # our DDIM case uses diffusers' timesteps
        fn, info = make_case(kind, batch, impl)
        benchmark.group = f"{kind}-batch{batch}"
        benchmark.extra_info["ops_per_step"] = len(count_ops(fn))
        if impl == "fastddpm":
            benchmark.extra_info["reference_aten_ops_inside_op"] = len(reference_op_count(info))
        out = benchmark(fn)
        assert out is not None


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--min-time", type=float, default=0.2, help="about 4 x the seconds of one timed repeat (default 0.2)")
    p.add_argument("--out", default=None,
                   help="where to write the JSON (default: step_cpu.json in $FASTDDPM_BENCH_RESULTS, which "
                        "`fastddpm bench` sets, else in benchmarks/results/)")
    args = p.parse_args(argv)
    result = run_all(args.min_time)
    out = Path(args.out or os.path.join(os.environ.get("FASTDDPM_BENCH_RESULTS")
                                        or str(ROOT / "benchmarks" / "results"), "step_cpu.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for r in result["rows"]:
            f, d = r["fastddpm"], r["diffusers"]
            print(f"{r['sampler']:5s} batch {r['batch']:3d}: fastddpm {f['cpu_us_per_step']:8.1f} us cpu "
                  f"({f['us_per_step']:8.1f} wall; {f['ops_per_step']} ops, {f['reference_aten_ops_inside_op']} aten inside "
                  f"the op)  diffusers {d['cpu_us_per_step']:8.1f} us cpu ({d['us_per_step']:8.1f} wall; "
                  f"{d['ops_per_step']} aten ops)  speed-up x{r['speedup_vs_diffusers_cpu']:.2f} cpu")
        print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

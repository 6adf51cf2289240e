"""Sampling speed: FastSampler vs `sampler.sample` vs diffusers' pipeline loop, same model and weights.

Two modes:

    python -m pytest benchmarks/bench_sampling.py --benchmark-only   # pytest-benchmark suite
    python benchmarks/bench_sampling.py [--json]                     # script: writes results/sampling_cpu.json
                                                                     # (and results/sampling_gpu.json on CUDA)

Three parts:

(a) Per-step host overhead. The model is a trivially cheap one (a 1x1 convolution, 3 -> 3 channels),
    so the sampling loop itself dominates. For DDIM and DDPM (both on the 50 timesteps diffusers'
    schedulers walk after `set_timesteps(50)`), batch 8 of 3x32x32 float32, one whole sampling call
    of each implementation is timed, and so are 50 calls of the model alone, interleaved repeat by
    repeat so that load on a shared machine hits all alike:
        overhead per step = (time of one sampling call - time of 50 model calls) / 50
    which includes the initial noise and the final copy, amortised over the steps. Implementations:
    `fd.FastSampler` (static buffers; eager on the CPU), `sampler.sample` (the plain loop), and the
    loop of diffusers' DDPMPipeline / DDIMPipeline (randn_tensor, set_timesteps, model call,
    scheduler.step) written out around the same model. Tensor ops per step outside the model are
    counted with `fastddpm.profiling.count_ops` (TorchDispatchMode: every op that reaches the
    dispatcher, views included): (ops of one sampling call - 50 x ops of one model call) / 50, and for
    a steady-state step (the median step, ops between two model calls) with and without views (views
    launch no kernel on a GPU).

(b) End to end on the CPU: the DDPM CIFAR-10 U-Net (35.7M parameters; diffusers' UNet2DModel with
    random weights, `benchmarks.common.ddpm_cifar10_pair`) at batch 8 and 20 steps.
    `FastSampler.from_diffusers(unet, scheduler, steps=20, convert=True)` (the weights converted into
    fd.UNet, which runs the fused ops) against diffusers' own `DDIMPipeline` (eta 0) and `DDPMPipeline`
    (respaced to 20 steps by `num_inference_steps=20`) with the same weights, in the same run,
    interleaved; images/s from wall time and from process CPU time, and the ratios.

(c) On CUDA only (skipped without it): images/s at batch 256 in bfloat16 for 20 and 100 DDIM steps and
    1000 DDPM steps: FastSampler (converted U-Net, one CUDA graph per step) against diffusers' pipeline
    eager and with `torch.compile(unet, mode="max-autotune")`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # script mode from a checkout
    sys.path.insert(0, str(ROOT))

import fastddpm as fd  # noqa: E402
from benchmarks.common import ddpm_cifar10_pair, machine, write_result  # noqa: E402
from fastddpm.interop.schedulers import sampler_from_scheduler  # noqa: E402
from fastddpm.profiling import count_ops  # noqa: E402

IMAGE = (3, 32, 32)
SAMPLERS = ("ddim", "ddpm")
OVERHEAD_IMPLS = ("fast_sampler", "sampler_sample", "diffusers_loop")
OVERHEAD_BATCH, OVERHEAD_STEPS = 8, 50
E2E_IMPLS = ("fast_sampler", "diffusers_pipeline", "fast_sampler_unconverted")
E2E_BATCH, E2E_STEPS = 8, 20
GPU_BATCH, GPU_STEPS = 256, (20, 100, 1000)
GPU_IMPLS = ("fast_sampler", "diffusers_eager", "diffusers_compiled")


def gpu_sampler_for(steps: int) -> str:
    """The sampler of a GPU case: DDPM for the full 1000-step chain, DDIM for shorter ones."""
    return "ddpm" if steps >= 1000 else "ddim"


# ------------------------------------------------------------------------------ set-up
def diffusers_scheduler(kind: str) -> Any:
    """The scheduler of google/ddpm-cifar10-32 (linear betas 1e-4..0.02, T=1000, clip on), as DDPM or DDIM."""
    import diffusers

    if kind == "ddpm":
        return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_small",
                                       clip_sample=True)
    if kind == "ddim":
        return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    raise ValueError(f"kind must be one of {SAMPLERS}, got {kind!r}")


class TinyModel(torch.nn.Module):
    """A trivially cheap eps-model (a 1x1 convolution) so that the sampling loop's own cost dominates."""

    in_channels, image_size = IMAGE[0], IMAGE[1]

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(IMAGE[0], IMAGE[0], 1)
        with torch.no_grad():
            self.conv.weight.mul_(0.1)

    def forward(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        return self.conv(x)


def pipeline_loop(model: Callable[..., Any], scheduler: Any, kind: str, steps: int, shape: Sequence[int],
                  seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The loop of diffusers' DDPMPipeline / DDIMPipeline (eta 0) around `model`, without the pipeline object."""
    from diffusers.utils.torch_utils import randn_tensor

    gen = torch.Generator(device=device).manual_seed(seed)
    image = randn_tensor(tuple(shape), generator=gen, device=torch.device(device), dtype=dtype)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        out = model(image, t)
        out = out if isinstance(out, torch.Tensor) else out.sample
        if kind == "ddim":
            image = scheduler.step(out, t, image, eta=0.0, use_clipped_model_output=None, generator=gen).prev_sample
        else:
            image = scheduler.step(out, t, image, generator=gen).prev_sample
    return image


def overhead_cases(kind: str, batch: int = OVERHEAD_BATCH, steps: int = OVERHEAD_STEPS
                   ) -> Tuple[TinyModel, Dict[str, Callable[[], Any]], Callable[[], Any]]:
    """(model, {impl: one sampling call}, `steps` model calls alone) for part (a)."""
    torch.manual_seed(0)
    model = TinyModel().eval()
    shape = (batch, *IMAGE)
    sched = diffusers_scheduler(kind)
    smp, clip = sampler_from_scheduler(sched, kind, steps)
    fast = fd.FastSampler(model, smp, batch_size=batch, image_shape=IMAGE, clip_denoised=clip)
    x = torch.randn(shape)
    t_batch = torch.full((batch,), 500, dtype=torch.int64)
    t_scalar = torch.tensor(500)

    @torch.no_grad()
    def fast_call() -> torch.Tensor:
        return fast(seed=0)

    @torch.no_grad()
    def sample_call() -> torch.Tensor:
        return smp.sample(model, shape, seed=0, clip_denoised=clip)

    @torch.no_grad()
    def diffusers_call() -> torch.Tensor:
        return pipeline_loop(model, sched, kind, steps, shape)

    @torch.no_grad()
    def model_calls() -> None:  # as many model calls as a sampling call makes (half with a [N] t, as ours)
        for i in range(steps):
            model(x, t_batch if i % 2 else t_scalar)

    return model, {"fast_sampler": fast_call, "sampler_sample": sample_call, "diffusers_loop": diffusers_call}, model_calls


# ------------------------------------------------------------------------------ timing
def time_interleaved(fns: Dict[str, Callable[[], Any]], repeats: int, inner: int = 1,
                     sync: Optional[Callable[[], None]] = None) -> Dict[str, Dict[str, float]]:
    """Seconds per call of each fn (median and min over `repeats`; wall and process CPU time), timed in
    alternation (repeat r of every fn, then r + 1; the order reversed every other repeat) so that load
    changes on a shared machine hit all of them alike. `inner` calls per timed repeat."""
    wall: Dict[str, List[float]] = {k: [] for k in fns}
    cpu: Dict[str, List[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in (names if r % 2 == 0 else names[::-1]):
            f = fns[k]
            if sync:
                sync()
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(inner):
                f()
            if sync:
                sync()
            w1, c1 = time.perf_counter(), time.process_time()
            wall[k].append((w1 - w0) / inner)
            cpu[k].append((c1 - c0) / inner)
    return {k: {"wall_median_s": statistics.median(wall[k]), "wall_min_s": min(wall[k]),
                "cpu_median_s": statistics.median(cpu[k]), "cpu_min_s": min(cpu[k]), "repeats": repeats,
                "calls_per_repeat": inner} for k in fns}


# ------------------------------------------------------------------------------ op counting
class StepOps(TorchDispatchMode):
    """Records the ops dispatched outside the model, bucketed by step: bucket 0 is everything before
    the first model call, bucket k the ops after model call k (up to the next call or the end)."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = False
        self.buckets: List[List[Tuple[str, bool]]] = [[]]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside:
            self.buckets[-1].append((str(func.overloadpacket), bool(getattr(func, "is_view", False))))
        return func(*args, **(kwargs or {}))


class MarkedModel(torch.nn.Module):
    """Wraps a model so that a StepOps mode skips the model's own ops and starts a bucket after each call."""

    def __init__(self, model: torch.nn.Module, mode: StepOps) -> None:
        super().__init__()
        self.model = model
        self.mode = mode

    def forward(self, x: torch.Tensor, t: Any) -> Any:
        self.mode.inside = True
        try:
            return self.model(x, t)
        finally:
            self.mode.inside = False
            self.mode.buckets.append([])


def step_ops(kind: str, impl: str, batch: int = OVERHEAD_BATCH, steps: int = OVERHEAD_STEPS) -> Dict[str, Any]:
    """Ops per sampling step outside the model for one implementation (see the module doc)."""
    model, calls, _ = overhead_cases(kind, batch, steps)
    x = torch.randn(batch, *IMAGE)
    with torch.no_grad():
        per_model = sum(count_ops(lambda: model(x, torch.full((batch,), 500))).values())
        calls[impl]()  # warm caches (device tables, scheduler state) outside the count
        total = sum(count_ops(calls[impl]).values())
    # steady state: rebuild the same case around a marked model, then take the median step's bucket
    mode = StepOps()
    marked = MarkedModel(model, mode)
    shape = (batch, *IMAGE)
    sched = diffusers_scheduler(kind)
    smp, clip = sampler_from_scheduler(sched, kind, steps)
    with torch.no_grad():
        if impl == "fast_sampler":
            fast = fd.FastSampler(marked, smp, batch_size=batch, image_shape=IMAGE, clip_denoised=clip)
            fn: Callable[[], Any] = lambda: fast(seed=0)  # noqa: E731
        elif impl == "sampler_sample":
            fn = lambda: smp.sample(marked, shape, seed=0, clip_denoised=clip)  # noqa: E731
        else:
            fn = lambda: pipeline_loop(marked, sched, kind, steps, shape)  # noqa: E731
        fn()
        mode.buckets = [[]]
        with mode:
            fn()
    inner = mode.buckets[1:-1]  # whole steps between two model calls
    mid = inner[len(inner) // 2] if inner else []
    counts = sorted(len(b) for b in inner)
    return {
        "ops_per_step": (total - steps * per_model) / steps,
        "ops_per_step_steady": counts[len(counts) // 2] if counts else 0,
        "ops_per_step_steady_no_views": sum(not v for _, v in mid),
        "ops_steady_step": sorted(name for name, _ in mid),
        "ops_before_first_model_call": len(mode.buckets[0]),
        "ops_after_last_model_call": len(mode.buckets[-1]),
        "model_ops_per_call": per_model,
    }


# ------------------------------------------------------------------------------ (a) overhead
def run_overhead(repeats: int = 15, batch: int = OVERHEAD_BATCH, steps: int = OVERHEAD_STEPS) -> List[Dict[str, Any]]:
    rows = []
    for kind in SAMPLERS:
        _, calls, model_calls = overhead_cases(kind, batch, steps)
        fns = {**calls, "model_only": model_calls}
        for f in fns.values():  # warm-up
            f()
        tm = time_interleaved(fns, repeats)
        model_wall, model_cpu = tm["model_only"]["wall_median_s"] / steps, tm["model_only"]["cpu_median_s"] / steps
        row: Dict[str, Any] = {"sampler": kind, "batch": batch, "steps": steps, "shape": [batch, *IMAGE],
                               "dtype": "float32", "model": "1x1 conv 3->3",
                               "model_us_per_call": model_wall * 1e6, "model_cpu_us_per_call": model_cpu * 1e6}
        for impl in OVERHEAD_IMPLS:
            t = tm[impl]
            row[impl] = {
                "us_per_step": t["wall_median_s"] / steps * 1e6,
                "cpu_us_per_step": t["cpu_median_s"] / steps * 1e6,
                "overhead_us_per_step": (t["wall_median_s"] / steps - model_wall) * 1e6,
                "overhead_cpu_us_per_step": (t["cpu_median_s"] / steps - model_cpu) * 1e6,
                "overhead_min_us_per_step": (t["wall_min_s"] - tm["model_only"]["wall_min_s"]) / steps * 1e6,
                **step_ops(kind, impl, batch, steps),
            }
        f = row["fast_sampler"]
        for peer in ("sampler_sample", "diffusers_loop"):
            p = row[peer]
            row[f"overhead_ratio_{peer}_over_fast"] = p["overhead_us_per_step"] / f["overhead_us_per_step"]
            row[f"overhead_cpu_ratio_{peer}_over_fast"] = p["overhead_cpu_us_per_step"] / f["overhead_cpu_us_per_step"]
            row[f"ops_ratio_{peer}_over_fast"] = p["ops_per_step_steady"] / max(f["ops_per_step_steady"], 1)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ (b) end to end
def e2e_cases(kind: str, ref: Any, batch: int = E2E_BATCH, steps: int = E2E_STEPS, device: str = "cpu",
              dtype: torch.dtype = torch.float32, compiled_unet: Any = None, gpu_names: bool = False,
              unconverted: bool = False) -> Dict[str, Callable[[], Any]]:
    """{impl: one sampling call of `batch` images} for the diffusers UNet2DModel `ref` (same weights):
    "fast_sampler" and "diffusers_pipeline" (CPU names) or "fast_sampler", "diffusers_eager" and, with
    `compiled_unet`, "diffusers_compiled" (GPU names, `gpu_names`); with `unconverted` (CPU) also
    "fast_sampler_unconverted": FastSampler calling diffusers' UNet2DModel as it is (convert=False)."""
    import diffusers

    sched = diffusers_scheduler(kind)
    fast = fd.FastSampler.from_diffusers(ref, sched, sampler=kind, steps=steps, batch_size=batch, convert=True)
    pipe_cls = diffusers.DDIMPipeline if kind == "ddim" else diffusers.DDPMPipeline
    kwargs = {"eta": 0.0} if kind == "ddim" else {}

    def make_pipe(unet: Any) -> Any:
        pipe = pipe_cls(unet=unet, scheduler=diffusers_scheduler(kind))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    pipe = make_pipe(ref)

    def fast_call() -> torch.Tensor:
        return fast(seed=0)

    fast_call.fast = fast  # type: ignore[attr-defined]

    def pipe_call(p: Any = pipe) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(0)
        return p(batch_size=batch, num_inference_steps=steps, generator=gen, output_type="pt", **kwargs).images

    cases: Dict[str, Callable[[], Any]] = {"fast_sampler": fast_call}
    if not gpu_names:
        cases["diffusers_pipeline"] = pipe_call
        if unconverted:  # FastSampler around diffusers' own UNet2DModel: only the loop and the step differ
            raw = fd.FastSampler.from_diffusers(ref, sched, sampler=kind, steps=steps, batch_size=batch, convert=False)
            cases["fast_sampler_unconverted"] = lambda: raw(seed=0)
    else:
        cases["diffusers_eager"] = pipe_call
        if compiled_unet is not None:
            cpipe = make_pipe(ref)
            cpipe.unet = compiled_unet  # as diffusers documents: pipe.unet = torch.compile(pipe.unet, ...)
            cases["diffusers_compiled"] = lambda: pipe_call(cpipe)
    return cases


def unet_forward_cpu(ref: Any, ours: Any, batch: int = E2E_BATCH, repeats: int = 3) -> Dict[str, Any]:
    """Seconds per forward of the converted fd.UNet and of diffusers' UNet2DModel (same weights, same input)."""
    x, t = torch.randn(batch, *IMAGE), torch.full((batch,), 500, dtype=torch.int64)
    with torch.no_grad():
        fns = {"fastddpm": lambda: ours(x, t), "diffusers": lambda: ref(x, t).sample}
        for f in fns.values():
            f()
        tm = time_interleaved(fns, repeats)
    out: Dict[str, Any] = {"batch": batch, "repeats": repeats}
    for k, v in tm.items():
        out[k] = {"s_per_forward": v["wall_median_s"], "cpu_s_per_forward": v["cpu_median_s"]}
    out["time_ratio_fastddpm_over_diffusers"] = tm["fastddpm"]["wall_median_s"] / tm["diffusers"]["wall_median_s"]
    out["cpu_time_ratio_fastddpm_over_diffusers"] = tm["fastddpm"]["cpu_median_s"] / tm["diffusers"]["cpu_median_s"]
    return out


def run_e2e_cpu(repeats: int = 2, batch: int = E2E_BATCH, steps: int = E2E_STEPS,
                unconverted: bool = True, ref: Any = None) -> List[Dict[str, Any]]:
    if ref is None:
        ref, _ = ddpm_cifar10_pair()
    rows = []
    for kind in SAMPLERS:
        cases = e2e_cases(kind, ref, batch, steps, unconverted=unconverted)
        with torch.no_grad():  # warm-up: one forward of each U-Net (first-call allocations, oneDNN primitives)
            x, t = torch.randn(batch, *IMAGE), torch.full((batch,), 500, dtype=torch.int64)
            ref(x, t)
            cases["fast_sampler"].fast.model(x, t)
        tm = time_interleaved(cases, repeats)
        row: Dict[str, Any] = {"sampler": kind, "batch": batch, "steps": steps, "dtype": "float32",
                               "model": "DDPM CIFAR-10 UNet2DModel (35.7M parameters), random weights"}
        for impl, t in tm.items():
            row[impl] = {"images_per_s": batch / t["wall_median_s"], "images_per_s_best": batch / t["wall_min_s"],
                         "images_per_cpu_s": batch / t["cpu_median_s"], "s_per_call": t["wall_median_s"],
                         "cpu_s_per_call": t["cpu_median_s"], "repeats": t["repeats"]}
        f, d = row["fast_sampler"], row["diffusers_pipeline"]
        row["speedup_vs_diffusers"] = f["images_per_s"] / d["images_per_s"]
        row["speedup_vs_diffusers_best"] = f["images_per_s_best"] / d["images_per_s_best"]
        row["speedup_vs_diffusers_cpu"] = f["images_per_cpu_s"] / d["images_per_cpu_s"]
        if "fast_sampler_unconverted" in row:
            u = row["fast_sampler_unconverted"]
            row["speedup_unconverted_vs_diffusers"] = u["images_per_s"] / d["images_per_s"]
            row["speedup_unconverted_vs_diffusers_cpu"] = u["images_per_cpu_s"] / d["images_per_cpu_s"]
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ (c) GPU
def run_gpu(steps_list: Sequence[int] = GPU_STEPS, batch: int = GPU_BATCH, dtype: torch.dtype = torch.bfloat16,
            device: str = "cuda", compile_mode: Optional[str] = "max-autotune", repeats: int = 3,
            ref: Any = None, compile_backend: str = "inductor") -> List[Dict[str, Any]]:
    """Images/s of FastSampler vs diffusers eager and compiled (part (c)); `device`/`ref` overridable so
    the logic can be smoke-tested on the CPU with a small model."""
    if ref is None:
        ref, _ = ddpm_cifar10_pair(device=device, dtype=dtype)
    compiled = torch.compile(ref, mode=compile_mode, backend=compile_backend) if compile_mode else None
    sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else None
    rows = []
    for steps in steps_list:
        kind = gpu_sampler_for(steps)
        cases = e2e_cases(kind, ref, batch, steps, device=device, dtype=dtype, compiled_unet=compiled, gpu_names=True)
        with torch.no_grad():
            for f in cases.values():  # warm-up: graph capture, Inductor compilation and autotuning
                f()
            tm = time_interleaved(cases, repeats if steps < 1000 else 1, sync=sync)
        row: Dict[str, Any] = {"sampler": kind, "batch": batch, "steps": steps, "dtype": str(dtype).replace("torch.", ""),
                               "compile_mode": compile_mode}
        for impl, t in tm.items():
            row[impl] = {"images_per_s": batch / t["wall_median_s"], "s_per_call": t["wall_median_s"],
                         "repeats": t["repeats"]}
        for peer in ("diffusers_eager", "diffusers_compiled"):
            if peer in row:
                row[f"speedup_vs_{peer}"] = row["fast_sampler"]["images_per_s"] / row[peer]["images_per_s"]
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ pytest-benchmark
try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("kind", SAMPLERS)
    @pytest.mark.parametrize("impl", OVERHEAD_IMPLS + ("model_only",))
    def test_overhead(benchmark, impl, kind):
        """One 50-step sampling call with a 1x1-conv model (or the 50 model calls alone)."""
        pytest.importorskip("diffusers")
        _, calls, model_calls = overhead_cases(kind)
        fn = model_calls if impl == "model_only" else calls[impl]
        benchmark.group = f"overhead-{kind}-batch{OVERHEAD_BATCH}-{OVERHEAD_STEPS}steps"
        if impl != "model_only":
            ops = step_ops(kind, impl)
            benchmark.extra_info.update({k: ops[k] for k in ("ops_per_step", "ops_per_step_steady",
                                                             "ops_per_step_steady_no_views")})
        benchmark(fn)

    @pytest.mark.parametrize("kind", SAMPLERS)
    @pytest.mark.parametrize("impl", E2E_IMPLS)
    def test_e2e_cpu(benchmark, impl, kind):
        """DDPM CIFAR-10 U-Net, batch 8, 20 steps on the CPU: one round (several seconds each)."""
        pytest.importorskip("diffusers")
        ref, _ = ddpm_cifar10_pair()
        fn = e2e_cases(kind, ref, unconverted=impl == "fast_sampler_unconverted")[impl]
        benchmark.group = f"e2e-cpu-{kind}-batch{E2E_BATCH}-{E2E_STEPS}steps"
        with torch.no_grad():
            out = benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
        assert out.shape == (E2E_BATCH, *IMAGE)

    @pytest.mark.parametrize("steps", GPU_STEPS)
    @pytest.mark.parametrize("impl", GPU_IMPLS)
    def test_gpu(benchmark, impl, steps):
        """Batch 256 bf16 on CUDA (skipped without it)."""
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")
        pytest.importorskip("diffusers")
        ref, _ = ddpm_cifar10_pair(device="cuda", dtype=torch.bfloat16)
        compiled = torch.compile(ref, mode="max-autotune") if impl == "diffusers_compiled" else None
        cases = e2e_cases(gpu_sampler_for(steps), ref, GPU_BATCH, steps, device="cuda", dtype=torch.bfloat16,
                          compiled_unet=compiled, gpu_names=True)
        fn = cases[impl]

        def call():
            out = fn()
            torch.cuda.synchronize()
            return out

        benchmark.group = f"gpu-{gpu_sampler_for(steps)}-batch{GPU_BATCH}-{steps}steps-bf16"
        with torch.no_grad():
            benchmark.pedantic(call, rounds=1 if steps >= 1000 else 3, iterations=1, warmup_rounds=1)


# ------------------------------------------------------------------------------ script
def _print_cpu(result: Dict[str, Any]) -> None:
    print(f"(a) per-step host overhead, 1x1-conv model, batch {OVERHEAD_BATCH}, {OVERHEAD_STEPS} steps "
          f"(us per step beyond the model call: wall / process CPU; ops per step outside the model)")
    for r in result["overhead"]:
        print(f"  {r['sampler']}: model call {r['model_us_per_call']:.0f} us")
        for impl in OVERHEAD_IMPLS:
            v = r[impl]
            print(f"    {impl:15s} {v['overhead_us_per_step']:8.1f} / {v['overhead_cpu_us_per_step']:8.1f} us   "
                  f"ops/step {v['ops_per_step_steady']} steady ({v['ops_per_step_steady_no_views']} without views), "
                  f"{v['ops_per_step']:.2f} amortised")
        print(f"    diffusers / FastSampler overhead x{r['overhead_ratio_diffusers_loop_over_fast']:.2f} "
              f"(cpu x{r['overhead_cpu_ratio_diffusers_loop_over_fast']:.2f}); sampler.sample / FastSampler "
              f"x{r['overhead_ratio_sampler_sample_over_fast']:.2f}")
    if "e2e_cpu" not in result:
        return
    print(f"(b) end to end, DDPM CIFAR-10 U-Net, batch {E2E_BATCH}, {E2E_STEPS} steps, CPU")
    for r in result["e2e_cpu"]:
        f, d = r["fast_sampler"], r["diffusers_pipeline"]
        print(f"  {r['sampler']}: FastSampler {f['images_per_s']:.3f} img/s ({f['images_per_cpu_s']:.3f} per CPU-s), "
              f"diffusers pipeline {d['images_per_s']:.3f} img/s ({d['images_per_cpu_s']:.3f} per CPU-s): "
              f"ratio x{r['speedup_vs_diffusers']:.3f} wall, x{r['speedup_vs_diffusers_cpu']:.3f} CPU")
        if "fast_sampler_unconverted" in r:
            u = r["fast_sampler_unconverted"]
            print(f"    FastSampler around diffusers' UNet2DModel (convert=False) {u['images_per_s']:.3f} img/s "
                  f"({u['images_per_cpu_s']:.3f} per CPU-s): x{r['speedup_unconverted_vs_diffusers']:.3f} wall, "
                  f"x{r['speedup_unconverted_vs_diffusers_cpu']:.3f} CPU")
    u = result.get("unet_forward_cpu")
    if u:
        print(f"  U-Net forward, batch {u['batch']}: fd.UNet {u['fastddpm']['cpu_s_per_forward']:.3f} s CPU, "
              f"UNet2DModel {u['diffusers']['cpu_s_per_forward']:.3f} s CPU: "
              f"x{u['cpu_time_ratio_fastddpm_over_diffusers']:.3f} time")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--overhead-repeats", type=int, default=15, help="timed repeats of part (a) (default 15)")
    p.add_argument("--e2e-repeats", type=int, default=2, help="timed repeats of part (b) (default 2)")
    p.add_argument("--skip-e2e", action="store_true", help="skip part (b) (the slow one on a CPU)")
    p.add_argument("--no-unconverted", action="store_true",
                   help="in part (b), skip FastSampler around diffusers' unconverted UNet2DModel")
    p.add_argument("--gpu-steps", type=int, nargs="*", default=list(GPU_STEPS), help="steps of part (c)")
    args = p.parse_args(argv)
    env = os.environ.get("OMP_NUM_THREADS")
    given = list(sys.argv[1:] if argv is None else argv)  # the command as run, every option included
    command = (f"OMP_NUM_THREADS={env} " if env else "") + " ".join(["python benchmarks/bench_sampling.py", *given])
    cpu: Dict[str, Any] = {"benchmark": "sampling on the CPU: per-step overhead, ops per step, end-to-end images/s",
                           "command": command, "threads": torch.get_num_threads(),
                           "overhead": run_overhead(args.overhead_repeats)}
    if not args.skip_e2e:
        ref, ours = ddpm_cifar10_pair()
        cpu["unet_forward_cpu"] = unet_forward_cpu(ref, ours)
        del ours
        cpu["e2e_cpu"] = run_e2e_cpu(args.e2e_repeats, unconverted=not args.no_unconverted, ref=ref)
    paths = [write_result("sampling_cpu", cpu)]
    gpu = None
    if torch.cuda.is_available():
        gpu = {"benchmark": "sampling on CUDA, batch 256 bf16: FastSampler vs diffusers eager and compiled",
               "command": command, "rows": run_gpu(args.gpu_steps)}
        paths.append(write_result("sampling_gpu", gpu))
    if args.json:
        print(json.dumps({"cpu": cpu, "gpu": gpu, "machine": machine()}, indent=2, default=str))
    else:
        _print_cpu(cpu)
        if gpu:
            for r in gpu["rows"]:
                print(f"  gpu {r['sampler']} {r['steps']} steps: " + ", ".join(
                    f"{k} {v['images_per_s']:.1f} img/s" for k, v in r.items() if isinstance(v, dict)))
        else:
            print("(c) no CUDA: GPU cases skipped")
    print("written to " + ", ".join(paths), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

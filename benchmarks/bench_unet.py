"""U-Net forward and training-step time, fastddpm's UNet beside diffusers' UNet2DModel (same weights).

Two modes:

    python -m pytest benchmarks/bench_unet.py                # pytest-benchmark suite (not part of tests/)
    python benchmarks/bench_unet.py --json [--reps 3]        # script: prints JSON, writes results/unet_cpu.json

Model: the DDPM CIFAR-10 config (35.7M parameters; `benchmarks.common.ddpm_cifar10_pair`, diffusers'
weights perturbed so no layer is zero, then converted with `fd.unet_from_diffusers`), batch 8 of
3x32x32, random timesteps.

CPU cases (fp32):
* forward under torch.no_grad, eval mode;
* training step = forward + eps-MSE loss + backward + AdamW step (lr 1e-4), train mode (dropout 0 in
  both: the DDPM CIFAR-10 UNet2DModel config has none); fastddpm with its default memory-lean mode
  (`recompute_norm=True`: GroupNorm+SiLU outputs recomputed in backward) and with it off.
In script mode the cases run interleaved (one call of each per round, after a warm-up call), so the
ratios come from the same run under the same machine load; medians are reported (ratios of medians, and
the medians of per-round ratios, which load drift on a shared machine disturbs less), and the bytes saved
for backward per sample (`fastddpm.profiling.saved_bytes`) of each training case beside them.
In pytest mode each fastddpm case records `ratio_vs_diffusers` (its median over diffusers' median,
same session) in the benchmark's extra_info.

GPU cases (skipped without CUDA): bf16 autocast forward and training step at batch 64, diffusers
eager / torch.compile vs fastddpm eager (Triton kernels) / torch.compile (Triton kernels inside the
compiled graph) / the reference ops.

The machine this was written on has 2 shared CPU cores: keep --reps small; the default uses 1 thread
(`--threads` to change), recorded in the JSON's machine block.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # script mode from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import ddpm_cifar10_pair, write_result  # noqa: E402
from fastddpm.profiling import saved_bytes  # noqa: E402

BATCH = 8
GPU_BATCH = 64
CPU_IMPLS = ("diffusers", "fastddpm", "fastddpm_no_recompute")


def _set_recompute(model: torch.nn.Module, on: bool) -> torch.nn.Module:
    for m in model.modules():
        if hasattr(m, "recompute_norm"):
            m.recompute_norm = on
    return model


def make_models(device: str = "cpu", dtype: torch.dtype = torch.float32) -> Dict[str, torch.nn.Module]:
    """diffusers, fastddpm (recompute on) and fastddpm with recompute off; same weights."""
    ref, ours = ddpm_cifar10_pair(device=device, dtype=dtype)
    return {"diffusers": ref, "fastddpm": _set_recompute(ours, True),
            "fastddpm_no_recompute": _set_recompute(copy.deepcopy(ours), False)}


def make_inputs(batch: int, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    noise = torch.randn(batch, 3, 32, 32, generator=g).to(device, dtype)
    return x, t, noise


def _out(y: Any) -> torch.Tensor:
    return y if isinstance(y, torch.Tensor) else y.sample


def forward_fn(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, sync: bool = False) -> Callable[[], Any]:
    """One forward under torch.no_grad, eval mode."""
    model.eval()

    def run() -> torch.Tensor:
        with torch.no_grad():
            y = _out(model(x, t))
        if sync:
            torch.cuda.synchronize()
        return y

    return run


def train_step_fn(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                  sync: bool = False, autocast_dtype: torch.dtype = None,
                  call: Callable = None) -> Callable[[], float]:
    """One training step: forward, eps-MSE loss, backward, AdamW step (the model's own optimizer)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    call = call if call is not None else model

    def run() -> float:
        opt.zero_grad(set_to_none=True)
        if autocast_dtype is not None:
            with torch.autocast(x.device.type, dtype=autocast_dtype):
                out = _out(call(x, t))
        else:
            out = _out(call(x, t))
        loss = torch.nn.functional.mse_loss(out.float(), noise.float())
        loss.backward()
        opt.step()
        if sync:
            torch.cuda.synchronize()
        return loss.detach()

    return run


def saved_bytes_per_sample(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> float:
    """Bytes autograd saves for backward in one training forward + loss, per sample (parameters excluded)."""
    model.train()
    n = saved_bytes(lambda: torch.nn.functional.mse_loss(_out(model(x, t)), noise), exclude=model.parameters())
    return n / x.shape[0]


def _interleaved(cases: Dict[str, Callable[[], Any]], reps: int) -> Dict[str, Dict[str, float]]:
    for fn in cases.values():  # warm-up
        fn()
    times: Dict[str, List[float]] = {k: [] for k in cases}
    for _ in range(reps):
        for k, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "times_s": v} for k, v in times.items()}


def _paired(res: Dict[str, Dict[str, Any]], a: str, b: str) -> float:
    """Median over rounds of time(a) / time(b) in the same round (adjacent calls: robust to load drift)."""
    return statistics.median(x / y for x, y in zip(res[a]["times_s"], res[b]["times_s"]))


def run_cpu(reps: int = 3, batch: int = BATCH) -> Dict[str, Any]:
    models = make_models()
    x, t, noise = make_inputs(batch)
    fwd = _interleaved({k: forward_fn(models[k], x, t) for k in ("diffusers", "fastddpm")}, reps)
    step = _interleaved({k: train_step_fn(models[k], x, t, noise) for k in CPU_IMPLS}, reps)
    mem = {k: saved_bytes_per_sample(models[k], x, t, noise) for k in CPU_IMPLS}
    d = step["diffusers"]["median_s"]
    return {
        "config": "DDPM CIFAR-10 UNet (35.7M params), fp32, CPU", "batch": batch, "reps": reps,
        "forward": fwd,
        "forward_ratio_fastddpm_vs_diffusers": fwd["fastddpm"]["median_s"] / fwd["diffusers"]["median_s"],
        "train_step": step,
        "train_step_ratio_fastddpm_vs_diffusers": step["fastddpm"]["median_s"] / d,
        "train_step_ratio_fastddpm_no_recompute_vs_diffusers": step["fastddpm_no_recompute"]["median_s"] / d,
        "train_step_ratio_recompute_vs_no_recompute":
            step["fastddpm"]["median_s"] / step["fastddpm_no_recompute"]["median_s"],
        "paired_ratios": {  # median of the per-round ratios
            "forward_fastddpm_vs_diffusers": _paired(fwd, "fastddpm", "diffusers"),
            "train_step_fastddpm_vs_diffusers": _paired(step, "fastddpm", "diffusers"),
            "train_step_fastddpm_no_recompute_vs_diffusers": _paired(step, "fastddpm_no_recompute", "diffusers"),
            "train_step_recompute_vs_no_recompute": _paired(step, "fastddpm", "fastddpm_no_recompute"),
        },
        "saved_bytes_per_sample": mem,
        "saved_bytes_ratio_fastddpm_vs_diffusers": mem["fastddpm"] / mem["diffusers"],
        "saved_bytes_ratio_fastddpm_no_recompute_vs_diffusers": mem["fastddpm_no_recompute"] / mem["diffusers"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the JSON only")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    payload = {"unet_cpu": run_cpu(args.reps, args.batch),
               "command": f"python benchmarks/bench_unet.py --json --reps {args.reps} --batch {args.batch} "
                          f"--threads {args.threads}"}
    path = write_result("unet_cpu", payload)
    print(json.dumps(payload, indent=2))
    if not args.json:
        print(f"written to {path}", file=sys.stderr)


# ------------------------------------------------------------------------------------ pytest suite
try:
    import pytest
except ImportError:  # script mode without pytest
    pytest = None

if pytest is not None:
    _MEDIANS: Dict[str, float] = {}

    def _record(benchmark, key: str, base: str) -> None:
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable
            return
        _MEDIANS[key] = stats.stats.median
        if base in _MEDIANS and key != base:
            benchmark.extra_info["ratio_vs_diffusers"] = _MEDIANS[key] / _MEDIANS[base]

    @pytest.fixture(scope="module")
    def cpu_models():
        torch.manual_seed(0)
        return make_models()

    @pytest.fixture(scope="module")
    def cpu_inputs():
        return make_inputs(BATCH)

    @pytest.mark.parametrize("impl", ("diffusers", "fastddpm"))
    def test_unet_forward_cpu(benchmark, cpu_models, cpu_inputs, impl):
        x, t, _ = cpu_inputs
        benchmark.group = "unet-forward-cpu-fp32-b8"
        y = benchmark.pedantic(forward_fn(cpu_models[impl], x, t), rounds=3, warmup_rounds=1, iterations=1)
        assert y.shape == x.shape
        _record(benchmark, f"forward/{impl}", "forward/diffusers")

    @pytest.mark.parametrize("impl", CPU_IMPLS)
    def test_unet_train_step_cpu(benchmark, cpu_models, cpu_inputs, impl):
        x, t, noise = cpu_inputs
        benchmark.group = "unet-train-step-cpu-fp32-b8"
        benchmark.extra_info["saved_bytes_per_sample"] = saved_bytes_per_sample(cpu_models[impl], x, t, noise)
        loss = benchmark.pedantic(train_step_fn(cpu_models[impl], x, t, noise), rounds=3, warmup_rounds=1,
                                  iterations=1)
        assert torch.isfinite(loss)
        _record(benchmark, f"step/{impl}", "step/diffusers")

    # ---------------------------------------------------------------------------------- GPU cases
    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    GPU_VARIANTS = ("diffusers-eager", "diffusers-compile", "fastddpm-triton", "fastddpm-triton-compile",
                    "fastddpm-reference")

    @pytest.fixture(scope="module")
    def gpu_models():
        return make_models(device="cuda")

    def _gpu_call(models: Dict[str, torch.nn.Module], variant: str):
        """(model, callable, backend) of a GPU variant."""
        impl, rest = variant.split("-", 1)
        model = models["diffusers" if impl == "diffusers" else "fastddpm"]
        call = torch.compile(model, fullgraph=impl != "diffusers") if rest.endswith("compile") else model
        backend = "reference" if rest == "reference" else "auto"
        return model, call, backend

    @cuda
    @pytest.mark.parametrize("variant", GPU_VARIANTS)
    def test_unet_forward_gpu_bf16(benchmark, gpu_models, variant):
        from fastddpm.ops import use_backend

        torch._dynamo.reset()
        model, call, backend = _gpu_call(gpu_models, variant)
        x, t, _ = make_inputs(GPU_BATCH, device="cuda")
        model.eval()
        benchmark.group = "unet-forward-gpu-bf16-b64"

        def run():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                y = _out(call(x, t))
            torch.cuda.synchronize()
            return y

        with use_backend(backend):
            y = benchmark.pedantic(run, rounds=10, warmup_rounds=3, iterations=1)
        assert torch.isfinite(y).all()
        _record(benchmark, f"gpu-forward/{variant}", "gpu-forward/diffusers-eager")

    @cuda
    @pytest.mark.parametrize("variant", GPU_VARIANTS)
    def test_unet_train_step_gpu_bf16(benchmark, gpu_models, variant):
        from fastddpm.ops import use_backend

        torch._dynamo.reset()
        model, call, backend = _gpu_call(gpu_models, variant)
        x, t, noise = make_inputs(GPU_BATCH, device="cuda")
        benchmark.group = "unet-train-step-gpu-bf16-b64"
        step = train_step_fn(model, x, t, noise, sync=True, autocast_dtype=torch.bfloat16, call=call)
        with use_backend(backend):
            loss = benchmark.pedantic(step, rounds=10, warmup_rounds=3, iterations=1)
        assert torch.isfinite(loss)
        _record(benchmark, f"gpu-step/{variant}", "gpu-step/diffusers-eager")


if __name__ == "__main__":
    main()

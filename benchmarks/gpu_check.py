"""Every GPU-only check of fastddpm in one call: the GPU tests, then the GPU benchmarks.

    python benchmarks/gpu_check.py                      # everything, within an 8-minute budget
    python benchmarks/gpu_check.py --parts tests,attention --budget 120
    python benchmarks/gpu_check.py --dry-run            # the same code paths on the CPU (interpreter)

Parts, in order (each with its own time budget; unused time carries over to the next part; a part
whose time has run out stops cleanly, records what it skipped, and says so):

  tests       `pytest -m gpu tests`: every test that skips without CUDA (tests/gpu and the rest)
  device      measured ceilings: device-to-device copy bandwidth, bf16 matmul rate (random data)
  group_norm  GroupNorm+SiLU (scale-shift) forward and forward+backward: GB/s of the modelled HBM
              bytes and % of the device's peak bandwidth, at 32x128x64x64 and the CIFAR-10 U-Net's
              shapes; torch eager and torch.compile of the same composition in the same run
  attention   forward and forward+backward time against F.scaled_dot_product_attention at the
              U-Net's shapes (bf16), TFLOP/s and % of peak
  step        the fused sampler step against the unfused reference, GB/s (256x3x32x32)
  unet        the DDPM CIFAR-10 U-Net forward and training step (bf16): fd.UNet against diffusers'
              UNet2DModel (same weights), eager and under torch.compile
  layout      fd.UNet (bf16, eager) forward and forward+backward with NCHW activations (the CUDA
              default) against channels-last ones (NHWC: cuDNN's bf16 convolutions, the GroupNorm
              kernels' channels-last path): times, ratios and the verdict the default waits for
  sampling    FastSampler end to end (DDIM-50, DDPM-1000; batch 256; bf16 and fp32; capture step,
              loop and none) in images/s against diffusers' DDIMPipeline / DDPMPipeline, same weights

Timing (benchmarks' METHOD): CUDA events around the timed region only, warm-up first (Triton
compilation, autotuning, Inductor, graph capture stay out of the numbers), the L2 cache flushed
before every repetition of a kernel-level figure (a write over a buffer twice the L2 size), the
median of the repetitions; fresh random inputs (never zeros). End-to-end sampling is timed by wall
clock between device synchronisations. Each fused op's output is checked against torch's before it
is timed (max relative error recorded).

Writes benchmarks/results/gpu_<device>.json (device name, driver, torch / triton / CUDA versions,
the peaks used, every figure, each part's seconds and status), which benchmarks/report.py renders
into docs/performance.md. `--dry-run` runs the same parts on the CPU with TRITON_INTERPRET=1, tiny shapes,
each timed function called once and no timings (figures are null), and writes into a temporary
folder unless --out is given; tests/test_gpu_check.py runs it, so the script cannot rot.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:  # before anything imports triton
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # script mode from a checkout
    sys.path.insert(0, str(ROOT))

import fastddpm as fd  # noqa: E402
from benchmarks.common import DDPM_CIFAR10_DIFFUSERS, RESULTS, machine  # noqa: E402

# Datasheet peaks by device name (first match wins): HBM bytes/s, dense bf16 FLOP/s.
PEAKS: List[Tuple[str, float, float]] = [
    ("H200", 4.8e12, 989e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100", 3.35e12, 989e12),   # SXM
    ("A100", 2.0e12, 312e12),
]
# Seconds per part, 480 in all (8 minutes on one H100 / H200, compilation and autotuning included).
# "layout" took its 30 s from "tests" (10) and "sampling" (20); unused time of a part carries over.
PART_BUDGETS: Dict[str, float] = {"tests": 110, "device": 10, "group_norm": 35, "attention": 35, "step": 15,
                                  "unet": 110, "layout": 30, "sampling": 135}
PARTS = tuple(PART_BUDGETS)
CIFAR_GN_SHAPES = [(128, 128, 32, 32), (128, 256, 16, 16), (128, 256, 8, 8), (128, 256, 4, 4), (128, 512, 16, 16)]
ATTN_SHAPES = [(128, 1, 256, 256), (64, 4, 256, 64), (32, 4, 1024, 64), (16, 1, 256, 512)]
# A tiny UNet2DModel for --dry-run (the same block types as the CIFAR-10 config)
TINY_DIFFUSERS = dict(DDPM_CIFAR10_DIFFUSERS, sample_size=8, block_out_channels=(32, 32),
                      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8)


def device_peaks(name: str) -> Dict[str, Optional[float]]:
    """{"hbm_Bps", "bf16_flops", "matched"} for a device name (None where the name is not listed)."""
    for key, hbm, flops in PEAKS:
        if key.lower() in name.lower():
            return {"matched": key, "hbm_Bps": hbm, "bf16_flops": flops}
    return {"matched": None, "hbm_Bps": None, "bf16_flops": None}


def pct(value: Optional[float], peak: Optional[float]) -> Optional[float]:
    return None if value is None or not peak else 100.0 * value / peak


def per_s(amount: float, seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None or seconds <= 0 else amount / seconds


# ------------------------------------------------------------------------------ run context
class Context:
    """Device, dry-run flag, the current part's deadline and the L2-flush buffer."""

    def __init__(self, device: torch.device, dry: bool):
        self.device, self.dry = device, dry
        self.deadline = math.inf
        self.skipped: List[str] = []
        self._flush: Optional[torch.Tensor] = None
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
        self.peaks = device_peaks(name)
        self.measured: Dict[str, Optional[float]] = {}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def has_time(self, what: str, need_s: float = 0.0) -> bool:
        """False (and `what` recorded as skipped) when the part's budget cannot fit `need_s` more."""
        if self.left() > need_s:
            return True
        self.skipped.append(what)
        print(f"    skipped (time budget of this part spent): {what}", flush=True)
        return False

    def flush_l2(self) -> None:
        if self.device.type != "cuda":
            return
        if self._flush is None:
            l2 = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 64 << 20)
            self._flush = torch.empty(max(2 * l2, 128 << 20) // 4, dtype=torch.int32, device=self.device)
        self._flush.fill_(1)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_kernel(self, fn: Callable[[], Any], reps: int = 30, warmup: int = 3, flush: bool = True) -> Optional[float]:
        """Median seconds of `fn` by CUDA events (L2 flushed before each rep); dry run: one call, None."""
        if self.dry:
            fn()
            return None
        for _ in range(warmup):
            fn()
        self.sync()
        events = []
        for _ in range(reps):
            if flush:
                self.flush_l2()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        self.sync()
        return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3

    def time_wall(self, fn: Callable[[], Any], reps: int = 1, warmup: Optional[Callable[[], Any]] = None
                  ) -> Optional[float]:
        """Median wall seconds of `fn` between synchronisations, after one call of `warmup` (default `fn`
        itself); dry run: None."""
        (warmup or fn)()
        if self.dry:
            return None
        times = []
        for _ in range(reps):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def randn(ctx: Context, *shape: int, dtype: torch.dtype = torch.bfloat16, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, device=ctx.device) * scale).to(dtype)


def compile_fn(ctx: Context, fn: Any) -> Any:
    """torch.compile as a user would (inductor, default mode). The dry run returns `fn` itself: tracing
    a U-Net costs the CPU tens of seconds, and compile-friendliness is tested in tests/ already."""
    return fn if ctx.dry else torch.compile(fn)


# ------------------------------------------------------------------------------ part: tests
def part_tests(ctx: Context) -> Dict[str, Any]:
    """Every test marked gpu (tests/conftest.py marks tests/gpu and each 'needs CUDA' skip)."""
    # the dry run collects tests/gpu only (same subprocess and parsing; nothing there runs without CUDA)
    target = ["--co", "tests/gpu"] if ctx.dry else ["-m", "gpu", "tests"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *target]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    timeout = max(1.0, ctx.left())
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        ctx.skipped.append(f"pytest stopped after {timeout:.0f} s (budget)")
        return {"command": " ".join(cmd[1:]), "returncode": None, "timed_out": True, "tail": out[-2000:]}
    out = proc.stdout + proc.stderr
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed)", out)}
    failed = [ln.strip() for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    print("    " + (out.strip().splitlines() or ["(no output)"])[-1], flush=True)
    return {"command": "python " + " ".join(cmd[1:]), "returncode": proc.returncode, "counts": counts,
            "failed": failed[:50], "ok": proc.returncode in (0, 5) and not failed}


# ------------------------------------------------------------------------------ part: device ceilings
def part_device(ctx: Context) -> Dict[str, Any]:
    n_copy = (1 << 16) if ctx.dry else (1 << 28)  # int32 elements: 1 GiB on a GPU
    src = torch.randint(0, 1 << 30, (n_copy,), dtype=torch.int32, device=ctx.device)
    dst = torch.empty_like(src)
    t_copy = ctx.time_kernel(lambda: dst.copy_(src), reps=20, flush=False)
    m = 256 if ctx.dry else 8192
    a, b = randn(ctx, m, m), randn(ctx, m, m)
    t_mm = ctx.time_kernel(lambda: a @ b, reps=20, flush=False)
    copy_bps = per_s(2 * src.numel() * 4, t_copy)  # bytes read + bytes written
    mm_flops = per_s(2 * m ** 3, t_mm)
    ctx.measured = {"copy_Bps": copy_bps, "bf16_matmul_flops": mm_flops}
    return {"copy_bytes": 2 * src.numel() * 4, "copy_s": t_copy, "copy_Bps": copy_bps,
            "copy_pct_of_peak": pct(copy_bps, ctx.peaks["hbm_Bps"]), "matmul_n": m, "matmul_s": t_mm,
            "bf16_matmul_flops": mm_flops, "matmul_pct_of_peak": pct(mm_flops, ctx.peaks["bf16_flops"])}


# ------------------------------------------------------------------------------ part: GroupNorm + SiLU
def _gn_torch(x, w, b, scale, shift, groups):
    y = F.group_norm(x, groups, w, b, 1e-5)
    return F.silu(y * (1 + scale[:, :, None, None]) + shift[:, :, None, None])


def _fwd_bwd(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], dy: torch.Tensor) -> Callable[[], Any]:
    def run():
        return torch.autograd.grad(fn(*inputs), inputs, dy)
    return run


def part_group_norm(ctx: Context) -> Dict[str, Any]:
    from fastddpm.ops import group_norm_silu

    gn_hbm = _kernel_module("group_norm").modelled_hbm_bytes
    shapes = [(2, 16, 3, 5)] if ctx.dry else [(32, 128, 64, 64)] + CIFAR_GN_SHAPES
    groups = 4 if ctx.dry else 32
    rows, compiled = [], compile_fn(ctx, _gn_torch)
    for impls in (("fastddpm", "torch_eager"), ("torch_compile",)):
        for n, c, h, w in shapes:
            if not ctx.has_time(f"group_norm {impls} {n}x{c}x{h}x{w}", 1.0):
                break
            x = randn(ctx, n, c, h, w, scale=2.0).requires_grad_(True)
            params = [randn(ctx, c).requires_grad_(True), randn(ctx, c).requires_grad_(True),
                      randn(ctx, n, c, scale=0.2).requires_grad_(True), randn(ctx, n, c, scale=0.2).requires_grad_(True)]
            inputs, dy = [x] + params, randn(ctx, n, c, h, w)
            fns = {"fastddpm": lambda *i: group_norm_silu(i[0], i[1], i[2], groups, 1e-5, scale=i[3], shift=i[4]),
                   "torch_eager": lambda *i: _gn_torch(*i, groups),
                   "torch_compile": lambda *i: compiled(*i, groups)}
            model = gn_hbm(n, c, h, w, groups, 2)
            row = rows_by_shape(rows, (n, c, h, w))
            with torch.no_grad():
                ref = _gn_torch(*[t.float() for t in inputs], groups)
            for impl in impls:
                with torch.no_grad():
                    row[f"{impl}_rel_err"] = rel_err(fns[impl](*inputs), ref)
                    t_f = ctx.time_kernel(lambda: fns[impl](*inputs))
                t_fb = ctx.time_kernel(_fwd_bwd(fns[impl], inputs, dy))
                row[impl] = {"fwd_s": t_f, "fwd_bwd_s": t_fb,
                             "fwd_GBps": _gb(per_s(model["fused_fwd"], t_f)),
                             "fwd_bwd_GBps": _gb(per_s(model["fused"], t_fb))}
                row[impl]["fwd_bwd_pct_of_peak"] = pct(per_s(model["fused"], t_fb), ctx.peaks["hbm_Bps"])
                row[impl]["fwd_pct_of_peak"] = pct(per_s(model["fused_fwd"], t_f), ctx.peaks["hbm_Bps"])
            row["modelled_bytes_fused"], row["dtype"] = model["fused"], "bfloat16"
    return {"rows": rows, "bytes_model": "kernels.group_norm.modelled_hbm_bytes (fused forward + backward, "
            "the same bytes for every implementation)"}


def rows_by_shape(rows: List[Dict[str, Any]], shape: Tuple[int, ...]) -> Dict[str, Any]:
    for r in rows:
        if r["shape"] == list(shape):
            return r
    rows.append({"shape": list(shape)})
    return rows[-1]


def _gb(bps: Optional[float]) -> Optional[float]:
    return None if bps is None else bps / 1e9


def _kernel_module(name: str) -> Any:
    import importlib

    return importlib.import_module(f"kernels.{name}")


# ------------------------------------------------------------------------------ part: attention
def part_attention(ctx: Context) -> Dict[str, Any]:
    from fastddpm.ops import attention

    shapes = [(2, 1, 16, 32), (1, 2, 20, 16), (1, 1, 8, 512)] if ctx.dry else ATTN_SHAPES
    rows = []
    for b, h, n, d in shapes:
        if not ctx.has_time(f"attention {b}x{h}x{n}x{d}", 1.0):
            break
        q, k, v = (randn(ctx, b, h, n, d, scale=1.5).requires_grad_(True) for _ in range(3))
        do = randn(ctx, b, h, n, d)
        flops_f = 4 * b * h * n * n * d  # two matmuls of 2*N*N*D per (batch, head)
        flops_fb = flops_f * 3.5         # backward: five such matmuls (2.5x the forward)
        row: Dict[str, Any] = {"shape": [b, h, n, d], "dtype": "bfloat16",
                               "path": "sdpa (head_dim > 256)" if d > 256 else "triton"}
        with torch.no_grad():
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            row["fastddpm_rel_err"] = rel_err(attention(q, k, v), ref)
        for impl, fn in (("fastddpm", attention), ("sdpa", F.scaled_dot_product_attention)):
            with torch.no_grad():
                t_f = ctx.time_kernel(lambda: fn(q, k, v))
            t_fb = ctx.time_kernel(_fwd_bwd(fn, (q, k, v), do))
            row[impl] = {"fwd_s": t_f, "fwd_bwd_s": t_fb, "fwd_tflops": _t(per_s(flops_f, t_f)),
                         "fwd_bwd_tflops": _t(per_s(flops_fb, t_fb)),
                         "fwd_pct_of_peak": pct(per_s(flops_f, t_f), ctx.peaks["bf16_flops"]),
                         "fwd_bwd_pct_of_peak": pct(per_s(flops_fb, t_fb), ctx.peaks["bf16_flops"])}
        row["fwd_time_ratio_vs_sdpa"] = _ratio(row["fastddpm"]["fwd_s"], row["sdpa"]["fwd_s"])
        row["fwd_bwd_time_ratio_vs_sdpa"] = _ratio(row["fastddpm"]["fwd_bwd_s"], row["sdpa"]["fwd_bwd_s"])
        rows.append(row)
    return {"rows": rows, "flops_model": "forward 4*B*H*N^2*D, forward+backward 3.5x that"}


def _t(flops: Optional[float]) -> Optional[float]:
    return None if flops is None else flops / 1e12


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b <= 0 else a / b


# ------------------------------------------------------------------------------ part: sampler step
def part_step(ctx: Context) -> Dict[str, Any]:
    from fastddpm.ops import sampler_step, use_backend

    hbm = _kernel_module("sampler_step").hbm_bytes_fused
    shape = (2, 3, 8, 8) if ctx.dry else (256, 3, 32, 32)
    diff = fd.GaussianDiffusion(fd.NoiseSchedule.linear(1000))
    rows = []
    for kind, sampler in (("ddpm", fd.DDPMSampler(diff)), ("dpm++", fd.DPMSolverSampler(diff, steps=20))):
        coefs, steps, _ = sampler.device_tables(ctx.device)
        for dtype in (torch.bfloat16, torch.float32):
            if not ctx.has_time(f"step {kind} {dtype}", 0.5):
                break
            x, mo = randn(ctx, *shape, dtype=dtype), randn(ctx, *shape, dtype=dtype, scale=0.5)
            x0p = randn(ctx, *shape, dtype=dtype) if sampler.uses_x0_prev else None
            seed = torch.tensor([7], dtype=torch.int64, device=ctx.device)
            step = steps[3:4]
            args = (x, mo, coefs, step, x0p, None, seed, 0, True, False)
            numel, elem = x.numel(), x.element_size()
            nbytes = hbm(numel, elem, False, x0p is not None, False)
            row: Dict[str, Any] = {"sampler": kind, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
                                   "modelled_bytes": nbytes}
            with use_backend("reference"):
                ref = sampler_step(*args)[0]
            row["fused_rel_err"] = rel_err(sampler_step(*args)[0], ref)
            for impl, backend in (("fused", "triton"), ("unfused_reference", "reference")):
                with use_backend(backend):
                    t = ctx.time_kernel(lambda: sampler_step(*args), reps=50)
                row[impl] = {"s": t, "GBps": _gb(per_s(nbytes, t)),
                             "pct_of_peak": pct(per_s(nbytes, t), ctx.peaks["hbm_Bps"])}
            row["time_ratio_fused_vs_unfused"] = _ratio(row["fused"]["s"], row["unfused_reference"]["s"])
            rows.append(row)
    return {"rows": rows, "bytes_model": "kernels.sampler_step.hbm_bytes_fused (the fused kernel's compulsory "
            "bytes; the unfused row uses the same bytes, so its GB/s is an effective rate)"}


# ------------------------------------------------------------------------------ part: U-Net
def _model_pair(ctx: Context, dtype: torch.dtype = torch.float32) -> Tuple[Any, Any]:
    """(diffusers UNet2DModel, fd.UNet) with the same weights: the CIFAR-10 config (tiny in the dry run)."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # its advice on .to(dtype) for from_pretrained models

    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(**(TINY_DIFFUSERS if ctx.dry else DDPM_CIFAR10_DIFFUSERS))
    with torch.no_grad():  # leave no layer at zero
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ours = fd.unet_from_diffusers(ref)
    return ref.to(ctx.device, dtype).eval(), ours.to(ctx.device, dtype).eval()


def _call(model: Any, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    out = model(x, t)
    return out if isinstance(out, torch.Tensor) else out.sample


def part_unet(ctx: Context) -> Dict[str, Any]:
    batch = 2 if ctx.dry else 128
    ref32, ours32 = _model_pair(ctx)
    size = ref32.config.sample_size
    x32 = torch.randn(batch, 3, size, size, device=ctx.device)
    t = torch.randint(0, 1000, (batch,), device=ctx.device)
    target = torch.randn_like(x32)
    models = {"fastddpm": ours32, "diffusers": ref32}
    result: Dict[str, Any] = {"config": "DDPM CIFAR-10 (35.7M parameters)" if not ctx.dry else "tiny (dry run)",
                              "batch": batch, "dtype": "bfloat16", "forward": {}, "train_step": {}}
    with torch.no_grad():
        result["forward_rel_err_fastddpm_vs_diffusers"] = rel_err(_call(ours32, x32, t), _call(ref32, x32, t))
    for compiled in (False, True):
        for name, m32 in models.items():
            key = f"{name}_{'compiled' if compiled else 'eager'}"
            # Inductor takes tens of seconds per model: start a compiled variant only with that in hand
            if not ctx.has_time(f"unet forward {key}", 40.0 if compiled and not ctx.dry else 5.0):
                break
            m16 = _copy_to(m32, torch.bfloat16)
            fwd = compile_fn(ctx, m16) if compiled else m16
            x16 = x32.to(torch.bfloat16)
            with torch.no_grad():
                result["forward"][key] = {"s": ctx.time_kernel(lambda: _call(fwd, x16, t), reps=10, warmup=3,
                                                               flush=False)}
            if not ctx.has_time(f"unet training step {key}", 60.0 if compiled and not ctx.dry else 5.0):
                continue
            train = _copy_to(m32, torch.float32).train()
            opt = torch.optim.AdamW(train.parameters(), lr=1e-4)
            step_model = compile_fn(ctx, train) if compiled else train

            def train_step(model=step_model, opt=opt):
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
                    loss = F.mse_loss(_call(model, x32, t).float(), target)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            result["train_step"][key] = {"s": ctx.time_kernel(train_step, reps=10, warmup=3, flush=False)}
    for section in ("forward", "train_step"):
        for mode in ("eager", "compiled"):
            ours, theirs = result[section].get(f"fastddpm_{mode}"), result[section].get(f"diffusers_{mode}")
            if ours and theirs:
                result[f"{section}_{mode}_time_ratio_fastddpm_vs_diffusers"] = _ratio(ours["s"], theirs["s"])
    return result


def _copy_to(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).to(dtype)


# ------------------------------------------------------------------------------ part: layout
LAYOUTS = {"nchw": ("contiguous", torch.contiguous_format), "channels_last": ("channels_last", torch.channels_last)}
# channels-last must beat NCHW by more than this (time ratio) in forward and forward+backward to be the verdict
LAYOUT_MARGIN = 0.97


def part_layout(ctx: Context) -> Dict[str, Any]:
    """fd.UNet in bf16, activations (and convolution weights) NCHW vs channels-last, eager: forward
    (no grad) and forward+backward (training mode, the parameters' gradients) times, the two outputs
    compared, and the verdict for `preferred_memory_format` on CUDA."""
    from fastddpm.ops import use_memory_format

    batch = 2 if ctx.dry else 128
    _, ours32 = _model_pair(ctx)
    size = ours32.image_size
    x = torch.randn(batch, 3, size, size, device=ctx.device, dtype=torch.bfloat16)
    t = torch.randint(0, 1000, (batch,), device=ctx.device)
    result: Dict[str, Any] = {"batch": batch, "dtype": "bfloat16", "config": "DDPM CIFAR-10" if not ctx.dry
                              else "tiny (dry run)", "margin": LAYOUT_MARGIN}
    outs = {}
    for key, (name, fmt) in LAYOUTS.items():
        if not ctx.has_time(f"layout {key}", 5.0):
            break
        model = _copy_to(ours32, torch.bfloat16).to(memory_format=fmt)
        with use_memory_format(name):
            with torch.no_grad():
                outs[key] = _call(model.eval(), x, t).float()
                t_f = ctx.time_kernel(lambda: _call(model, x, t), reps=10, warmup=3, flush=False)
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]

            def fwd_bwd(model=model, params=params):
                return torch.autograd.grad(_call(model, x, t).float().square().mean(), params)

            t_fb = ctx.time_kernel(fwd_bwd, reps=10, warmup=3, flush=False)
        result[key] = {"fwd_s": t_f, "fwd_bwd_s": t_fb}
        del model
    if len(outs) == 2:
        result["rel_err_channels_last_vs_nchw"] = rel_err(outs["channels_last"], outs["nchw"])
    ratios = {}
    for what in ("fwd", "fwd_bwd"):
        a, b = (result.get(k, {}).get(f"{what}_s") for k in ("channels_last", "nchw"))
        ratios[what] = result[f"{what}_time_ratio_channels_last_vs_nchw"] = _ratio(a, b)
    result["verdict"] = layout_verdict(ratios["fwd"], ratios["fwd_bwd"])
    return result


def layout_verdict(fwd_ratio: Optional[float], fwd_bwd_ratio: Optional[float]) -> str:
    """What the measurement decides for the CUDA default of `fastddpm.ops.preferred_memory_format`."""
    if fwd_ratio is None or fwd_bwd_ratio is None:
        return "not measured"
    if fwd_ratio < LAYOUT_MARGIN and fwd_bwd_ratio < LAYOUT_MARGIN:
        return "channels_last"
    return "nchw"


# ------------------------------------------------------------------------------ part: sampling
class ReplayGraphAPI:
    """Dry run only: FastSampler's capture calls on the CPU ('replay' re-runs the captured body)."""

    def side_stream(self, device):
        return None

    def on_stream(self, stream):
        return contextlib.nullcontext()

    def fork(self, stream, device):
        pass

    def join(self, stream, device):
        pass

    def capture(self, fn, device):
        return type("Replay", (), {"replay": staticmethod(fn)})()


def _schedulers(kind: str) -> Any:
    import diffusers

    if kind == "ddpm":
        return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_small",
                                       clip_sample=True)
    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)


def part_sampling(ctx: Context) -> Dict[str, Any]:
    import diffusers

    batch = 2 if ctx.dry else 256
    cases = [("ddim", 3 if ctx.dry else 50), ("ddpm", 4 if ctx.dry else 1000)]
    rows = []
    per_step: Dict[torch.dtype, float] = {}  # slowest seconds per step seen so far (DDIM rows), per dtype
    for kind, steps in cases:
        for dtype in (torch.bfloat16, torch.float32):
            label = f"{kind}-{steps} {str(dtype).replace('torch.', '')}"
            if not ctx.has_time(label, 2.0 + steps * per_step.get(dtype, 0.0)):
                continue
            ref, _ = _model_pair(ctx, dtype)
            row: Dict[str, Any] = {"sampler": kind, "steps": steps, "batch": batch,
                                   "dtype": str(dtype).replace("torch.", "")}
            pipe = (diffusers.DDIMPipeline if kind == "ddim" else diffusers.DDPMPipeline)(
                unet=ref, scheduler=_schedulers(kind))
            pipe.set_progress_bar_config(disable=True)
            extra = {"eta": 0.0} if kind == "ddim" else {}

            def pipe_call(n_steps: int = steps):
                gen = torch.Generator(device=ctx.device).manual_seed(0)
                out = pipe(batch_size=batch, num_inference_steps=n_steps, generator=gen, output_type="pt", **extra)
                return out.images.float().cpu()

            with torch.no_grad():  # eager diffusers needs no full-length warm-up: 2 steps load everything
                t_pipe = ctx.time_wall(pipe_call, warmup=lambda: pipe_call(2))
            row["diffusers_pipeline"] = {"s": t_pipe, "images_per_s": per_s(batch, t_pipe)}
            for capture in ("step", "loop", "none"):
                # a warm-up call (which captures) and the timed call: do not start what cannot finish
                if not ctx.has_time(f"{label} FastSampler capture={capture}", 1.0 + 2 * steps * per_step.get(dtype, 0.0)):
                    break
                api = ReplayGraphAPI() if ctx.dry and capture != "none" else None
                fast = fd.FastSampler.from_diffusers(ref, _schedulers(kind), sampler=kind, steps=steps,
                                                     batch_size=batch, capture=capture, graph_api=api)

                def fast_call(fast=fast):  # as the pipeline: images in [0, 1] on the host
                    return (fast(seed=0) / 2 + 0.5).clamp(0, 1).float().cpu()

                t_fast = ctx.time_wall(fast_call)  # the first call captures; the timed one replays
                row[f"fast_sampler_{capture}"] = {"s": t_fast, "images_per_s": per_s(batch, t_fast)}
                row[f"speedup_{capture}_vs_diffusers"] = _ratio(t_pipe, t_fast)
                for t in (t_pipe, t_fast):
                    if t is not None:
                        per_step[dtype] = max(per_step.get(dtype, 0.0), t / steps)
                del fast
            rows.append(row)
            del pipe, ref
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    return {"rows": rows, "note": "wall time of one call after a warm-up call, both ending in fp32 images in [0, 1] on the host"}


# ------------------------------------------------------------------------------ driver
PART_FUNCS: Dict[str, Callable[[Context], Dict[str, Any]]] = {
    "tests": part_tests, "device": part_device, "group_norm": part_group_norm, "attention": part_attention,
    "step": part_step, "unet": part_unet, "layout": part_layout, "sampling": part_sampling,
}


def versions(device: torch.device) -> Dict[str, Any]:
    info: Dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                    sm_count=props.multi_processor_count, memory_bytes=props.total_memory)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.split("\n")[0].strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info.update(device_name="cpu (dry run)", driver=None)
    return info


def _fused_backend(part: str, dry: bool) -> contextlib.AbstractContextManager:
    """Force the Triton kernels for fastddpm's ops (what "auto" picks for CUDA tensors), so a missing triton
    fails loudly instead of timing the reference. In the dry run the op-level parts run them in the
    interpreter; the whole-model parts (unet, layout, sampling) use the reference there, which is what an
    interpreted U-Net would compute, minutes faster."""
    from fastddpm.ops import triton_available, use_backend

    if dry and (part in ("unet", "layout", "sampling") or not triton_available()):
        return use_backend("reference")
    return use_backend("triton")  # raises when triton is missing: never time the reference as the kernels


def parse_parts(text: str) -> List[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"--parts takes a comma-separated subset of {','.join(PARTS)}, got {text!r}")
    return [p for p in PARTS if p in parts]


def run(parts: Sequence[str], budget_s: float, dry: bool, out_dir: Path) -> Tuple[Path, Dict[str, Any]]:
    if not dry and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: no CUDA device; use --dry-run to exercise the script on the CPU")
    device = torch.device("cuda", torch.cuda.current_device()) if not dry else torch.device("cpu")
    ctx = Context(device, dry)
    scale = budget_s / sum(PART_BUDGETS[p] for p in parts)
    start = time.perf_counter()
    end = start + budget_s
    report: Dict[str, Any] = {"benchmark": "gpu_check", "dry_run": dry, "budget_s": budget_s,
                              "command": "python benchmarks/gpu_check.py" + (f" --parts {','.join(parts)}"
                                                                             if list(parts) != list(PARTS) else ""),
                              "versions": versions(device), "peaks": ctx.peaks, "parts": {}}
    for name in PARTS:
        if name not in parts:
            continue
        t0 = time.perf_counter()
        # this part's share, plus whatever earlier parts left unused
        planned = sum(PART_BUDGETS[p] for p in parts[: parts.index(name) + 1]) * scale
        ctx.deadline = min(end, start + planned)
        ctx.skipped = []
        entry: Dict[str, Any] = {"budget_s": round(ctx.deadline - t0, 1)}
        if ctx.left() <= 0:
            entry.update(status="skipped: the time budget ran out before this part")
            print(f"[{name}] skipped: time budget spent", flush=True)
        else:
            print(f"[{name}] up to {ctx.left():.0f} s", flush=True)
            try:
                with _fused_backend(name, dry):
                    entry["result"] = PART_FUNCS[name](ctx)
                entry["status"] = "ok" if not ctx.skipped else "partial: budget ran out"
                if name == "tests" and not entry["result"].get("ok", False):
                    entry["status"] = "failed" if not ctx.skipped else "partial: budget ran out"
            except Exception as e:  # noqa: BLE001 - one broken part must not hide the others
                entry["status"] = f"failed: {type(e).__name__}: {e}"
                entry["traceback"] = traceback.format_exc()[-3000:]
                print(entry["traceback"], file=sys.stderr, flush=True)
        if ctx.skipped:
            entry["skipped"] = list(ctx.skipped)
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        report["parts"][name] = entry
        print(f"[{name}] {entry['status']} in {entry['seconds']:.1f} s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["machine"] = machine()
    report["total_s"] = round(time.perf_counter() - start, 2)
    slug = "dryrun" if dry else re.sub(r"[^a-z0-9]+", "_", report["versions"]["device_name"].lower()).strip("_")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gpu_{slug}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, path)
    return path, report


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", type=parse_parts, default=list(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--budget", type=float, default=float(sum(PART_BUDGETS.values())),
                   help="seconds for all selected parts (split in proportion to each part's budget)")
    p.add_argument("--dry-run", action="store_true", help="CPU, interpreter, tiny shapes, no timings")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default benchmarks/results; a temporary folder for --dry-run)")
    args = p.parse_args(argv)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--dry-run must be on the command line (TRITON_INTERPRET=1 is set before triton is imported)")
    if args.budget <= 0:
        p.error(f"--budget must be positive seconds, got {args.budget}")
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu_check_")) if args.dry_run else Path(RESULTS))
    path, report = run(args.parts, args.budget, args.dry_run, out)
    print(f"wrote {path} ({report['total_s']:.0f} s)")
    for name, entry in report["parts"].items():
        print(f"  {name:<11} {entry['status']:<40} {entry['seconds']:>7.1f} s")
    failed = [n for n, e in report["parts"].items() if e["status"].startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

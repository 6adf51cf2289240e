"""The parts of benchmarks/gpu_check.py: each is `part_<name>(ctx) -> dict`, run in a process of its own.

A part builds its result as it goes and hands it to `ctx.save(result)` after every finished row, so a part
stopped at its deadline (or by a signal) keeps every row it finished. `ctx.dry` runs the same code on the
CPU: tiny shapes, Triton's interpreter for the op-level parts, the reference backend for whole models, no
CUDA graphs (a "graph" replays its Python body), and every timing is None.

Timing (benchmarks' METHOD):
* kernels (`ctx.time_graph`): N launches captured in one CUDA graph after a warm-up on a side stream
  (compilation and autotuning stay out), the graph replayed R times between CUDA events; the time per
  launch is the median replay over N. So the custom-op, autograd and launcher path on the host (tens of
  microseconds, more than a CIFAR GroupNorm's traffic takes) is not in the figure. With `flush`, every
  launch is preceded by a write over a buffer twice the L2 size, and a graph of the flushes alone is timed
  the same way and subtracted. Where a capture fails, the figure falls back to CUDA events around single
  calls (L2 flushed before each) and the row says so (`timing`).
* whole models (`ctx.time_kernel`): CUDA events around each call, warm-up first, median.
* end-to-end sampling (`ctx.time_wall`): wall clock between device synchronisations.
Bandwidth figures are given against the device-to-device copy measured in the `device` part (the same
graph-replay method; bytes read + bytes written) as well as against the datasheet peak.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import fastddpm as fd
from benchmarks.common import DDPM_CIFAR10_DIFFUSERS
from benchmarks.gpu_summary import pct

# Datasheet peaks by device name (first match wins): HBM bytes/s, dense bf16 FLOP/s.
PEAKS: List[Tuple[str, float, float]] = [
    ("H200", 4.8e12, 989e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100", 3.35e12, 989e12),   # SXM
    ("A100", 2.0e12, 312e12),
]
CIFAR_GN_SHAPES = [(128, 128, 32, 32), (128, 256, 16, 16), (128, 256, 8, 8), (128, 256, 4, 4), (128, 512, 16, 16)]
ATTN_SHAPES = [(128, 1, 256, 256), (64, 4, 256, 64), (32, 4, 1024, 64), (16, 1, 256, 512)]
# the U-Net's own attention calls: (batch, heads, H, W, channels); the first is the DDPM CIFAR-10 model's 16x16 block
UNET_ATTN = [(128, 1, 16, 16, 256), (64, 4, 16, 16, 256)]
DRY_UNET_ATTN = [(2, 1, 4, 4, 32)]
ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
UNET_GRAD_THRESHOLD = 1e-3  # fp32 U-Net, Triton vs reference backend: output and every parameter's gradient


class Unavailable(RuntimeError):
    """A part that cannot run here (a package missing): recorded as skipped with this one-line reason."""


def device_peaks(name: str) -> Dict[str, Any]:
    """{"hbm_Bps", "bf16_flops", "matched"} for a device name (None where the name is not listed)."""
    for key, hbm, flops in PEAKS:
        if key.lower() in name.lower():
            return {"matched": key, "hbm_Bps": hbm, "bf16_flops": flops}
    return {"matched": None, "hbm_Bps": None, "bf16_flops": None}


def per_s(amount: float, seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None or seconds <= 0 else amount / seconds


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b <= 0 else a / b


def scaled(v: Optional[float], scale: float) -> Optional[float]:
    return None if v is None else v * scale


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max(1, max |ref|), in float64."""
    a, ref = a.detach().double(), ref.detach().double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ------------------------------------------------------------------------------ run context
class _PythonGraph:
    """The dry run's stand-in for a CUDA graph: replay runs the captured Python body again."""

    def __init__(self, body: Callable[[], Any]):
        self.replay = body


class Context:
    """Device, dry-run flag, the part's deadline, the measured copy bandwidth, and the timers."""

    def __init__(self, device: torch.device, dry: bool, deadline: float = math.inf,
                 save: Optional[Callable[[Dict[str, Any]], None]] = None, copy_Bps: Optional[float] = None):
        self.device, self.dry, self.deadline = device, dry, deadline
        self.skipped: List[str] = []
        self._save = save
        self._flush: Optional[torch.Tensor] = None
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
        self.peaks = device_peaks(name)
        self.copy_Bps = copy_Bps

    def left(self) -> float:
        return self.deadline - time.time()

    def has_time(self, what: str, need_s: float = 0.0) -> bool:
        """False (and `what` recorded as skipped) when the part's deadline cannot fit `need_s` more."""
        if self.left() > need_s:
            return True
        self.skipped.append(what)
        print(f"    skipped (this part's time is spent): {what}", flush=True)
        return False

    def save(self, result: Dict[str, Any]) -> None:
        """Hand the result so far to the driver (written atomically; survives a kill of this process)."""
        if self._save is not None:
            self._save(result)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def flush_l2(self) -> None:
        if self.device.type != "cuda":
            return
        if self._flush is None:
            l2 = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 64 << 20)
            self._flush = torch.empty(max(2 * l2, 128 << 20) // 4, dtype=torch.int32, device=self.device)
        self._flush.fill_(1)

    def first_call(self, fn: Callable[[], Any]) -> Tuple[Optional[float], Any]:
        """(seconds of the first call, compilation and autotuning included, or None in the dry run; its output)."""
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return (None if self.dry else time.perf_counter() - t0), out

    def _graph(self, body: Callable[[], Any]) -> Any:
        if self.dry:
            return _PythonGraph(body)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        return graph

    def _replay_seconds(self, body: Callable[[], Any], launches: int, reps: int) -> Optional[float]:
        def many():
            for _ in range(launches):
                body()
        graph = self._graph(many)
        graph.replay()
        if self.dry:
            return None
        self.sync()
        events = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            events.append((start, end))
        self.sync()
        return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3 / launches

    def warm_up(self, fn: Callable[[], Any], calls: int = 3) -> None:
        """Calls on a side stream (what graph capture requires of compilation, autotuning, allocation).
        The dry run skips them: its "graph" runs the Python body itself."""
        if self.dry:
            return
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(calls):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.sync()

    def time_graph(self, fn: Callable[[], Any], launches: int = 20, reps: int = 10, flush: bool = True
                   ) -> Tuple[Optional[float], str]:
        """(seconds per launch of `fn` by CUDA-graph replay, "graph"), or by events where a capture
        fails ("events: <why>"); dry run: (None, "graph") after running the same loops in Python."""
        launches = 1 if self.dry else launches
        self.warm_up(fn)
        self.flush_l2()  # allocate the flush buffer outside the capture
        try:
            if not flush:
                return self._replay_seconds(fn, launches, reps), "graph"
            both = self._replay_seconds(lambda: (self.flush_l2(), fn()), launches, reps)
            alone = self._replay_seconds(self.flush_l2, launches, reps)
            return (None if both is None else max(both - alone, 0.0)), "graph (L2 flush subtracted)"
        except Exception as e:  # noqa: BLE001 - a capture that fails still gets a figure, labelled
            if self.dry:
                raise
            self.sync()
            return self.time_kernel(fn, flush=flush), f"events ({type(e).__name__}: {str(e)[:120]})"

    def time_kernel(self, fn: Callable[[], Any], reps: int = 30, warmup: int = 3, flush: bool = True) -> Optional[float]:
        """Median seconds of `fn` by CUDA events around each call (L2 flushed before each); dry run: one call, None."""
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

    def bandwidth(self, nbytes: float, seconds: Optional[float]) -> Dict[str, Optional[float]]:
        """GB/s of `nbytes` in `seconds`, and % of the measured copy bandwidth and of the datasheet."""
        bps = per_s(nbytes, seconds)
        return {"GBps": scaled(bps, 1e-9), "pct_of_measured_copy": pct(bps, self.copy_Bps),
                "pct_of_peak": pct(bps, self.peaks["hbm_Bps"])}


def randn(ctx: Context, *shape: int, dtype: torch.dtype = torch.bfloat16, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, device=ctx.device) * scale).to(dtype)


def compile_fn(ctx: Context, fn: Any) -> Any:
    """torch.compile as a user would (inductor, default mode). The dry run returns `fn` itself: tracing
    a U-Net costs the CPU tens of seconds, and compile-friendliness is tested in tests/ already."""
    return fn if ctx.dry else torch.compile(fn)


def kernel_module(name: str) -> Any:
    return importlib.import_module(f"fastddpm.kernels.{name}")


def autotune_choices() -> Dict[str, Any]:
    """The configs triton.autotune chose so far in this process, per kernel and key, with the time the
    autotuner spent benchmarking (`bench_s`, where this triton records it). Empty in the interpreter."""
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return {}
    found: Dict[str, Any] = {}

    def add(label: str, tuner: Any) -> None:
        if not isinstance(tuner, Autotuner):
            return
        for key, cfg in dict(getattr(tuner, "cache", {}) or {}).items():
            found[f"{label} {key}"] = {"config": str(cfg), "bench_s": getattr(tuner, "bench_time", None)}

    for mod_name in ("group_norm", "attention", "sampler_step"):
        try:
            mod = kernel_module(mod_name)
        except ImportError:
            continue
        for attr, value in vars(mod).items():
            if isinstance(value, dict):
                for key, tuner in value.items():
                    add(f"{mod_name}.{attr}[{key}]", tuner)
            elif hasattr(value, "cache_info") and callable(value) and attr.startswith("_autotuned"):
                for inplace in (False, True):  # lru_cache'd builders: built only where a GPU used them
                    if value.cache_info().currsize:
                        add(f"{mod_name}.{attr}({inplace})", value(inplace))
            else:
                add(f"{mod_name}.{attr}", value)
    return found


def fwd_bwd(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], dy: torch.Tensor) -> Callable[[], Any]:
    def run():
        return torch.autograd.grad(fn(*inputs), inputs, dy)
    return run


def rows_by_shape(rows: List[Dict[str, Any]], shape: Tuple[int, ...]) -> Dict[str, Any]:
    for r in rows:
        if r["shape"] == list(shape):
            return r
    rows.append({"shape": list(shape)})
    return rows[-1]


# ------------------------------------------------------------------------------ part: device ceilings
def part_device(ctx: Context) -> Dict[str, Any]:
    """Device-to-device copy bandwidth and the bf16 matmul rate, both by graph replay (random data)."""
    n_copy = (1 << 16) if ctx.dry else (1 << 28)  # int32 elements: 1 GiB on a GPU
    src = torch.randint(0, 1 << 30, (n_copy,), dtype=torch.int32, device=ctx.device)
    dst = torch.empty_like(src)
    t_copy, how = ctx.time_graph(lambda: dst.copy_(src), launches=10, reps=5, flush=False)
    copy_bps = per_s(2 * src.numel() * 4, t_copy)  # bytes read + bytes written
    result: Dict[str, Any] = {"copy_bytes": 2 * src.numel() * 4, "copy_s": t_copy, "copy_Bps": copy_bps,
                              "copy_pct_of_peak": pct(copy_bps, ctx.peaks["hbm_Bps"]), "timing": how}
    ctx.save(result)
    del src, dst
    m = 256 if ctx.dry else 8192
    a, b = randn(ctx, m, m), randn(ctx, m, m)
    t_mm, _ = ctx.time_graph(lambda: a @ b, launches=5, reps=5, flush=False)
    mm_flops = per_s(2 * m ** 3, t_mm)
    result.update(matmul_n=m, matmul_s=t_mm, bf16_matmul_flops=mm_flops,
                  matmul_pct_of_peak=pct(mm_flops, ctx.peaks["bf16_flops"]))
    return result


# ------------------------------------------------------------------------------ part: GroupNorm + SiLU
def _gn_torch(x, w, b, scale, shift, groups):
    y = F.group_norm(x, groups, w, b, 1e-5)
    return F.silu(y * (1 + scale[:, :, None, None]) + shift[:, :, None, None])


def _gn_inputs(ctx: Context, n: int, c: int, h: int, w: int, dtype: torch.dtype = torch.bfloat16):
    x = randn(ctx, n, c, h, w, dtype=dtype, scale=2.0).requires_grad_(True)
    params = [randn(ctx, c, dtype=dtype).requires_grad_(True), randn(ctx, c, dtype=dtype).requires_grad_(True),
              randn(ctx, n, c, dtype=dtype, scale=0.2).requires_grad_(True),
              randn(ctx, n, c, dtype=dtype, scale=0.2).requires_grad_(True)]
    return [x] + params, randn(ctx, n, c, h, w, dtype=dtype)


def part_group_norm(ctx: Context) -> Dict[str, Any]:
    """GroupNorm+SiLU (scale-shift) forward and forward+backward by graph replay: GB/s of the fused
    kernels' modelled bytes, % of the measured copy bandwidth and of the datasheet; torch eager and
    torch.compile of the same composition; first-call (compile + autotune) seconds."""
    from fastddpm.ops import group_norm_silu

    gn_hbm = kernel_module("group_norm").modelled_hbm_bytes
    shapes = [(2, 16, 3, 5)] if ctx.dry else [(32, 128, 64, 64)] + CIFAR_GN_SHAPES
    groups = 4 if ctx.dry else 32
    rows: List[Dict[str, Any]] = []
    result: Dict[str, Any] = {"rows": rows, "bytes_model": "fastddpm.kernels.group_norm.modelled_hbm_bytes (fused forward + "
                              "backward, the same bytes for every implementation)", "timing": "graph replay"}
    compiled = compile_fn(ctx, _gn_torch)
    for impls in (("fastddpm", "torch_eager"), ("torch_compile",)):
        for n, c, h, w in shapes:
            if not ctx.has_time(f"group_norm {impls} {n}x{c}x{h}x{w}", 2.0):
                break
            inputs, dy = _gn_inputs(ctx, n, c, h, w)
            fns = {"fastddpm": lambda *i: group_norm_silu(i[0], i[1], i[2], groups, 1e-5, scale=i[3], shift=i[4]),
                   "torch_eager": lambda *i: _gn_torch(*i, groups),
                   "torch_compile": lambda *i: compiled(*i, groups)}
            model = gn_hbm(n, c, h, w, groups, 2)
            row = rows_by_shape(rows, (n, c, h, w))
            row["modelled_bytes_fused"], row["dtype"] = model["fused"], "bfloat16"
            with torch.no_grad():
                ref = _gn_torch(*[t.float() for t in inputs], groups)
            for impl in impls:
                with torch.no_grad():
                    first, out = ctx.first_call(lambda: fns[impl](*inputs))
                    row[f"{impl}_rel_err"] = rel_err(out, ref)
                    t_f, how = ctx.time_graph(lambda: fns[impl](*inputs))
                t_fb, how_fb = ctx.time_graph(fwd_bwd(fns[impl], inputs, dy))
                fwd, both = ctx.bandwidth(model["fused_fwd"], t_f), ctx.bandwidth(model["fused"], t_fb)
                row[impl] = {"fwd_s": t_f, "fwd_bwd_s": t_fb, "first_call_s": first, "timing": how,
                             **{f"fwd_{k}": v for k, v in fwd.items()}, **{f"fwd_bwd_{k}": v for k, v in both.items()}}
            ctx.save(result)
    result["autotune"] = autotune_choices()
    return result


# ------------------------------------------------------------------------------ part: attention
def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The aten kernel F.scaled_dot_product_attention dispatches to for these inputs (read off the profiler):
    e.g. _scaled_dot_product_flash_attention, _efficient_attention, _cudnn_attention, _math."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        F.scaled_dot_product_attention(q, k, v)
    names = [e.name for e in prof.events() if "scaled_dot_product" in e.name or "attention" in e.name]
    inner = [n for n in names if n not in ("aten::scaled_dot_product_attention",)]
    return (inner or names or ["unknown"])[0].replace("aten::", "")


def _attn_case(ctx: Context, layout: str, shape: Tuple[int, ...], dtype: torch.dtype):
    """(leaves, fns, the inputs SDPA sees, (B, heads, N, D)) of one case. "contiguous": q, k, v are
    [B, heads, N, D] tensors. "unet": the U-Net's own call: q, k, v are strided views of one [B, 3C, H, W]
    qkv tensor (head_dim stride H*W) and the output goes back to [B, C, H, W]; SDPA gets the contiguous
    copies it needs there (and its output is laid back the same way), both inside the timed region."""
    from fastddpm.ops import attention

    if layout == "contiguous":
        b, h, n, d = shape
        leaves = [randn(ctx, b, h, n, d, dtype=dtype, scale=1.5).requires_grad_(True) for _ in range(3)]
        fns = {"fastddpm": lambda q, k, v: attention(q, k, v), "sdpa": F.scaled_dot_product_attention}
        return leaves, fns, leaves, (b, h, n, d)
    b, h, hgt, wid, c = shape
    n, d = hgt * wid, c // h
    qkv = randn(ctx, b, 3 * c, hgt, wid, dtype=dtype, scale=1.5).requires_grad_(True)

    def views(t):
        return t.reshape(b, 3, h, d, n).transpose(-1, -2).unbind(1)

    def back(o):
        return o.transpose(-1, -2).reshape(b, c, hgt, wid)

    fns = {"fastddpm": lambda t: back(attention(*views(t))),
           "sdpa": lambda t: back(F.scaled_dot_product_attention(*(x.contiguous() for x in views(t))))}
    return [qkv], fns, [x.detach().contiguous() for x in views(qkv)], (b, h, n, d)


def _attention_cases(ctx: Context) -> List[Tuple[str, Tuple[int, ...], torch.dtype]]:
    if ctx.dry:
        contiguous = [(2, 1, 16, 32), (1, 2, 20, 16), (1, 1, 8, 512)]
        return ([("unet", s, dt) for s in DRY_UNET_ATTN for dt in (torch.bfloat16, torch.float32)]
                + [("contiguous", s, torch.bfloat16) for s in contiguous] + [("contiguous", contiguous[0], torch.float32)])
    return ([("unet", s, dt) for s in UNET_ATTN for dt in (torch.bfloat16, torch.float32)]
            + [("contiguous", s, torch.bfloat16) for s in ATTN_SHAPES]
            + [("contiguous", s, torch.float32) for s in ATTN_SHAPES[:2]])


def part_attention(ctx: Context) -> Dict[str, Any]:
    """fastddpm's attention against F.scaled_dot_product_attention, forward and forward+backward by graph
    replay: in the U-Net's own pixel-major views (bf16, fp32), then contiguous [B, heads, N, D] (bf16, fp32);
    the SDPA backend that ran, TFLOP/s, first-call seconds and the chosen autotune configs."""
    rows: List[Dict[str, Any]] = []
    result: Dict[str, Any] = {"rows": rows, "flops_model": "forward 4*B*H*N^2*D, forward+backward 3.5x that",
                              "timing": "graph replay", "fp32_matmul_precision": torch.get_float32_matmul_precision()}
    for layout, shape, dtype in _attention_cases(ctx):
        if not ctx.has_time(f"attention {layout} {shape} {dtype_name(dtype)}", 2.0):
            break
        leaves, fns, sdpa_in, (b, h, n, d) = _attn_case(ctx, layout, shape, dtype)
        flops_f = 4 * b * h * n * n * d  # two matmuls of 2*N*N*D per (batch, head)
        peak = ctx.peaks["bf16_flops"] if dtype == torch.bfloat16 else None
        row: Dict[str, Any] = {"layout": layout, "shape": list(shape), "bhnd": [b, h, n, d], "dtype": dtype_name(dtype),
                               "path": "sdpa (head_dim > 256)" if d > 256 else "triton",
                               "sdpa_backend": sdpa_backend(*sdpa_in)}
        with torch.no_grad():
            ref = fns["sdpa"](*[t.float() for t in leaves])
        dout = torch.randn_like(ref).to(dtype)
        for impl in ("fastddpm", "sdpa"):
            fn = fns[impl]
            with torch.no_grad():
                first, out = ctx.first_call(lambda: fn(*leaves))
                row[f"{impl}_rel_err"] = rel_err(out, ref)
                t_f, how = ctx.time_graph(lambda: fn(*leaves))
            t_fb, _ = ctx.time_graph(fwd_bwd(fn, leaves, dout))
            row[impl] = {"fwd_s": t_f, "fwd_bwd_s": t_fb, "first_call_s": first, "timing": how,
                         "fwd_tflops": scaled(per_s(flops_f, t_f), 1e-12),
                         "fwd_bwd_tflops": scaled(per_s(3.5 * flops_f, t_fb), 1e-12),
                         "fwd_pct_of_peak": pct(per_s(flops_f, t_f), peak),
                         "fwd_bwd_pct_of_peak": pct(per_s(3.5 * flops_f, t_fb), peak)}
        row["fwd_time_ratio_vs_sdpa"] = ratio(row["fastddpm"]["fwd_s"], row["sdpa"]["fwd_s"])
        row["fwd_bwd_time_ratio_vs_sdpa"] = ratio(row["fastddpm"]["fwd_bwd_s"], row["sdpa"]["fwd_bwd_s"])
        rows.append(row)
        ctx.save(result)
    result["autotune"] = autotune_choices()
    return result


# ------------------------------------------------------------------------------ part: sampler step
def part_step(ctx: Context) -> Dict[str, Any]:
    """One fused sampler-step launch against the unfused reference (graph replay), GB/s of the fused
    kernel's compulsory bytes, % of the measured copy bandwidth and of the datasheet."""
    from fastddpm.ops import sampler_step, use_backend

    hbm = kernel_module("sampler_step").hbm_bytes_fused
    shape = (2, 3, 8, 8) if ctx.dry else (256, 3, 32, 32)
    diff = fd.GaussianDiffusion(fd.NoiseSchedule.linear(1000))
    rows: List[Dict[str, Any]] = []
    result: Dict[str, Any] = {"rows": rows, "timing": "graph replay, L2 flushed before each launch",
                              "bytes_model": "fastddpm.kernels.sampler_step.hbm_bytes_fused (the fused kernel's compulsory "
                              "bytes; the unfused row uses the same bytes, so its GB/s is an effective rate)"}
    for kind, sampler in (("ddpm", fd.DDPMSampler(diff)), ("dpm++", fd.DPMSolverSampler(diff, steps=20))):
        coefs, steps, _ = sampler.device_tables(ctx.device)
        for dtype in (torch.bfloat16, torch.float32):
            if not ctx.has_time(f"step {kind} {dtype}", 1.0):
                break
            x, mo = randn(ctx, *shape, dtype=dtype), randn(ctx, *shape, dtype=dtype, scale=0.5)
            x0p = randn(ctx, *shape, dtype=dtype) if sampler.uses_x0_prev else None
            seed = torch.tensor([7], dtype=torch.int64, device=ctx.device)
            args = (x, mo, coefs, steps[3:4], x0p, None, seed, 0, True, False)
            nbytes = hbm(x.numel(), x.element_size(), False, x0p is not None, False)
            row: Dict[str, Any] = {"sampler": kind, "shape": list(shape), "dtype": dtype_name(dtype),
                                   "modelled_bytes": nbytes}
            with use_backend("reference"):
                ref = sampler_step(*args)[0]
            row["fused_rel_err"] = rel_err(sampler_step(*args)[0], ref)
            for impl, backend in (("fused", "triton"), ("unfused_reference", "reference")):
                with use_backend(backend):
                    t, how = ctx.time_graph(lambda: sampler_step(*args), launches=50)
                row[impl] = {"s": t, "timing": how, **ctx.bandwidth(nbytes, t)}
            row["time_ratio_fused_vs_unfused"] = ratio(row["fused"]["s"], row["unfused_reference"]["s"])
            rows.append(row)
            ctx.save(result)
    result["autotune"] = autotune_choices()
    return result


# ------------------------------------------------------------------------------ part: gradients
def grad_threshold(output: bool, dtype: torch.dtype, reference_err: float) -> float:
    """The bound on Triton's error (vs float64) for one tensor: fp32 max(2 x the reference backend's own
    error, 1e-5 for outputs / 1e-4 for gradients); bf16 / fp16 2 x the reference's error + one ulp
    (2**-7, 2**-10): the rule of tests/gpu and tests/test_ops_*.py."""
    if dtype == torch.float32:
        return max(2 * reference_err, 1e-5 if output else 1e-4)
    return 2 * reference_err + ULP[dtype]


def _op_errors(fn: Callable[..., torch.Tensor], inputs: List[torch.Tensor], names: Sequence[str],
               dtype: torch.dtype) -> Dict[str, Any]:
    """Output and input gradients of `fn` under the Triton and the reference backend in `dtype`, each
    against the reference backend in float64; per tensor: both errors, the threshold, pass."""
    from fastddpm.ops import use_backend

    def run(backend: str, cast: torch.dtype):
        leaves = [t.detach().to(cast).requires_grad_(True) for t in inputs]
        with use_backend(backend):
            out = fn(*leaves)
            dout = torch.ones_like(out) if run.dout is None else run.dout.to(cast)
            grads = torch.autograd.grad(out, leaves, dout)
        return [out] + list(grads)

    torch.manual_seed(1)
    run.dout = None
    ref64 = run("reference", torch.float64)
    run.dout = torch.randn_like(ref64[0])
    ref64, ref, tri = run("reference", torch.float64), run("reference", dtype), run("triton", dtype)
    out: Dict[str, Any] = {}
    for i, name in enumerate(["out"] + list(names)):
        err_t, err_r = rel_err(tri[i], ref64[i]), rel_err(ref[i], ref64[i])
        limit = grad_threshold(i == 0, dtype, err_r)
        out[name] = {"triton_rel_err": err_t, "reference_rel_err": err_r, "threshold": limit, "ok": err_t <= limit}
    return out


def _unet_grad_errors(ctx: Context) -> Dict[str, Any]:
    """fd.UNet forward + backward (fp32, training mode without dropout) under the Triton and the reference
    backend: relative error of the output and of every parameter's gradient; threshold UNET_GRAD_THRESHOLD."""
    from fastddpm.ops import use_backend

    model = (fd.UNet(image_size=4, base_channels=8, channel_mults=(1,), num_res_blocks=1,
                     attention_resolutions=(4,), groups=2, dropout=0.0) if ctx.dry else
             fd.UNet(image_size=32, base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                     attention_resolutions=(16,), dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():  # leave no zero-initialised layer hiding the rest
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = model.to(ctx.device).train()
    batch = 1 if ctx.dry else 16
    x = torch.randn(batch, 3, model.image_size, model.image_size, device=ctx.device)
    t = torch.randint(0, 1000, (batch,), device=ctx.device)
    params = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for backend in ("reference", "triton"):
        with use_backend(backend):
            out = model(x, t)
            results[backend] = [out] + list(torch.autograd.grad(out.square().mean(), params))
    names = ["out"] + [n for n, p in model.named_parameters() if p.requires_grad]
    errs = {n: rel_err(a, b) for n, a, b in zip(names, results["triton"], results["reference"])}
    worst = max(errs, key=errs.get)
    return {"dtype": "float32", "batch": batch, "threshold": UNET_GRAD_THRESHOLD, "out_rel_err": errs["out"],
            "max_grad_rel_err": max(v for k, v in errs.items() if k != "out"), "worst": worst,
            "ok": max(errs.values()) <= UNET_GRAD_THRESHOLD}


def part_grads(ctx: Context) -> Dict[str, Any]:
    """Gradient correctness of the Triton ops on this device: each fused op's output and input gradients
    (fp32, bf16) against float64, and the whole U-Net forward + backward, Triton vs reference backend."""
    from fastddpm.ops import attention, group_norm_silu

    gn_shape, groups = ((2, 16, 3, 5), 4) if ctx.dry else ((128, 256, 16, 16), 32)
    attn_shape = (2, 1, 16, 32) if ctx.dry else (128, 1, 256, 256)
    ops: Dict[str, Any] = {}
    result: Dict[str, Any] = {"ops": ops, "rule": grad_threshold.__doc__.split("error (vs float64) for one tensor: ")[1]}
    for dtype in (torch.float32, torch.bfloat16):
        if not ctx.has_time(f"grads ops {dtype_name(dtype)}", 3.0):
            break
        n, c, h, w = gn_shape
        gn_in = [torch.randn(n, c, h, w, device=ctx.device) * 2, torch.randn(c, device=ctx.device),
                 torch.randn(c, device=ctx.device), torch.randn(n, c, device=ctx.device) * 0.2,
                 torch.randn(n, c, device=ctx.device) * 0.2]
        ops[f"group_norm_silu {dtype_name(dtype)}"] = _op_errors(
            lambda x, wt, b, s, sh: group_norm_silu(x, wt, b, groups, 1e-5, scale=s, shift=sh), gn_in,
            ("dx", "dweight", "dbias", "dscale", "dshift"), dtype)
        ctx.save(result)
        qkv = [torch.randn(*attn_shape, device=ctx.device) * 1.5 for _ in range(3)]
        ops[f"attention {dtype_name(dtype)}"] = _op_errors(attention, qkv, ("dq", "dk", "dv"), dtype)
        ctx.save(result)
    if ctx.has_time("grads unet", 10.0):
        result["unet"] = _unet_grad_errors(ctx)
    result["ok"] = all(v["ok"] for op in ops.values() for v in op.values()) and result.get("unet", {}).get("ok", True)
    return result


# A tiny UNet2DModel for the dry run (the same block types as the CIFAR-10 config)
TINY_DIFFUSERS = dict(DDPM_CIFAR10_DIFFUSERS, sample_size=8, block_out_channels=(32, 32),
                      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8)


# ------------------------------------------------------------------------------ part: U-Net
DIFFUSERS_HOWTO = "carry its wheels to run this (docs/gpu_check.md, 'diffusers on a machine without network access')"
_DIFFUSERS_PROBLEM: List[Optional[str]] = []  # the first import's verdict, cached for the part's process


def diffusers_problem() -> Optional[str]:
    """None when `import diffusers` works in this process; otherwise one line saying why it does not (not
    installed, or it fails to import: a missing dependency, a version clash, anything it raises)."""
    if not _DIFFUSERS_PROBLEM:
        try:
            import diffusers  # noqa: F401 - the import itself is the check

            problem = None
        except Exception as e:  # noqa: BLE001 - a broken diffusers means "unavailable", never a failed part
            what = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            problem = (f"diffusers is not installed: {DIFFUSERS_HOWTO}" if isinstance(e, ModuleNotFoundError)
                       and e.name == "diffusers" else
                       f"diffusers does not import ({type(e).__name__}: {what}): {DIFFUSERS_HOWTO}")
        _DIFFUSERS_PROBLEM.append(problem)
    return _DIFFUSERS_PROBLEM[0]


def has_diffusers() -> bool:
    """Whether diffusers imports in this process (see diffusers_problem for why not)."""
    return diffusers_problem() is None


def _fd_unet(ctx: Context) -> Any:
    """fd.UNet alone (no diffusers needed): the DDPM CIFAR-10 config, tiny in the dry run; random weights."""
    torch.manual_seed(0)
    net = (fd.UNet(image_size=8, base_channels=32, channel_mults=(1, 1), num_res_blocks=1,
                   attention_resolutions=(4,), groups=8, norm_eps=1e-6) if ctx.dry else
           fd.UNet(image_size=32, base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                   attention_resolutions=(16,), norm_eps=1e-6))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return net.to(ctx.device).eval()


def _model_pair(ctx: Context, dtype: torch.dtype = torch.float32) -> Tuple[Any, Any]:
    """(diffusers UNet2DModel, fd.UNet) with the same weights: the CIFAR-10 config (tiny in the dry run);
    (None, fd.UNet) where diffusers is not installed."""
    if not has_diffusers():
        return None, _fd_unet(ctx).to(dtype)
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
    """The DDPM CIFAR-10 U-Net forward and training step (bf16): fd.UNet against diffusers' UNet2DModel
    (same weights), eager and under torch.compile; the first compiled call's seconds (Inductor)."""
    batch = 2 if ctx.dry else 128
    ref32, ours32 = _model_pair(ctx)
    size = ours32.image_size
    x32 = torch.randn(batch, 3, size, size, device=ctx.device)
    t = torch.randint(0, 1000, (batch,), device=ctx.device)
    target = torch.randn_like(x32)
    models = {"fastddpm": ours32, "diffusers": ref32}
    result: Dict[str, Any] = {"config": "DDPM CIFAR-10 (35.7M parameters)" if not ctx.dry else "tiny (dry run)",
                              "batch": batch, "dtype": "bfloat16", "forward": {}, "train_step": {}}
    if ref32 is None:
        del models["diffusers"]
        result["diffusers"] = diffusers_problem()
        print(f"    {result['diffusers']}: its rows skipped", flush=True)
    else:
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
                first, _ = ctx.first_call(lambda: _call(fwd, x16, t))
                result["forward"][key] = {"s": ctx.time_kernel(lambda: _call(fwd, x16, t), reps=10, warmup=3,
                                                               flush=False), "first_call_s": first}
            ctx.save(result)
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

            first, _ = ctx.first_call(train_step)
            result["train_step"][key] = {"s": ctx.time_kernel(train_step, reps=10, warmup=3, flush=False),
                                         "first_call_s": first}
            ctx.save(result)
    for section in ("forward", "train_step"):
        for mode in ("eager", "compiled"):
            ours, theirs = result[section].get(f"fastddpm_{mode}"), result[section].get(f"diffusers_{mode}")
            if ours and theirs:
                result[f"{section}_{mode}_time_ratio_fastddpm_vs_diffusers"] = ratio(ours["s"], theirs["s"])
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
    ours32 = _fd_unet(ctx)
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
        ctx.save(result)
        del model
    if len(outs) == 2:
        result["rel_err_channels_last_vs_nchw"] = rel_err(outs["channels_last"], outs["nchw"])
    ratios = {}
    for what in ("fwd", "fwd_bwd"):
        a, b = (result.get(k, {}).get(f"{what}_s") for k in ("channels_last", "nchw"))
        ratios[what] = result[f"{what}_time_ratio_channels_last_vs_nchw"] = ratio(a, b)
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
    """FastSampler end to end (DDIM-50, DDPM-1000; batch 256; bf16 and fp32; capture step, loop and none) in
    images/s against diffusers' DDIMPipeline / DDPMPipeline (eager), same weights, same sampler."""
    if not has_diffusers():
        raise Unavailable(diffusers_problem())
    import diffusers

    batch = 2 if ctx.dry else 256
    cases = [("ddim", 3 if ctx.dry else 50), ("ddpm", 4 if ctx.dry else 1000)]
    rows: List[Dict[str, Any]] = []
    result: Dict[str, Any] = {"rows": rows, "note": "wall time of one call after a warm-up call, both ending in "
                              "fp32 images in [0, 1] on the host"}
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
                row[f"speedup_{capture}_vs_diffusers"] = ratio(t_pipe, t_fast)
                for t in (t_pipe, t_fast):
                    if t is not None:
                        per_step[dtype] = max(per_step.get(dtype, 0.0), t / steps)
                del fast
            rows.append(row)
            ctx.save(result)
            del pipe, ref
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    return result




PART_FUNCS: Dict[str, Callable[[Context], Dict[str, Any]]] = {
    "device": part_device, "group_norm": part_group_norm, "attention": part_attention, "step": part_step,
    "grads": part_grads, "unet": part_unet, "layout": part_layout, "sampling": part_sampling,
}

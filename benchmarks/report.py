"""The generated part of docs/performance.md, rendered from the JSON files under benchmarks/results/.

    python benchmarks/report.py            # rewrite what lies between the markers in docs/performance.md
    python benchmarks/report.py --check    # exit 1 if docs/performance.md is not what the results give
    python benchmarks/report.py --print    # print the section only

Only the text between `<!-- perf:begin -->` and `<!-- perf:end -->` is replaced. Every results file
becomes a subsection with the command that reproduces it, the machine it ran on, and the ratios to
the peers measured in the same run (the ratios are read from the file, never recomputed across files).
Files this script knows (figures, step_cpu, sampling_cpu, sampling_gpu, gpu_* from
benchmarks/gpu_check.py) get tables of their own; any
other file gets a generic table of its numbers. GPU figures appear only when a results file from a
GPU run exists: nothing is filled in or estimated. The output holds no timestamps, so it is a pure
function of the results files and `--check` is stable.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"

# how each known file is reproduced when it does not say so itself
DEFAULT_COMMANDS = {
    "figures": "python benchmarks/figures.py",
    "step_cpu": "python benchmarks/bench_step.py --json",
    "sampling_cpu": "python benchmarks/bench_sampling.py --json",
    "sampling_gpu": "python benchmarks/bench_sampling.py --json  # on a CUDA machine",
    "kernels": "fastddpm bench --suite kernels",
    "group_norm": "fastddpm bench --suite kernels",
    "attention": "fastddpm bench --suite kernels",
}
ORDER = ("figures", "step_cpu", "sampling_cpu", "sampling_gpu")


# ------------------------------------------------------------------------------ formatting
def fmt(v: Any) -> str:
    """A number as the tables show it: ints with thousands separators, floats to ~3 significant digits."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:#.3g}"
    return str(v)


def ratio(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def nbytes(v: float) -> str:
    return f"{v / 1e6:.1f} MB"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    """A markdown table (cells that are not strings go through fmt)."""
    cells = [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in cells]
    return out


def machine_line(data: Dict[str, Any]) -> str:
    """One line describing the machine a results file ran on (common.machine() format or bench_step's)."""
    m = data.get("machine")
    if isinstance(m, dict):
        parts = []
        if m.get("gpu"):
            parts.append(f"GPU {m['gpu']}")
        cpu = m.get("cpu") or m.get("processor") or "CPU"
        parts.append(f"{cpu}" + (f", {m['cpu_count']} cores" if m.get("cpu_count") else ""))
        threads = data.get("threads", m.get("torch_threads"))
        if threads:
            parts.append(f"{threads} torch thread{'s' if threads != 1 else ''}")
        if m.get("torch"):
            parts.append(f"torch {m['torch']}")
        if m.get("python"):
            parts.append(f"Python {m['python']}")
        return "; ".join(parts)
    parts = [str(data.get("processor") or m or "unknown machine")]
    if data.get("cpu_count"):
        parts[0] += f", {data['cpu_count']} cores"
    if data.get("threads"):
        parts.append(f"{data['threads']} torch thread{'s' if data['threads'] != 1 else ''}")
    if data.get("torch"):
        parts.append(f"torch {data['torch']}")
    return "; ".join(parts)


def preamble(name: str, data: Dict[str, Any]) -> List[str]:
    command = data.get("command") or DEFAULT_COMMANDS.get(name, f"python benchmarks/{name}.py --json")
    return [f"Reproduce: `{command}` (results/{name}.json)  ", f"Machine: {machine_line(data)}", ""]


# ------------------------------------------------------------------------------ renderers
def render_figures(name: str, data: Dict[str, Any]) -> List[str]:
    out = ["### Device-independent figures (DDPM CIFAR-10 U-Net, fastddpm vs diffusers, same weights)", ""]
    out += preamble(name, data)
    u = data.get("unet_ddpm_cifar10_fp32")
    if u:
        f, d = u["fastddpm"], u["diffusers"]
        rows = [("parameters", f["parameters"], d["parameters"], ratio(f["parameters"] / d["parameters"])),
                ("bytes saved for backward per training sample (fp32)", nbytes(f["saved_bytes_per_sample"]),
                 nbytes(d["saved_bytes_per_sample"]), ratio(u.get("ratio_saved_bytes_per_sample"))),
                ("tensor ops per forward (views included)", f["ops_per_forward"], d["ops_per_forward"],
                 ratio(u.get("ratio_ops_per_forward"))),
                *[(label, f[key], d[key], ratio(u.get(f"ratio_{key}"))) for label, key in (
                    ("kernel-launching ops per forward (no views)", "kernel_ops_per_forward"),
                    ("kernel-launching ops per training step (forward + backward)", "kernel_ops_per_training_step"))
                  if key in f and key in d],
                ("GFLOPs per forward per sample", f["flops_per_forward_per_sample"] / 1e9,
                 d["flops_per_forward_per_sample"] / 1e9, ratio(u.get("ratio_flops_per_forward_per_sample")))]
        out += table(("figure", "fastddpm", "diffusers", "fastddpm / diffusers"), rows) + [""]
    k = data.get("cuda_kernel_counts")
    if k:
        rows = [(what, k["fastddpm"][what], k["diffusers"][what], ratio(k["fastddpm"][what] / k["diffusers"][what]))
                for what in ("kernels_per_forward", "kernels_per_training_step")]
        out += ["CUDA kernels launched (torch profiler, bf16 autocast):", ""]
        out += table(("figure", "fastddpm", "diffusers", "fastddpm / diffusers"), rows) + [""]
    s = data.get("sampling_step_ops")
    if s:
        rows = [(k, s[k].get("fast_sampler", "n/a"), s[k].get("sampler_sample", "n/a"),
                 s.get(f"diffusers_{k}_step", "n/a")) for k in ("ddpm", "ddim", "dpm++") if isinstance(s.get(k), dict)]
        out += ["Ops per sampling step outside the model:", ""]
        out += table(("sampler", "FastSampler", "sampler.sample (amortised)", "diffusers scheduler.step"), rows) + [""]
    k = data.get("kernel_hbm")
    if k:
        rows = [(r["kernel"], nbytes(r["hbm_bytes_fused"]), nbytes(r["hbm_bytes_unfused"]), ratio(r["ratio"]))
                for r in k if "kernel" in r]
        out += ["Modelled HBM traffic of each fused op vs the unfused PyTorch sequence it replaces (group norm: forward + backward at 32x128x64x64 bf16; attention: forward + backward at B=128, N=256, D=256 bf16; sampler step: one step at 256x3x32x32 fp32). Each kernel of an op repeats the whole op's total:", ""]
        out += table(("kernel", "fused", "unfused", "fused / unfused"), rows) + [""]
    return out


def render_step(name: str, data: Dict[str, Any]) -> List[str]:
    out = ["### One sampler step() on the CPU: fastddpm vs diffusers' scheduler.step", ""] + preamble(name, data)
    rows = []
    for r in data["rows"]:
        f, d = r["fastddpm"], r["diffusers"]
        rows.append((r["sampler"], r["batch"], f["cpu_us_per_step"], d["cpu_us_per_step"],
                     ratio(r.get("speedup_vs_diffusers_cpu")), f["ops_per_step"], d["ops_per_step"]))
    out += table(("sampler", "batch", "fastddpm us (CPU time)", "diffusers us (CPU time)", "speed-up",
                  "ops fastddpm", "ops diffusers"), rows) + [""]
    return out


_IMPL_NAMES = {"fast_sampler": "FastSampler", "sampler_sample": "sampler.sample",
               "diffusers_loop": "diffusers pipeline loop", "diffusers_pipeline": "diffusers pipeline",
               "diffusers_eager": "diffusers eager", "diffusers_compiled": "diffusers + torch.compile"}


def render_sampling_cpu(name: str, data: Dict[str, Any]) -> List[str]:
    out = ["### Sampling on the CPU: FastSampler vs sampler.sample vs diffusers", ""] + preamble(name, data)
    ov = data.get("overhead") or []
    if ov:
        r0 = ov[0]
        out += [f"Per-step host overhead (time of a sampling step minus the model call; model: "
                f"{r0.get('model', 'tiny')}, batch {r0['batch']}, {r0['steps']} steps, float32) and tensor ops per "
                f"step outside the model (steady-state step; views launch no kernel on a GPU):", ""]
        rows = []
        for r in ov:
            for impl in ("fast_sampler", "sampler_sample", "diffusers_loop"):
                v = r.get(impl)
                if not v:
                    continue
                rel = "1.00x" if impl == "fast_sampler" else ratio(r.get(f"overhead_cpu_ratio_{impl}_over_fast"))
                rows.append((r["sampler"], _IMPL_NAMES[impl], v["overhead_us_per_step"], v["overhead_cpu_us_per_step"],
                             rel, f"{v['ops_per_step_steady']} ({v['ops_per_step_steady_no_views']})",
                             v["ops_per_step"]))
        out += table(("sampler", "implementation", "overhead us/step (wall)", "overhead us/step (CPU time)",
                      "CPU-time overhead / FastSampler's", "ops/step (without views)",
                      "ops/step amortised (incl. x_T)"), rows) + [""]
    e2e = data.get("e2e_cpu") or []
    if e2e:
        r0 = e2e[0]
        out += [f"End to end, {r0.get('model', 'DDPM CIFAR-10 U-Net')}, batch {r0['batch']}, {r0['steps']} steps, "
                f"{r0.get('dtype', 'float32')}; both in the same run, interleaved:", ""]
        rows = []
        for r in e2e:
            f, d = r["fast_sampler"], r["diffusers_pipeline"]
            rows.append((r["sampler"], "FastSampler (converted fd.UNet)", f["images_per_s"], d["images_per_s"],
                         ratio(r.get("speedup_vs_diffusers")), f["images_per_cpu_s"], d["images_per_cpu_s"],
                         ratio(r.get("speedup_vs_diffusers_cpu")), f.get("repeats", "")))
            u = r.get("fast_sampler_unconverted")
            if u:
                rows.append((r["sampler"], "FastSampler around diffusers' UNet2DModel", u["images_per_s"],
                             d["images_per_s"], ratio(r.get("speedup_unconverted_vs_diffusers")),
                             u["images_per_cpu_s"], d["images_per_cpu_s"],
                             ratio(r.get("speedup_unconverted_vs_diffusers_cpu")), u.get("repeats", "")))
        out += table(("sampler", "fastddpm", "fastddpm img/s", "diffusers pipeline img/s", "ratio (wall)",
                      "fastddpm img/CPU-s", "diffusers img/CPU-s", "ratio (CPU time)", "repeats"), rows) + [""]
    u = data.get("unet_forward_cpu")
    if u:
        out += [f"U-Net forward alone (batch {u['batch']}, same run): fd.UNet {fmt(u['fastddpm']['cpu_s_per_forward'])} s, "
                f"diffusers UNet2DModel {fmt(u['diffusers']['cpu_s_per_forward'])} s of CPU time per forward "
                f"(fd.UNet / UNet2DModel {ratio(u.get('cpu_time_ratio_fastddpm_over_diffusers'))}).", ""]
    return out


def render_sampling_gpu(name: str, data: Dict[str, Any]) -> List[str]:
    out = ["### Sampling on a GPU: FastSampler vs diffusers eager and torch.compile", ""] + preamble(name, data)
    rows = []
    for r in data["rows"]:
        rows.append((r["sampler"], r["steps"], r["batch"], r.get("dtype", ""),
                     r["fast_sampler"]["images_per_s"],
                     r["diffusers_eager"]["images_per_s"] if "diffusers_eager" in r else "n/a",
                     r["diffusers_compiled"]["images_per_s"] if "diffusers_compiled" in r else "n/a",
                     ratio(r.get("speedup_vs_diffusers_eager")), ratio(r.get("speedup_vs_diffusers_compiled"))))
    out += table(("sampler", "steps", "batch", "dtype", "FastSampler img/s", "diffusers eager img/s",
                  "diffusers compiled img/s", "vs eager", "vs compiled"), rows) + [""]
    return out


def render_unet(name: str, data: Dict[str, Any]) -> List[str]:
    """bench_unet.py's file: forward and training-step times and saved bytes, fastddpm vs diffusers."""
    body = next(v for v in data.values() if isinstance(v, dict) and "forward" in v)
    title = body.get("config", "DDPM CIFAR-10 U-Net")
    out = [f"### U-Net forward and training step: fd.UNet vs diffusers' UNet2DModel ({title})", ""]
    out += preamble(name, data)
    rows = []
    for section, label in (("forward", "forward"), ("train_step", "training step")):
        for impl, v in (body.get(section) or {}).items():
            rel = "1.00x" if impl == "diffusers" else ratio(body.get(f"{section}_ratio_{impl}_vs_diffusers"))
            rows.append((label, impl, v["median_s"], v["min_s"], rel))
    if rows:
        out += [f"Seconds per call at batch {body.get('batch', '?')} (median and best of {body.get('reps', '?')}; "
                f"time relative to diffusers from the same run):", ""]
        out += table(("measurement", "implementation", "median s", "best s", "time / diffusers'"), rows) + [""]
    sb = body.get("saved_bytes_per_sample")
    if isinstance(sb, dict):
        rows = [(impl, nbytes(v), "1.00x" if impl == "diffusers" else ratio(body.get(f"saved_bytes_ratio_{impl}_vs_diffusers")))
                for impl, v in sb.items()]
        out += ["Bytes saved for backward per training sample (fp32):", ""]
        out += table(("implementation", "saved bytes", "/ diffusers'"), rows) + [""]
    return out


def _num(v: Any, scale: float = 1.0) -> str:
    """A figure of a gpu_check file: n/a when it was not measured (null), else fmt(v * scale)."""
    return "n/a" if not isinstance(v, (int, float)) or isinstance(v, bool) else fmt(float(v) * scale)


def render_gpu_check(name: str, data: Dict[str, Any]) -> List[str]:
    """benchmarks/gpu_check.py's file: versions, each part's status and time, then each part's figures."""
    v, peaks, parts = data.get("versions", {}), data.get("peaks", {}), data.get("parts", {})
    out = [f"### GPU check on {v.get('device_name', '?')} (every GPU-only test and benchmark, one command)", ""]
    out += preamble(name, data)
    out += [f"torch {v.get('torch')}, triton {v.get('triton')}, CUDA {v.get('cuda')}, driver {v.get('driver')}; "
            f"% of peak against {peaks.get('matched') or 'no listed device'}: HBM {_num(peaks.get('hbm_Bps'), 1e-12)} TB/s, "
            f"bf16 dense {_num(peaks.get('bf16_flops'), 1e-12)} TFLOP/s (datasheet).", ""]
    out += table(("part", "status", "seconds", "budget s"),
                 [(p, e.get("status", "?"), _num(e.get("seconds")), _num(e.get("budget_s"))) for p, e in parts.items()])
    out.append("")
    res = {p: e.get("result") or {} for p, e in parts.items()}
    head = data.get("headline") or {}
    if head:
        g, a, f = (head.get(k) or {} for k in ("group_norm_silu_pct_of_measured_copy",
                                               "attention_time_over_sdpa_unet_layout",
                                               "fast_sampler_speedup_vs_diffusers_eager"))
        out += [f"Headline: GroupNorm+SiLU forward+backward {_num(g.get('worst_fwd_bwd'))}% of the measured copy bandwidth "
                f"(worst CIFAR-10 shape; target {g.get('target')}); attention / SDPA time in the U-Net layout "
                f"{_num(a.get('worst_bf16_one_head'))} (target {a.get('target')}); FastSampler speedup over diffusers' pipeline (eager) "
                f"{_num(f.get('worst_capture_step'))}x (target {f.get('target')}).", ""]
    if res.get("tests"):
        c = res["tests"].get("counts", {})
        out += [f"GPU tests (`{res['tests'].get('command', '')}`): " + ", ".join(f"{n} {k}" for k, n in c.items())
                + "." + ("" if not res["tests"].get("failed") else " Failed: " + "; ".join(res["tests"]["failed"][:10])), ""]
    if res.get("device"):
        d = res["device"]
        out += [f"Measured ceilings: device-to-device copy {_num(d.get('copy_Bps'), 1e-12)} TB/s "
                f"({_num(d.get('copy_pct_of_peak'))}% of the datasheet), bf16 matmul {d.get('matmul_n')}^3 "
                f"{_num(d.get('bf16_matmul_flops'), 1e-12)} TFLOP/s ({_num(d.get('matmul_pct_of_peak'))}%).", ""]
    rows = []
    for r in (res.get("group_norm") or {}).get("rows", []):
        for impl in ("fastddpm", "torch_eager", "torch_compile"):
            if impl in r:
                m = r[impl]
                rows.append(("x".join(map(str, r["shape"])), impl, _num(m.get("fwd_GBps")), _num(m.get("fwd_pct_of_peak")),
                             _num(m.get("fwd_bwd_GBps")), _num(m.get("fwd_bwd_pct_of_peak"))))
    if rows:
        out += ["GroupNorm+SiLU (scale-shift, bf16; GB/s of the fused kernels' modelled bytes, same bytes for every row):", ""]
        out += table(("N x C x H x W", "implementation", "fwd GB/s", "fwd % peak", "fwd+bwd GB/s", "fwd+bwd % peak"), rows)
        out.append("")
    rows = [(r.get("layout", "contiguous"), "x".join(map(str, r["shape"])), r.get("dtype", "bfloat16"), r.get("path", ""),
             _num(r["fastddpm"].get("fwd_s"), 1e3), _num(r["sdpa"].get("fwd_s"), 1e3), _num(r["fastddpm"].get("fwd_bwd_s"), 1e3),
             _num(r["sdpa"].get("fwd_bwd_s"), 1e3), _num(r["fastddpm"].get("fwd_bwd_tflops")),
             _num(r["fastddpm"].get("fwd_bwd_pct_of_peak")), r.get("sdpa_backend", "?"))
            for r in (res.get("attention") or {}).get("rows", [])]
    if rows:
        out += ["Attention, milliseconds (layout unet: the U-Net's views of one [B, 3C, H, W] tensor, shape B x heads x "
                "H x W x C, SDPA's copies timed with it; contiguous: B x heads x N x head_dim):", ""]
        out += table(("layout", "shape", "dtype", "path", "fwd ms", "SDPA fwd ms", "fwd+bwd ms", "SDPA fwd+bwd ms",
                      "fwd+bwd TFLOP/s", "% peak", "SDPA kernel"), rows) + [""]
    rows = [(op, name, f"{v['triton_rel_err']:.2e}", f"{v['threshold']:.2e}", "ok" if v["ok"] else "OVER")
            for op, tensors in ((res.get("grads") or {}).get("ops") or {}).items() for name, v in tensors.items()]
    if rows:
        out += ["Gradient correctness on the device (Triton vs the reference backend in float64; relative error):", ""]
        out += table(("op", "tensor", "error", "threshold", "verdict"), rows) + [""]
    rows = [(r["sampler"], r["dtype"], _num(r["fused"].get("GBps")), _num(r["fused"].get("pct_of_peak")),
             _num(r["unfused_reference"].get("GBps")), _num(r.get("time_ratio_fused_vs_unfused")))
            for r in (res.get("step") or {}).get("rows", [])]
    if rows:
        out += ["Sampler step (one fused launch vs the unfused reference, 256x3x32x32):", ""]
        out += table(("sampler", "dtype", "fused GB/s", "% peak", "unfused GB/s (same bytes)", "time fused / unfused"), rows)
        out.append("")
    u = res.get("unet") or {}
    rows = [(section, impl, _num(m.get("s"), 1e3)) for section in ("forward", "train_step")
            for impl, m in (u.get(section) or {}).items()]
    if rows:
        out += [f"U-Net ({u.get('config')}, batch {u.get('batch')}, bf16; training step = forward, MSE, backward, "
                "AdamW under autocast), milliseconds:", ""]
        out += table(("measurement", "implementation", "ms"), rows) + [""]
    lay = res.get("layout") or {}
    rows = [(key, _num((lay.get(key) or {}).get("fwd_s"), 1e3), _num((lay.get(key) or {}).get("fwd_bwd_s"), 1e3))
            for key in ("nchw", "channels_last") if key in lay]
    if rows:
        out += [f"Activation layout (fd.UNet, {lay.get('config')}, batch {lay.get('batch')}, bf16, eager), milliseconds; "
                f"channels-last / NCHW: forward {_num(lay.get('fwd_time_ratio_channels_last_vs_nchw'))}, "
                f"forward+backward {_num(lay.get('fwd_bwd_time_ratio_channels_last_vs_nchw'))}; verdict for the "
                f"CUDA default: {lay.get('verdict')}:", ""]
        out += table(("activations", "forward ms", "forward+backward ms"), rows) + [""]
    rows = []
    for r in (res.get("sampling") or {}).get("rows", []):
        rows.append((f"{r['sampler']}-{r['steps']}", r["dtype"], r["batch"], _num(r["diffusers_pipeline"].get("images_per_s")),
                     *(_num((r.get(f"fast_sampler_{c}") or {}).get("images_per_s")) for c in ("step", "loop", "none"))))
    if rows:
        out += ["FastSampler end to end vs diffusers' pipeline (same weights, same run), images/s:", ""]
        out += table(("sampler", "dtype", "batch", "diffusers pipeline", "capture=step", "capture=loop", "capture=none"), rows)
        out.append("")
    return out


def _leaves(obj: Any, prefix: str = "") -> List[Tuple[str, Any]]:
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            if k in ("machine", "command"):
                continue
            out += _leaves(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(obj, list):
        if obj and all(isinstance(x, dict) for x in obj):
            return [(prefix, obj)]
        if all(isinstance(x, (int, float)) for x in obj) and len(obj) <= 8:
            return [(prefix, ", ".join(fmt(x) for x in obj))]
        return []
    if isinstance(obj, (int, float, str)) and not isinstance(obj, bool):
        return [(prefix, obj)]
    return []


def render_generic(name: str, data: Any, max_rows: int = 40) -> List[str]:
    """Any other results file: its scalar figures as key/value rows, lists of records as tables."""
    data = data if isinstance(data, dict) else {"rows": data}
    out = [f"### {data.get('benchmark') or name}", ""] + preamble(name, data)
    scalars, n = [], 0
    for key, v in _leaves(data):
        if key == "benchmark":
            continue
        if isinstance(v, list):
            cols = [c for c in v[0] if all(isinstance(r.get(c), (int, float, str)) and not isinstance(r.get(c), bool)
                                           for r in v)][:9]
            out += [f"{key}:", ""] + table(cols, [[r[c] for c in cols] for r in v[:max_rows]]) + [""]
            continue
        if n < max_rows:
            scalars.append((key, v))
            n += 1
    if scalars:
        out += table(("figure", "value"), scalars) + [""]
    return out


def render_dtype(name: str, data: Dict[str, Any]) -> List[str]:
    """bench_dtype.py: images/s of FastSampler with the model in fp32 / bf16 (cast) / bf16 (autocast)."""
    label = {"fp32": "fp32", "bf16": "bf16 (weights cast once: `--dtype bf16`)", "bf16-autocast": "bf16 autocast"}
    lines = [f"### Reduced precision on the CPU ({data['model']}, batch {data['batch']}, {data['threads']} thread)", "",
             "| model calls in | images/s | vs fp32 | relative error of one call | of the sample |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for key, ips in data["images_per_s"].items():
        err1, err = data["model_call_rel_error"][key], data["sample_rel_error"][key]
        lines.append(f"| {label.get(key, key)} | {ips:.3f} | {data['ratio_to_fp32'][key]:.2f}x | "
                     f"{'-' if key == 'fp32' else f'{err1:.1e}'} | {'-' if key == 'fp32' else f'{err:.1e}'} |")
    return lines + [""] + preamble(name, data)


def render_distill_speed(name: str, data: Dict[str, Any]) -> List[str]:
    """scripts/distill_speed.py: images/s of each side's fastest setting within `within` x DDPM-1000's digits-FD."""
    bar = data["within"] * data["ddpm_1000"]
    lines = [f"### Time to DDPM-1000-level quality: distilled student vs diffusers ({data['student']}, batch "
             f"{data['batch']}, digits-FD <= {data['within']}x DDPM-1000 = {bar:.3f})", "",
             "| model calls in | student K | digits-FD | images/s | diffusers | digits-FD | images/s | speed-up |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in data["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['dtype']} | {r['skipped']} | | | | | | |")
            continue
        f, d = r["fastddpm"], r["diffusers"]
        lines.append(f"| {r['dtype']} | {f['calls']} | {f['score']:.3f} | {f['images_per_s']} | {d['setting']}, "
                     f"{d['calls']} calls | {d['score']:.3f} | {d['images_per_s']} | {r['speedup']:.2f}x |")
    return lines + [""] + preamble(name, data)


RENDERERS: Dict[str, Callable[[str, Dict[str, Any]], List[str]]] = {
    "figures": render_figures, "step_cpu": render_step, "sampling_cpu": render_sampling_cpu,
    "sampling_gpu": render_sampling_gpu, "dtype_cpu": render_dtype, "distill_speed_cpu": render_distill_speed,
}


def load_results(results: Path) -> List[Tuple[str, Any]]:
    """(name, data) of every *.json under `results`, known files first in ORDER, then by name."""
    files = sorted(results.glob("*.json")) if results.is_dir() else []
    items = []
    for f in files:
        try:
            items.append((f.stem, json.loads(f.read_text())))
        except ValueError as e:
            raise ValueError(f"{f}: not valid JSON ({e})") from None
    rank = {n: i for i, n in enumerate(ORDER)}
    return sorted(items, key=lambda it: (rank.get(it[0], len(ORDER)), it[0]))


def render(results: Path = RESULTS) -> str:
    """The markdown of the performance section (without the markers)."""
    lines = ["<!-- generated by benchmarks/report.py from benchmarks/results/*.json; edit those, not this -->", ""]
    items = load_results(results)
    if not items:
        lines += ["No benchmark results yet: run `fastddpm bench` from a checkout.", ""]
    for name, data in items:
        if name.startswith("gpu_") and isinstance(data, dict) and data.get("dry_run"):
            continue  # a --dry-run file carries no figures
        renderer = RENDERERS.get(name) or (render_unet if name.startswith("unet") else None)
        if name.startswith("gpu_") and isinstance(data, dict) and data.get("benchmark") == "gpu_check":
            renderer = render_gpu_check
        try:
            lines += renderer(name, data) if renderer else render_generic(name, data)
        except (KeyError, TypeError, IndexError, ZeroDivisionError):  # a format this script does not know
            lines += render_generic(name, data)
    if not any(n.startswith("gpu_") and isinstance(d, dict) and not d.get("dry_run") for n, d in items):
        lines += ["GPU check: no results file from a GPU run. `python benchmarks/gpu_check.py` on a CUDA machine runs every "
                  "GPU-only test and benchmark within an 8-minute budget and writes benchmarks/results/gpu_<device>.json.", ""]
    if not any(n.endswith("gpu") or (isinstance(d, dict) and isinstance(d.get("machine"), dict)
                                     and d["machine"].get("gpu")) for n, d in items):
        lines += ["GPU figures: none (no results file from a GPU run); `fastddpm bench` on a CUDA machine "
                  "adds them.", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def splice(page_text: str, section: str) -> str:
    """`page_text` with what lies between the markers replaced by `section` (markers kept)."""
    b = page_text.find(BEGIN)
    e = page_text.find(END, b + len(BEGIN)) if b >= 0 else -1
    if b < 0 or e < 0:
        raise ValueError(f"the page has no '{BEGIN}' ... '{END}' markers (in that order)")
    return page_text[:b + len(BEGIN)] + "\n" + section + page_text[e:]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of results JSON files")
    p.add_argument("--page", type=Path, default=PAGE, help="the markdown page to update (default: docs/performance.md)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if the page is out of date")
    mode.add_argument("--print", action="store_true", help="print the section and leave the page alone")
    args = p.parse_args(argv)
    section = render(args.results)
    if args.print:
        sys.stdout.write(section)
        return 0
    try:
        old = args.page.read_text()
        new = splice(old, section)
    except (OSError, ValueError) as e:
        print(f"report.py: error: {e}", file=sys.stderr)
        return 2
    if args.check:
        if new != old:
            print(f"report.py: {args.page} performance section is out of date: run python benchmarks/report.py",
                  file=sys.stderr)
            return 1
        print(f"{args.page}: performance section up to date")
        return 0
    if new != old:
        args.page.write_text(new)
        print(f"{args.page}: performance section updated")
    else:
        print(f"{args.page}: performance section already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What benchmarks/gpu_check.py prints after each part, and the headline figures its results file keeps.

Pure functions of the results (no torch import): the driver calls them after every part, and
tests/test_gpu_check.py checks them on made-up figures.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

# The figures the README quotes, with their targets.
TARGETS = {
    "group_norm_silu_pct_of_measured_copy": ">= 80 (forward+backward, CIFAR-10 U-Net shapes)",
    "attention_time_over_sdpa_unet_layout": "<= 1.1 (bf16, the U-Net's 16x16 block, forward+backward)",
    "fast_sampler_speedup_vs_diffusers_eager": ">= 2 (same weights and sampler)",
}


def pct(value: Optional[float], peak: Optional[float]) -> Optional[float]:
    """`value` as a percentage of `peak`; None where either is unknown (or the peak is zero)."""
    return None if value is None or not peak else 100.0 * value / peak


def _f(v: Any, fmt: str = "{:.3g}", scale: float = 1.0) -> str:
    return "n/a" if not isinstance(v, (int, float)) or isinstance(v, bool) else fmt.format(v * scale)


def _min(values: List[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if isinstance(v, (int, float))]
    return min(vals) if vals else None


def _max(values: List[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if isinstance(v, (int, float))]
    return max(vals) if vals else None


def headline(report: Dict[str, Any]) -> Dict[str, Any]:
    """The README's figures from the parts run so far (None where not measured), each with its target and
    whether it is met (None where not measured)."""
    res = {name: (entry.get("result") or {}) for name, entry in report.get("parts", {}).items()}
    out: Dict[str, Any] = {"measured_copy_TBps": _f_or_none((res.get("device") or {}).get("copy_Bps"), 1e-12)}
    cifar = [r for r in (res.get("group_norm") or {}).get("rows", []) if r.get("shape", [0])[0] == 128 and "fastddpm" in r]
    gn = [{"shape": r["shape"], "fwd": r["fastddpm"].get("fwd_pct_of_measured_copy"),
           "fwd_bwd": r["fastddpm"].get("fwd_bwd_pct_of_measured_copy")} for r in cifar]
    worst = _min([g["fwd_bwd"] for g in gn])
    out["group_norm_silu_pct_of_measured_copy"] = {"rows": gn, "worst_fwd_bwd": worst, "target": TARGETS[
        "group_norm_silu_pct_of_measured_copy"], "met": None if worst is None else worst >= 80}
    att = [{"shape": r["shape"], "dtype": r["dtype"], "sdpa_backend": r.get("sdpa_backend"),
            "fwd": r.get("fwd_time_ratio_vs_sdpa"), "fwd_bwd": r.get("fwd_bwd_time_ratio_vs_sdpa")}
           for r in (res.get("attention") or {}).get("rows", []) if r.get("layout") == "unet"]
    main = [a for a in att if a["dtype"] == "bfloat16" and a["shape"][1] == 1]
    worst = _max([a["fwd_bwd"] for a in main] + [a["fwd"] for a in main])
    out["attention_time_over_sdpa_unet_layout"] = {"rows": att, "worst_bf16_one_head": worst, "target": TARGETS[
        "attention_time_over_sdpa_unet_layout"], "met": None if worst is None else worst <= 1.1}
    samp = [{"sampler": f"{r['sampler']}-{r['steps']}", "dtype": r["dtype"], "batch": r["batch"],
             **{c: r.get(f"speedup_{c}_vs_diffusers") for c in ("step", "loop", "none")}}
            for r in (res.get("sampling") or {}).get("rows", [])]
    worst = _min([s["step"] for s in samp])
    out["fast_sampler_speedup_vs_diffusers_eager"] = {"rows": samp, "worst_capture_step": worst, "target": TARGETS[
        "fast_sampler_speedup_vs_diffusers_eager"], "met": None if worst is None else worst >= 2}
    return out


def _f_or_none(v: Optional[float], scale: float) -> Optional[float]:
    return None if not isinstance(v, (int, float)) else v * scale


def _tests(r: Dict[str, Any]) -> List[str]:
    lines = [", ".join(f"{n} {k}" for k, n in (r.get("counts") or {}).items()) or "no test finished"]
    lines += [f"FAILED {f}" for f in (r.get("failed") or [])[:10]]
    lines += [p for p in r.get("problems", []) if p not in (r.get("failed") or [])]
    return lines


def _device(r: Dict[str, Any], peaks: Dict[str, Any]) -> List[str]:
    return [f"copy {_f(r.get('copy_Bps'), scale=1e-12)} TB/s ({_f(r.get('copy_pct_of_peak'))}% of the datasheet), "
            f"bf16 matmul {_f(r.get('bf16_matmul_flops'), scale=1e-12)} TFLOP/s ({_f(r.get('matmul_pct_of_peak'))}%)"]


def _group_norm(r: Dict[str, Any], peaks: Dict[str, Any]) -> List[str]:
    out = []
    for row in r.get("rows", []):
        shape = "x".join(map(str, row["shape"]))
        for impl in ("fastddpm", "torch_eager", "torch_compile"):
            m = row.get(impl)
            if m:
                out.append(f"{shape} {impl}: fwd {_f(m.get('fwd_GBps'))} GB/s ({_f(m.get('fwd_pct_of_measured_copy'))}% "
                           f"of copy), fwd+bwd {_f(m.get('fwd_bwd_GBps'))} GB/s ({_f(m.get('fwd_bwd_pct_of_measured_copy'))}%"
                           f" of copy, {_f(m.get('fwd_bwd_pct_of_peak'))}% of datasheet)")
    return out


def _attention(r: Dict[str, Any], peaks: Dict[str, Any]) -> List[str]:
    return [f"{row['layout']} {'x'.join(map(str, row['shape']))} {row['dtype']}: fwd {_f(row['fastddpm'].get('fwd_s'), scale=1e3)}"
            f" ms vs SDPA {_f(row['sdpa'].get('fwd_s'), scale=1e3)} ms ({_f(row.get('fwd_time_ratio_vs_sdpa'))}x), "
            f"fwd+bwd {_f(row.get('fwd_bwd_time_ratio_vs_sdpa'))}x; SDPA ran {row.get('sdpa_backend')}"
            for row in r.get("rows", [])]


def _step(r: Dict[str, Any], peaks: Dict[str, Any]) -> List[str]:
    return [f"{row['sampler']} {row['dtype']}: fused {_f(row['fused'].get('GBps'))} GB/s "
            f"({_f(row['fused'].get('pct_of_measured_copy'))}% of copy), {_f(row.get('time_ratio_fused_vs_unfused'))}x "
            f"the unfused time" for row in r.get("rows", [])]


def _grads(r: Dict[str, Any], peaks: Dict[str, Any]) -> List[str]:
    out = []
    for op, tensors in (r.get("ops") or {}).items():
        bad = [n for n, v in tensors.items() if not v["ok"]]
        worst = max(tensors.values(), key=lambda v: v["triton_rel_err"] / max(v["threshold"], 1e-30))
        out.append(f"{op}: {'ok' if not bad else 'OVER THRESHOLD: ' + ', '.join(bad)} "
                   f"(worst {worst['triton_rel_err']:.2e} vs threshold {worst['threshold']:.2e})")
    u = r.get("unet")
    if u:
        out.append(f"U-Net fp32 Triton vs reference: output {u['out_rel_err']:.2e}, gradients max {u['max_grad_rel_err']:.2e}"
                   f" ({u['worst']}), threshold {u['threshold']:.0e}: {'ok' if u['ok'] else 'OVER'}")
    return out


def _unet(r: Dict[str, Any], peaks: Dict[str, Any]) -> List[str]:
    out = [f"{section} {impl}: {_f(m.get('s'), scale=1e3)} ms (first call {_f(m.get('first_call_s'))} s)"
           for section in ("forward", "train_step") for impl, m in (r.get(section) or {}).items()]
    return out + ([r["diffusers"]] if isinstance(r.get("diffusers"), str) else [])


def _layout(r: Dict[str, Any], peaks: Dict[str, Any]) -> List[str]:
    return [f"channels-last / NCHW: forward {_f(r.get('fwd_time_ratio_channels_last_vs_nchw'))}, forward+backward "
            f"{_f(r.get('fwd_bwd_time_ratio_channels_last_vs_nchw'))}; verdict {r.get('verdict')}"]


def _sampling(r: Dict[str, Any], peaks: Dict[str, Any]) -> List[str]:
    return [f"{row['sampler']}-{row['steps']} {row['dtype']} batch {row['batch']}: diffusers "
            f"{_f(row['diffusers_pipeline'].get('images_per_s'))} img/s; FastSampler " + ", ".join(
                f"{c} {_f((row.get(f'fast_sampler_{c}') or {}).get('images_per_s'))} img/s "
                f"({_f(row.get(f'speedup_{c}_vs_diffusers'))}x)" for c in ("step", "loop", "none"))
            for row in r.get("rows", [])]


SUMMARIES = {"device": _device, "group_norm": _group_norm, "attention": _attention, "step": _step,
             "grads": _grads, "unet": _unet, "layout": _layout, "sampling": _sampling}


def summary_lines(name: str, result: Optional[Dict[str, Any]], peaks: Dict[str, Any]) -> List[str]:
    """The figures of one part as short lines (n/a where not measured, as in a dry run)."""
    if not result:
        return []
    if name == "tests":
        return _tests(result)
    return SUMMARIES[name](result, peaks)

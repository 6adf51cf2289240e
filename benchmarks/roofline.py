"""Roofline lower bounds of every fused kernel at the benchmark shapes, on A100, H100 and H200.

    python benchmarks/roofline.py            # table
    python benchmarks/roofline.py --json     # the rows as JSON

For each kernel (op direction) and shape: the modelled HBM bytes (the kernel modules' own traffic
models: `fastddpm.kernels.attention.modelled_hbm_bytes`, `fastddpm.kernels.group_norm.modelled_hbm_bytes`,
`fastddpm.kernels.sampler_step.hbm_bytes_fused`), the FLOPs the kernels execute, and the lower bound on time

    bound = max(bytes / HBM bandwidth, FLOPs / peak rate)

where the peak is the dense tensor-core rate of the input dtype for the attention matmuls (bf16, or
TF32 for fp32 under "high" matmul precision) and the plain fp32 rate for the elementwise kernels.
Rates are the vendors' datasheet figures (SXM parts, dense, no sparsity); the GPU check measures the
real ceilings and reports measured time as a fraction of this bound: call `bound_s` / `rows` from
benchmarks/gpu_check.py (`fraction_of_bound(measured_s, row, gpu)` = bound / measured, 1.0 = at the roofline).

Attention FLOPs count what the kernels execute, recomputation included (a matmul of [a, k] x [k, b]
is 2abk): forward QK^T and PV = 4 B H N^2 D; backward dK/dV kernel S^T, dV, dP^T, dK = 8 B H N^2 D
(with the D = 256 sm_90 split into a dK and a dV launch, S^T twice: 10), dQ kernel S, dP, dQ =
6 B H N^2 D. Softmax exponentials are left out (they run on the SFU beside the tensor cores).
GroupNorm+SiLU: about 10 fp32 FLOPs per element per pass (normalise, affine, FiLM, SiLU); sampler step:
about 20 per element. Both are far below their memory time, so these counts do not move the bound.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.common import text_table  # noqa: E402

# Datasheet peaks (dense): HBM bytes/s, bf16/fp16 tensor-core FLOP/s, TF32 tensor-core FLOP/s, fp32 FLOP/s.
GPUS: Dict[str, Dict[str, float]] = {
    "A100": {"hbm": 2.039e12, "bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12},   # SXM4 80 GB
    "H100": {"hbm": 3.35e12, "bf16": 989e12, "tf32": 494.5e12, "fp32": 66.9e12},  # SXM5 80 GB
    "H200": {"hbm": 4.8e12, "bf16": 989e12, "tf32": 494.5e12, "fp32": 66.9e12},   # SXM 141 GB
}
# Benchmark shapes: bench_attention.py's (B, heads, N, head_dim) plus the (256, 1, 256, 256);
# bench_group_norm.py's 32x128x64x64 and the DDPM CIFAR-10 U-Net's GroupNorm shapes at batch 128;
# the sampler step at the CIFAR-10 batch of bench_sampling (256 x 3 x 32 x 32, fp32).
ATTENTION_SHAPES = [(256, 1, 256, 256), (128, 1, 256, 256), (64, 4, 256, 64), (32, 4, 1024, 64),
                    (128, 4, 64, 64), (32, 8, 256, 128)]
GROUP_NORM_SHAPES = [(32, 128, 64, 64), (128, 128, 32, 32), (128, 256, 16, 16), (128, 256, 8, 8),
                     (128, 256, 4, 4)]
SAMPLER_SHAPE = (256, 3, 32, 32)
_GN_FLOPS_PER_ELEM_PASS = 10
_STEP_FLOPS_PER_ELEM = 20


def _attention_rows() -> List[dict]:
    from fastddpm.kernels.attention import modelled_hbm_bytes

    rows = []
    for b, h, n, d in ATTENTION_SHAPES:
        m = modelled_hbm_bytes(b, h, n, d, 2)
        base = b * h * n * n * d
        split = d > 128  # sm_90 runs dK and dV as two launches at D = 256 (fastddpm.kernels.attention.dkdv_parts)
        bwd = (10 if split else 8) * base + 6 * base
        t, r = b * h * n * d * 2, b * h * n * 4
        # the split's second launch reads q, k, dO again (3T) and lse, delta (2R) on Hopper; the A100
        # (sm_80, one dK/dV launch) keeps the plain count and 8 + 6 matmul passes
        bwd_bytes = m["bwd_fused"] + (3 * t + 2 * r if split else 0)
        shape = f"{b}x{h}x{n}x{d} bf16"
        rows.append({"kernel": "attention forward", "shape": shape, "bytes": m["fwd_fused"], "flops": 4 * base,
                     "rate": "bf16"})
        rows.append({"kernel": "attention backward", "shape": shape, "bytes": bwd_bytes, "flops": bwd,
                     "rate": "bf16", "sm80": {"bytes": m["bwd_fused"], "flops": 14 * base}})
    return rows


def _group_norm_rows() -> List[dict]:
    from fastddpm.kernels.group_norm import modelled_hbm_bytes

    rows = []
    for n, c, hh, ww in GROUP_NORM_SHAPES:
        m = modelled_hbm_bytes(n, c, hh, ww, 32, 2)
        elems = n * c * hh * ww
        shape = f"{n}x{c}x{hh}x{ww} bf16"
        rows.append({"kernel": "group_norm_silu forward", "shape": shape, "bytes": m["fused_fwd"],
                     "flops": 2 * _GN_FLOPS_PER_ELEM_PASS * elems, "rate": "fp32"})
        rows.append({"kernel": "group_norm_silu backward", "shape": shape, "bytes": m["fused_bwd"],
                     "flops": 3 * _GN_FLOPS_PER_ELEM_PASS * elems, "rate": "fp32"})
    return rows


def _sampler_rows() -> List[dict]:
    from fastddpm.kernels.sampler_step import hbm_bytes_fused

    numel = 1
    for s in SAMPLER_SHAPE:
        numel *= s
    shape = "x".join(map(str, SAMPLER_SHAPE)) + " fp32"
    return [{"kernel": "sampler_step (DDPM, Philox noise)", "shape": shape,
             "bytes": hbm_bytes_fused(numel, 4, False, False, False), "flops": _STEP_FLOPS_PER_ELEM * numel,
             "rate": "fp32"}]


def bound_s(row: dict, gpu: str) -> float:
    """Roofline lower bound in seconds of one row on `gpu` ("A100", "H100", "H200")."""
    if gpu not in GPUS:
        raise ValueError(f"gpu must be one of {sorted(GPUS)}, got {gpu!r}")
    peak = GPUS[gpu]
    counts = row.get("sm80", row) if gpu == "A100" else row  # A100 runs the sm_80 launch plan
    return max(counts["bytes"] / peak["hbm"], counts["flops"] / peak[row["rate"]])


def fraction_of_bound(measured_s: float, row: dict, gpu: str) -> float:
    """bound / measured: 1.0 means the kernel runs at its roofline on `gpu`."""
    if not measured_s > 0:
        raise ValueError(f"measured_s must be a positive time in seconds, got {measured_s!r}")
    return bound_s(row, gpu) / measured_s


def rows() -> List[dict]:
    """Every kernel at every benchmark shape, with bytes, flops, intensity (FLOP/byte), which term
    bounds it and the lower bound in microseconds on each GPU of GPUS."""
    out = _attention_rows() + _group_norm_rows() + _sampler_rows()
    for r in out:
        r["intensity"] = r["flops"] / r["bytes"]
        for gpu in GPUS:
            r[f"bound_us_{gpu}"] = bound_s(r, gpu) * 1e6
        peak = GPUS["H100"]
        r["bound_by"] = "compute" if r["flops"] / peak[r["rate"]] > r["bytes"] / peak["hbm"] else "memory"
    return out


def _table(data: List[dict]) -> str:
    cols = ["kernel", "shape", "bytes", "flops", "intensity", "bound_by"] + [f"bound_us_{g}" for g in GPUS]
    body = [[r["kernel"], r["shape"], f"{r['bytes']:,}", f"{r['flops']:.3g}", f"{r['intensity']:.1f}",
             r["bound_by"]] + [f"{r[f'bound_us_{g}']:.1f}" for g in GPUS] for r in data]
    return text_table(cols, body)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    args = p.parse_args(argv)
    data = rows()
    print(json.dumps(data, indent=1) if args.json else _table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())

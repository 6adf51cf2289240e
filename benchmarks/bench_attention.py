"""Flash attention (fastddpm.kernels.attention) vs F.scaled_dot_product_attention.

    python benchmarks/bench_attention.py            # CUDA: timings; always: the modelled HBM table
    python benchmarks/bench_attention.py --json     # the same as one JSON object

On CUDA, for each shape (B, heads, N, head_dim; bf16, non-causal, scale 1/sqrt(head_dim)) it times
with triton.testing.do_bench (median, ms):
  triton forward   fastddpm.kernels.attention.attention_forward
  triton backward  fastddpm.kernels.attention.attention_backward (preprocess + dK/dV + dQ)
  sdpa forward     F.scaled_dot_product_attention (whatever backend torch picks: flash / efficient)
  sdpa backward    autograd backward of the same call (timed as forward+backward minus forward)
and reports TFLOP/s with the usual count: forward 4 B H N^2 D (two matmuls), backward 2.5x the
forward (five matmuls; the recomputation of P in both backward kernels is not counted), and the
ratio triton / sdpa (target at N=256, head_dim 64: forward within 10%). Peak for reference: H100 SXM
bf16 dense 989 TFLOP/s.

Without CUDA it prints the modelled HBM bytes (fastddpm.kernels.attention.modelled_hbm_bytes, forward +
backward) of the fused kernels and of the unfused SDPA math path that materialises the N x N scores
and probabilities, for each shape. Not run by the tests.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # script mode from a checkout
    sys.path.insert(0, str(ROOT))

from fastddpm.kernels.attention import modelled_hbm_bytes  # noqa: E402

PEAK_TFLOPS = 989.0
# U-Net attention shapes: CIFAR-10 16x16 (1 head of 256), 8x8 / 16x16 / 32x32 with head_dim 64.
SHAPES = [(128, 1, 256, 256), (64, 4, 256, 64), (32, 4, 1024, 64), (128, 4, 64, 64), (32, 8, 256, 128)]


def model_rows(dtype_bytes: int = 2) -> list[dict]:
    rows = []
    for b, h, n, d in SHAPES:
        m = modelled_hbm_bytes(b, h, n, d, dtype_bytes)
        rows.append({"shape": [b, h, n, d], **m, "ratio": m["fused"] / m["unfused"]})
    return rows


def time_rows(dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    import triton.testing

    from fastddpm.kernels.attention import attention_backward, attention_forward

    rows = []
    for b, h, n, d in SHAPES:
        scale = 1.0 / math.sqrt(d)
        q, k, v, do = (torch.randn(b, h, n, d, device="cuda", dtype=dtype) for _ in range(4))
        o, lse = attention_forward(q, k, v, scale)  # compile + autotune outside the timing
        attention_backward(do, q, k, v, o, lse, scale)
        t_fwd = triton.testing.do_bench(lambda: attention_forward(q, k, v, scale))
        t_bwd = triton.testing.do_bench(lambda: attention_backward(do, q, k, v, o, lse, scale))
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        s_fwd = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale))

        def sdpa_fwd_bwd():
            out = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
            torch.autograd.grad(out, (qs, ks, vs), do)

        s_all = triton.testing.do_bench(sdpa_fwd_bwd)
        s_bwd = max(s_all - s_fwd, 1e-6)
        flops_fwd = 4.0 * b * h * n * n * d
        flops_bwd = 2.5 * flops_fwd
        tf = lambda fl, ms: fl / (ms * 1e-3) / 1e12  # noqa: E731
        rows.append({
            "shape": [b, h, n, d], "dtype": str(dtype).replace("torch.", ""),
            "triton_fwd_ms": t_fwd, "triton_bwd_ms": t_bwd, "sdpa_fwd_ms": s_fwd, "sdpa_bwd_ms": s_bwd,
            "triton_fwd_tflops": tf(flops_fwd, t_fwd), "triton_bwd_tflops": tf(flops_bwd, t_bwd),
            "sdpa_fwd_tflops": tf(flops_fwd, s_fwd), "sdpa_bwd_tflops": tf(flops_bwd, s_bwd),
            "fwd_time_ratio": t_fwd / s_fwd, "bwd_time_ratio": t_bwd / s_bwd,
            "triton_fwd_pct_peak": 100 * tf(flops_fwd, t_fwd) / PEAK_TFLOPS,
        })
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    out = {"model_bf16": model_rows(2)}
    if torch.cuda.is_available():
        out["timings"] = time_rows()
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print("modelled HBM bytes, forward + backward, bf16 (fused kernels vs SDPA math path)")
    print(f"{'shape':>22}  {'fused':>14}  {'unfused':>14}  ratio")
    for r in out["model_bf16"]:
        print(f"{str(tuple(r['shape'])):>22}  {r['fused']:>14,}  {r['unfused']:>14,}  {r['ratio']:.3f}")
    if "timings" in out:
        print("\ntimings (ms, median) and TFLOP/s, bf16")
        for r in out["timings"]:
            print(f"{str(tuple(r['shape'])):>22}  fwd {r['triton_fwd_ms']:.3f} ms ({r['triton_fwd_tflops']:.0f} TF/s)"
                  f" vs sdpa {r['sdpa_fwd_ms']:.3f} ({r['sdpa_fwd_tflops']:.0f})  x{r['fwd_time_ratio']:.2f} | "
                  f"bwd {r['triton_bwd_ms']:.3f} ({r['triton_bwd_tflops']:.0f}) vs sdpa {r['sdpa_bwd_ms']:.3f} "
                  f"({r['sdpa_bwd_tflops']:.0f})  x{r['bwd_time_ratio']:.2f}")
    else:
        print("\n(no CUDA: timings skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

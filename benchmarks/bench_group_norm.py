"""GroupNorm + scale-shift + SiLU: fused Triton kernels vs eager PyTorch and torch.compile.

    python benchmarks/bench_group_norm.py            # CUDA: timings; always: the modelled HBM table
    python benchmarks/bench_group_norm.py --json     # the same as one JSON object

On CUDA, for each shape (bf16, 32 groups, affine + scale/shift + SiLU, no add) it times with
triton.testing.do_bench (median, ms):
  fused forward  fastddpm.kernels.group_norm.group_norm_forward
  fused backward fastddpm.kernels.group_norm.group_norm_backward
  eager          F.group_norm -> * (1 + scale) + shift -> F.silu, forward and autograd backward
  compiled       the same sequence under torch.compile(mode="max-autotune-no-cudagraphs")
and reports effective bandwidth = compulsory bytes / time (forward: read x, write y; backward: read
dy and x, write dx) in GB/s and in % of the H100 SXM HBM3 peak (3.35 TB/s). Compulsory bytes, not the
modelled bytes, so every implementation is measured against the same work.

Without CUDA it prints the modelled HBM bytes of forward + backward (fastddpm.kernels.group_norm.
modelled_hbm_bytes: every pass over an activation counted once) for the fused kernels and the eager
unfused sequence, and the bytes saved for backward. Not run by the tests.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # script mode from a checkout
    sys.path.insert(0, str(ROOT))

from fastddpm.kernels.group_norm import modelled_hbm_bytes  # noqa: E402

PEAK_GBS = 3350.0
GROUPS = 32
EPS = 1e-5
SHAPES = [(32, 128, 64, 64), (128, 256, 16, 16), (64, 512, 8, 8), (1, 128, 256, 256), (8, 256, 128, 128)]


def unfused(x, w, b, scale, shift):
    y = F.group_norm(x, GROUPS, w, b, EPS)
    y = y * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    return F.silu(y)


def model_table() -> list[dict]:
    rows = []
    for n, c, h, w in SHAPES:
        m = modelled_hbm_bytes(n, c, h, w, GROUPS, 2)
        rows.append({"shape": f"{n}x{c}x{h}x{w}", "dtype": "bf16", **m,
                     "ratio": round(m["fused"] / m["unfused"], 4)})
    return rows


def print_model(rows: list[dict]) -> None:
    print("modelled HBM bytes, forward + backward, bf16, 32 groups, affine + scale/shift + SiLU")
    print(f"{'shape':>18} {'fused MB':>10} {'unfused MB':>11} {'ratio':>6} {'saved fused MB':>15}"
          f" {'saved unfused MB':>17}")
    for r in rows:
        print(f"{r['shape']:>18} {r['fused'] / 1e6:10.1f} {r['unfused'] / 1e6:11.1f} {r['ratio']:6.3f}"
              f" {r['saved_fused'] / 1e6:15.1f} {r['saved_unfused'] / 1e6:17.1f}")


def cuda_timings() -> list[dict]:
    import triton.testing

    from fastddpm.kernels.group_norm import group_norm_backward, group_norm_forward

    compiled = torch.compile(unfused, mode="max-autotune-no-cudagraphs")
    rows = []
    for n, c, h, w in SHAPES:
        dev, dt = "cuda", torch.bfloat16
        x = torch.randn(n, c, h, w, device=dev, dtype=dt)
        wt = torch.randn(c, device=dev, dtype=dt)
        bs = torch.randn(c, device=dev, dtype=dt)
        sc = 0.5 * torch.randn(n, c, device=dev, dtype=dt)
        sh = torch.randn(n, c, device=dev, dtype=dt)
        dy = torch.randn_like(x)
        act = x.numel() * x.element_size()
        fwd_bytes, bwd_bytes = 2 * act, 3 * act

        y, mean, rstd = group_norm_forward(x, wt, bs, None, sc, sh, GROUPS, EPS, True)
        out = {"shape": f"{n}x{c}x{h}x{w}", "dtype": "bf16"}
        out["fused_fwd_ms"] = triton.testing.do_bench(
            lambda: group_norm_forward(x, wt, bs, None, sc, sh, GROUPS, EPS, True))
        out["fused_bwd_ms"] = triton.testing.do_bench(
            lambda: group_norm_backward(dy, x, wt, bs, None, sc, sh, mean, rstd, GROUPS, True))

        for name, fn in (("eager", unfused), ("compiled", compiled)):
            leaves = [t.detach().clone().requires_grad_() for t in (x, wt, bs, sc, sh)]
            out[f"{name}_fwd_ms"] = triton.testing.do_bench(lambda: fn(*leaves))
            yy = fn(*leaves)
            out[f"{name}_bwd_ms"] = triton.testing.do_bench(
                lambda: torch.autograd.grad(yy, leaves, dy, retain_graph=True))
        for key in [k for k in out if k.endswith("_ms")]:
            nbytes = fwd_bytes if "_fwd_" in key else bwd_bytes
            gbs = nbytes / out[key] / 1e6
            out[key.replace("_ms", "_gbs")] = round(gbs, 1)
            out[key.replace("_ms", "_pct_peak")] = round(100 * gbs / PEAK_GBS, 1)
        rows.append(out)
    return rows


def print_timings(rows: list[dict]) -> None:
    print(f"\nCUDA timings ({torch.cuda.get_device_name()}), bf16; GB/s of compulsory bytes, % of "
          f"{PEAK_GBS / 1000:.2f} TB/s")
    for r in rows:
        print(r["shape"])
        for impl in ("fused", "eager", "compiled"):
            print(f"  {impl:>9} fwd {r[impl + '_fwd_ms'] * 1e3:8.1f} us {r[impl + '_fwd_gbs']:7.0f} GB/s"
                  f" {r[impl + '_fwd_pct_peak']:5.1f}%   bwd {r[impl + '_bwd_ms'] * 1e3:8.1f} us"
                  f" {r[impl + '_bwd_gbs']:7.0f} GB/s {r[impl + '_bwd_pct_peak']:5.1f}%")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = ap.parse_args(argv)
    result = {"model": model_table()}
    if torch.cuda.is_available():
        result["cuda"] = cuda_timings()
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_model(result["model"])
        if "cuda" in result:
            print_timings(result["cuda"])
        else:
            print("\n(no CUDA device: timings skipped)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

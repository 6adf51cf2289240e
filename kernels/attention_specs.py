"""Traffic model and ahead-of-time spec lists of the flash-attention kernels in `kernels/attention.py`.

Modelled HBM traffic (``modelled_hbm_bytes``): T = one [B, H, N, D] tensor, A = one [B, H, N, N]
matrix in the input dtype, R = one fp32 [B, H, N] vector; compulsory traffic (a tile re-read by
several programs of one head is counted once: it comes from L2).

    fused     forward  q, k, v, o, lse                                          4T + R
              backward preprocess dO, O, delta; dK/dV q, k, v, dO, lse, delta,
                       dk, dv; dQ q, k, v, dO, lse, delta, dq                  13T + 5R
                       (+ 3T + 2R where dK/dV runs as two launches: D = 256 on sm_90)
    unfused   the SDPA math path + eager autograd, which materialises S, P, dP, dS (N x N):
              forward  8T + 4A,  backward 12T + 7A         (itemised in ``modelled_hbm_bytes``)

At the representative shape B=128, heads=1, N=256, D=256, bf16 (the DDPM CIFAR-10 16x16 attention;
N = D, so A = T = 16.8 MB): fused 285,999,104 bytes vs unfused 520,093,696 (0.55x). The saving grows
with N / D: N=1024, D=64 (32x32 maps) is 0.09x.

``aot_specs()`` lists every program the launcher compiles for the ``AOT_VARIANTS`` on each arch of
``CONFIGS`` (see `kernels/aot.py` for the gate that compiles them).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .attention import (CONFIGS, Config, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_preprocess_kernel,
                        _attn_fwd_kernel, _block_d, _bwd_args, _config_kwargs, _configs, _FP_FUSION,
                        _fwd_args, _PREPROCESS_WARPS, _preprocess_args, _table_name, dkdv_parts, empty_like_layout)

__all__ = ["modelled_hbm_bytes", "launch_specs", "aot_specs", "AOT_SHAPE", "AOT_VARIANTS", "AOT_VARIANTS_FP32"]


def modelled_hbm_bytes(batch: int, heads: int, n: int, head_dim: int, elem_bytes: int = 2) -> dict:
    """Modelled HBM bytes of attention forward + backward, fused (these kernels) vs unfused.

    T = one [B, H, N, D] tensor (B*H*N*D*elem_bytes), A = one [B, H, N, N] matrix in the input dtype,
    R = one fp32 [B, H, N] row vector. Compulsory traffic: a tile re-read by several programs of one
    head (K/V in the forward, Q/dO in dK/dV, K/V in dQ) is counted once (it is served from L2).

    fused:   forward  read q, k, v, write o, write lse                         4T + R
             backward preprocess read dO, O, write delta                       2T + R
                      dK/dV read q, k, v, dO, lse, delta, write dk, dv          6T + 2R
                      dQ    read q, k, v, dO, lse, delta, write dq              5T + 2R
    unfused (F.scaled_dot_product_attention math path + eager autograd):
             forward  q*sqrt(s), k*sqrt(s) (2T each); S = q'k'^T (2T + A);
                      P = softmax(S) (2A); o = P v (A + 2T)                     8T + 4A
             backward dP = dO v^T (2T + A); dV = P^T dO (A + 2T);
                      dS = softmax_bwd(P, dP) (3A); dq' = dS k' (A + 2T);
                      dk' = dS^T q' (A + 2T); dq, dk = *sqrt(s) (4T)            12T + 7A
    Returns a dict with fwd_fused, bwd_fused, fused, fwd_unfused, bwd_unfused, unfused (bytes).
    """
    t = batch * heads * n * head_dim * elem_bytes
    a = batch * heads * n * n * elem_bytes
    r = batch * heads * n * 4
    fwd_f, bwd_f = 4 * t + r, 13 * t + 5 * r
    fwd_u, bwd_u = 8 * t + 4 * a, 12 * t + 7 * a
    return {"fwd_fused": fwd_f, "bwd_fused": bwd_f, "fused": fwd_f + bwd_f,
            "fwd_unfused": fwd_u, "bwd_unfused": bwd_u, "unfused": fwd_u + bwd_u}


# Representative shape of the HBM model in aot_specs: the DDPM CIFAR-10 16x16 attention (one head of
# 256 channels), batch 128. Every row carries the forward+backward totals of that shape.
AOT_SHAPE = (128, 1, 256, 256)  # B, heads, N, D
_KERNELS = {"fwd": "attn_fwd", "bwd_dkdv": "attn_bwd_dkdv", "bwd_dq": "attn_bwd_dq"}


def _meta_inputs(shape: Sequence[int], layout: str, dtype: torch.dtype) -> tuple:
    """Meta q, k, v, dO of `shape` in `layout`: "contiguous" [B, H, N, D] tensors, or "pixel": the
    U-Net's views of one [B, 3C, N] qkv projection (q, k, v) and of a [B, C, N] gradient (dO)."""
    b, h, n, d = shape
    if layout == "contiguous":
        return tuple(torch.empty((b, h, n, d), dtype=dtype, device="meta") for _ in range(4))
    qkv = torch.empty((b, 3 * h * d, n), dtype=dtype, device="meta")
    q, k, v = qkv.reshape(b, 3, h, d, n).transpose(-1, -2).unbind(1)
    do = torch.empty((b, h * d, n), dtype=dtype, device="meta").reshape(b, h, d, n).transpose(-1, -2)
    return q, k, v, do


def launch_specs(kind: str, shape: Sequence[int], layout: str, dtype: torch.dtype, prec: str,
                 config: Config, part: int = 0) -> dict:
    """signature / constexprs / attrs / warps / stages of the `kind` kernel ("fwd", "bwd_dkdv",
    "bwd_dq") as the launcher would launch it on inputs of `shape` and `layout` with `config`: built
    from the launcher's own argument builders and Triton's own specialisation rules
    (`kernels.aot.runtime_spec`), on meta tensors."""
    from .aot import runtime_spec

    b, h, n, d = shape
    q, k, v, do = _meta_inputs(shape, layout, dtype)
    o = empty_like_layout(q, q.shape)
    lse = torch.empty((b, h, n), dtype=torch.float32, device="meta")
    if kind == "fwd":
        args, consts = _fwd_args(q, k, v, o, lse, 1.0 / math.sqrt(d), prec)
        fn = _attn_fwd_kernel
    else:
        grads = tuple(empty_like_layout(t, t.shape) for t in ((k, v) if kind == "bwd_dkdv" else (q,)))
        args, consts = _bwd_args(kind, q, k, v, do, lse, lse, grads, 1.0 / math.sqrt(d), prec, part)
        fn = _attn_bwd_dkdv_kernel if kind == "bwd_dkdv" else _attn_bwd_dq_kernel
    kw = _config_kwargs(kind, config, n, n, consts["BLOCK_D"])
    warps, stages, fusion = kw.pop("num_warps"), kw.pop("num_stages"), kw.pop("enable_fp_fusion")
    spec = runtime_spec(fn, args, {**consts, **kw})
    spec.update(fn=fn, num_warps=warps, num_stages=stages, options={"enable_fp_fusion": fusion},
                even=(kw["EVEN_M"], kw["EVEN_N"]))
    return spec


def _preprocess_spec(shape: Sequence[int], layout: str, dtype: torch.dtype) -> dict:
    from .aot import runtime_spec

    b, h, n, d = shape
    q, _, _, do = _meta_inputs(shape, layout, dtype)
    o = empty_like_layout(q, q.shape)
    delta = torch.empty((b, h, n), dtype=torch.float32, device="meta")
    args, consts = _preprocess_args(o, do, delta)
    spec = runtime_spec(_attn_bwd_preprocess_kernel, args, consts)
    spec.update(fn=_attn_bwd_preprocess_kernel, num_warps=_PREPROCESS_WARPS, num_stages=1,
                options={"enable_fp_fusion": _FP_FUSION})
    return spec


# The variants aot_specs compiles: (shape, layout, dtype name). The shapes of benchmarks/
# bench_attention.py (contiguous) and the U-Net's pixel-major views at the DDPM CIFAR-10 16x16
# attention (one head of 256) and at 4 heads of 64; N = 200 (not a multiple of any tile: the masked
# variant) at each head dim.
AOT_VARIANTS: tuple = (
    ((256, 1, 256, 256), "contiguous"), ((128, 1, 256, 256), "pixel"), ((200, 1, 200, 256), "contiguous"),
    ((64, 4, 256, 64), "contiguous"), ((32, 4, 1024, 64), "contiguous"), ((128, 4, 64, 64), "contiguous"),
    ((64, 4, 256, 64), "pixel"), ((64, 4, 200, 64), "contiguous"),
    ((32, 8, 256, 128), "contiguous"), ((32, 8, 200, 128), "contiguous"), ((64, 8, 200, 32), "contiguous"),
)
# fp32 variants (tf32 and ieee): the U-Net's pixel-major views at D = 256 and 64, D = 128 contiguous, and
# D = 32 masked.
AOT_VARIANTS_FP32: tuple = (
    ((128, 1, 256, 256), "pixel"), ((64, 4, 256, 64), "pixel"), ((32, 8, 256, 128), "contiguous"),
    ((64, 8, 200, 32), "contiguous"),
)


def _variant_specs(shape, layout: str, dtype: torch.dtype, prec: str, arch: int) -> list:
    """(kernel name, config, spec) of every program the launcher runs for one input variant on `arch`:
    the preprocess kernel, then every config of the forward, dK/dV (each PART) and dQ kernels."""
    block_d = _block_d(shape[3])
    entries = [("attn_bwd_preprocess", None, _preprocess_spec(shape, layout, dtype))]
    for kind in ("fwd", "bwd_dkdv", "bwd_dq"):
        parts = dkdv_parts(block_d, dtype, arch) if kind == "bwd_dkdv" else (0,)
        for cfg in _configs(kind, block_d, dtype, prec, arch):
            for part in parts:
                name = _KERNELS[kind] + ("", "[dk]", "[dv]")[part]
                entries.append((name, cfg, launch_specs(kind, shape, layout, dtype, prec, cfg, part)))
    return entries


def _spec_key(spec: dict) -> tuple:
    return (spec["fn"].__name__, repr(sorted(spec["signature"].items())), repr(sorted(spec["constexprs"].items())),
            repr(sorted(spec["attrs"].items())), spec["num_warps"], spec["num_stages"])


def aot_specs() -> list[dict]:
    """One dict per distinct compiled program the launcher selects for the AOT_VARIANTS on each arch
    (`archs`: the spec is compiled for that arch only, its configs being that arch's): every config
    of every kernel (fwd, dK/dV, dQ; plus the preprocess kernel) for bf16, and for fp32 with PyTorch's
    "tf32" precision (tensor cores) and "highest" ("ieee": FMA dots), each with the divisibility
    attributes and constants Triton's launcher derives from the real arguments (pointers and strides
    divisible by 16, H = 1 and unit strides as constants) and the EVEN_M / EVEN_N flags of the shape.
    Shapes that give the same program are compiled once (their labels are joined in `config`).
    fp16 takes the bf16 configs and programs (same tiles and layouts). hbm_bytes_*: forward + backward
    totals of ``modelled_hbm_bytes`` at AOT_SHAPE (4-byte elements on fp32 rows), the same on every row.
    """
    b, h, n, d_model = AOT_SHAPE
    jobs = [(v, torch.bfloat16, "ieee") for v in AOT_VARIANTS]
    jobs += [(v, torch.float32, p) for p in ("tf32", "ieee") for v in AOT_VARIANTS_FP32]
    specs: dict = {}
    for arch in CONFIGS:
        for (shape, layout), dtype, prec in jobs:
            model = modelled_hbm_bytes(b, h, n, d_model, 2 if dtype == torch.bfloat16 else 4)
            label = f"{'x'.join(map(str, shape))} {layout}"
            for name, cfg, spec in _variant_specs(shape, layout, dtype, prec, arch):
                key = _spec_key(spec) + (arch,)
                if key in specs:
                    specs[key]["shapes"].append(label)
                    continue
                tiles = "" if cfg is None else "BLOCK_M={},BLOCK_N={},warps={},stages={},".format(*cfg)
                even = spec.pop("even", None)
                masked = "" if even is None else ("unmasked," if all(even) else "masked,")
                spec.update(kernel=name, tiles=f"D={shape[3]},{tiles}{masked}{_table_name(dtype, prec)}",
                            shapes=[label], archs=(arch,), hbm_bytes_fused=model["fused"],
                            hbm_bytes_unfused=model["unfused"])
                specs[key] = spec
    out = []
    for spec in specs.values():
        spec["config"] = f"{spec.pop('tiles')} [{'; '.join(spec.pop('shapes'))}]"
        out.append(spec)
    return out

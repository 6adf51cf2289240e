"""Triton flash attention (non-causal) forward and backward for the U-Net's self-attention.

Layout: q [B, H, Nq, D], k and v [B, H, Nk, D] (the layout of ``F.scaled_dot_product_attention``),
any strides in all four dimensions, head_dim's included: the kernels take every stride and read views
in place (the U-Net's q, k, v are views of its [B, 3C, H*W] qkv projection with stride(N) = 1,
stride(D) = H*W). Outputs (o, dq, dk, dv) are laid out like their input (`empty_like_layout`:
N-fastest for such pixel-major views, contiguous otherwise), or always N-fastest with
``out_layout="pixel"`` (what ``fastddpm.ops.attention`` asks for). Nq != Nk works too. D <= 256.

Math (per batch*head; s = sm_scale; c = log2(e); rows i are queries, columns j keys)
--------------------------------------------------------------------------------------
    S_ij   = s * q_i . k_j
    lse_i  = log sum_j exp(S_ij)                   (natural log, fp32 [B, H, Nq]; saved for backward)
    P_ij   = exp(S_ij - lse_i)
    o_i    = sum_j P_ij v_j

Forward (``_attn_fwd_kernel``), one program per (batch*head, BLOCK_M query rows), online softmax in
base 2 over key blocks of BLOCK_N (T_ij = c S_ij = (s c) q_i . k_j, exp(S) = exp2(T)):

    m_i <- -inf, l_i <- 0, acc_i <- 0                       (fp32)
    for each key block J:
        T     = (s c) Q K_J^T          (key columns j >= Nk masked to -inf)
        m'    = max(m_i, max_j T_ij)
        P~    = exp2(T - m'),  alpha = exp2(m_i - m')
        l_i   = alpha l_i + sum_j P~_ij
        acc_i = alpha acc_i + P~ V_J   (P~ cast to the input dtype for the tensor-core dot)
        m_i   = m'
    o_i = acc_i / l_i (stored in the input dtype),  lse_i = (m_i + log2 l_i) / c

Backward, with dO given (no atomics, every output element has exactly one writer):

    delta_i = sum_d dO_id O_id                     (``_attn_bwd_preprocess_kernel``, fp32 [B, H, Nq])
    P_ij    = exp2(T_ij - c lse_i)                 (recomputed from q, k and lse)
    dV_j    = sum_i P_ij dO_i
    dP_ij   = dO_i . v_j
    dS_ij   = P_ij (dP_ij - delta_i)               (softmax backward: sum_j P_ij dP_ij = delta_i)
    dQ_i    = s sum_j dS_ij k_j
    dK_j    = s sum_i dS_ij q_i

``_attn_bwd_dkdv_kernel``: one program per (batch*head, BLOCK_N key rows), keeps k_J, v_J and the fp32
dK_J, dV_J accumulators and loops over query blocks (computes the transposed tiles P^T, dP^T).
``_attn_bwd_dq_kernel``: one program per (batch*head, BLOCK_M query rows), keeps q_I, dO_I, lse_I,
delta_I and the fp32 dQ_I accumulator and loops over key blocks. P is recomputed in both (the price
of having no atomics).

Masks: query rows >= Nq load zeros and are not stored (their P columns are zeroed in the dK/dV pass);
key rows >= Nk load zeros, get -inf scores in the forward and P = 0 in the backward. The flags
EVEN_M / EVEN_N (Nq % BLOCK_M == 0 / Nk % BLOCK_N == 0, computed per config) drop those masks.
head_dim D is a constexpr padded to BLOCK_D = max(32, next_pow2(D)); padded columns are masked
(EVEN_D drops the mask when D is a power of two >= 32).

Precision
---------
Accumulators (m, l, acc, dK, dV, dQ, delta, lse) are fp32 for every input dtype; for bf16/fp16
inputs P and dS are rounded to the input dtype before their tensor-core dot (as FlashAttention does).
fp32 inputs follow PyTorch's matmul precision (`fp32_precision`): "highest" (the default) uses
``input_precision="ieee"`` (true fp32 FMA dots, small tiles: the operands live in registers; 2e-5
absolute vs float64 in the tests); "high"/"medium" or ``torch.backends.cuda.matmul.allow_tf32`` use
"tf32" (tensor-core dots with 10-bit mantissa operands; 1e-2 absolute stated for the GPU; the
interpreter's dots are exact); the D = 256 dQ kernel runs TF32 on 16 x 32 tiles with 4 warps, the one
tile found spill-free (251-255 registers). bf16/fp16 always run on tensor cores.
The interpreter's ``tl.dot`` multiplies bf16 bit patterns as integers (triton 3.9), so under
TRITON_INTERPRET=1 bf16 operands are converted to fp32 before each dot (``UPCAST``); bf16 x bf16
products are exact in fp32, so this is the tensor-core arithmetic up to summation order.
FP fusion: launched with ``enable_fp_fusion=True`` explicitly (FMA contraction of the score scaling
and the online-softmax rescale); the effect is a few fp32 ulps, far below the stated tolerances
(tests: fp32 2e-5 absolute on unit-scale data vs a float64 reference; bf16/fp16 within 2x the error of
``F.scaled_dot_product_attention`` in the same dtype plus a floor).

Configs
-------
``CONFIGS[arch][precision][kernel][BLOCK_D]`` holds (BLOCK_M, BLOCK_N, num_warps, num_stages) per arch
(80, 86, 89, 90, 100, 120: `kernels.arch`, which also states each arch's shared memory per block;
`device_arch` picks the table of a device), precision ("bf16" for bf16/fp16, "tf32", "ieee") and
kernel ("fwd", "bwd_dkdv", "bwd_dq"); these lists are what ``triton.autotune`` tries on a GPU (key:
Nq, Nk, head dim) and what ``aot_specs`` compiles, each arch's list for that arch, with the
specialisation Triton's launcher gives the real arguments. Every config compiles with no spills
(checked with ``cuobjdump --dump-resource-usage``: LOCAL = 0 *and* STACK = 0; ptxas puts spills in
the stack frame, so a nonzero STACK with LOCAL = 0 is still a spill), shared memory within the limit,
and to the intended tensor-core instructions (wgmma on sm_90: the tile a program owns is >= 64 rows,
4 warps per 64; mma.sync on sm_80 / sm_86 / sm_89 / sm_120; tcgen05 on sm_100), read from the PTX.
sm_86 / sm_89 / sm_120 have 99 KiB of shared memory per block (sm_80 163 KiB, sm_90 227 KiB): their
tables are sm_80's with the tiles that need more moved to smaller or single-stage ones. sm_100 takes
sm_90's tables (the same 227 KiB and 64-row tiles). At D = 256 on sm_90 (and sm_100) the dK/dV kernel runs
twice (`dkdv_parts`: PART 1 dK, PART 2 dV), since both [64, 256] fp32 accumulators in one program
spill. ``RELOAD_Q`` (re-read the q tile every key block) is left for the 32-row D = 256 FMA tiles.
Under TRITON_INTERPRET=1 the fixed ``INTERPRET_CONFIG`` is used; every launcher also takes
``config=(BLOCK_M, BLOCK_N, warps, stages)`` to force one.

The traffic model (``modelled_hbm_bytes``) and the AOT spec lists (``aot_specs``) live beside this
file in ``kernels/attention_specs.py``; their names are also reachable here (forwarded on first use).
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

import torch
import triton
import triton.language as tl

from .arch import arch_of
from .checks import check_attention
from .device_guard import on_tensor_device

__all__ = [
    "CONFIGS",
    "fp32_precision",
    "dkdv_parts",
    "pixel_major",
    "empty_like_layout",
    "preprocess_block_m",
    "INTERPRET_CONFIG",
    "attention_forward",
    "attention_backward",
    "device_arch",
]

_LOG2E = 1.4426950408889634
_FP_FUSION = True
_MAX_HEAD_DIM = 256

Config = tuple  # (BLOCK_M, BLOCK_N, num_warps, num_stages)

# Explicit config lists (autotune on a GPU + aot_specs): CONFIGS[arch][precision][kernel][BLOCK_D],
# entries (BLOCK_M, BLOCK_N, num_warps, num_stages); arch as in `kernels.arch` (80, 86, 89, 90, 100, 120),
# precision "bf16" (bf16 and fp16 inputs), "tf32" or "ieee" (fp32 inputs, by PyTorch's matmul
# precision). BLOCK_M is the query tile, BLOCK_N the key tile. The tensor-core M dimension of every dot
# is the tile a program owns: BLOCK_M in the forward and dQ kernels, BLOCK_N in dK/dV. Hopper's wgmma
# needs it >= 64 (one warpgroup of 4 warps per 64 rows), so on sm_90 those tiles are 64 or 128; the
# other tile is the loop step. Every entry was chosen from the AOT report (benchmarks/kernel_report.py):
# wgmma on sm_90, mma.sync on sm_80 for bf16/fp16 and tf32, no spills (LOCAL = STACK = 0), shared
# memory within the arch's limit, in the masked and unmasked variants the launcher selects.
_SM90_BF16 = {
    "fwd": {32: [(128, 64, 4, 3)], 64: [(128, 64, 8, 3), (64, 64, 4, 3)],
            128: [(128, 64, 8, 2), (64, 64, 4, 3)], 256: [(64, 64, 8, 2)]},
    "bwd_dkdv": {32: [(64, 64, 4, 2)], 64: [(64, 64, 4, 2), (32, 64, 4, 2)],
                 128: [(64, 64, 8, 2), (32, 64, 4, 2)], 256: [(32, 64, 8, 2)]},
    "bwd_dq": {32: [(64, 64, 4, 2)], 64: [(64, 64, 4, 2), (64, 32, 4, 2)],
               128: [(64, 64, 8, 2), (64, 32, 4, 2)], 256: [(64, 32, 8, 2)]},
}
_SM90_TF32 = {
    "fwd": {32: [(64, 64, 4, 2)], 64: [(64, 64, 4, 2)], 128: [(64, 32, 4, 2)], 256: [(64, 16, 8, 1)]},
    # D = 256: 16-row key tiles (mma.sync even on sm_90: a 64-row wgmma tile with two fp32 [64, 256]
    # accumulators and fp32 operands spills)
    "bwd_dkdv": {32: [(32, 64, 4, 1)], 64: [(32, 64, 4, 1)], 128: [(32, 64, 4, 1)], 256: [(16, 32, 8, 1)]},
    # D = 256: 16 x 32 tiles, 4 warps, mma.sync on every arch (251-255 registers, no stack; every other
    # TF32 dQ tile tried at D = 256 spilled 24-2352 bytes, 64-row wgmma ones included)
    "bwd_dq": {32: [(64, 32, 4, 1)], 64: [(64, 32, 4, 1)], 128: [(64, 32, 4, 1)], 256: [(16, 32, 4, 1)]},
}
# fp32 under "highest" (ieee FMA dots, operands in registers): small tiles, one config each (sm_86 moves one).
_IEEE = {
    "fwd": {32: [(32, 32, 4, 1)], 64: [(32, 32, 4, 1)], 128: [(16, 16, 4, 1)], 256: [(16, 16, 4, 1)]},
    "bwd_dkdv": {32: [(32, 32, 4, 1)], 64: [(16, 16, 4, 1)], 128: [(16, 32, 4, 1)], 256: [(16, 16, 8, 1)]},
    # D = 64 dQ: 16 x 16 tiles left a 16-byte stack frame on sm_80 for the pixel-major views
    "bwd_dq": {32: [(32, 32, 4, 1)], 64: [(16, 32, 4, 1)], 128: [(16, 32, 4, 1)], 256: [(16, 16, 8, 1)]},
}


# The archs whose 64-row tensor-core tiles (wgmma, tcgen05) run the 16-bit D = 256 dK/dV as two launches.
_SPLIT_DKDV_ARCHS = (90, 100)


def _override(table: dict, changes: dict) -> dict:
    return {kind: {**per_d, **changes.get(kind, {})} for kind, per_d in table.items()}


# sm_80: mma.sync has no 64-row minimum; D = 256 takes the smaller tiles that stay spill-free there.
_SM80_BF16 = _override(_SM90_BF16, {"bwd_dkdv": {256: [(32, 32, 8, 2)]}})
_SM80_TF32 = _override(_SM90_TF32, {"bwd_dq": {128: [(32, 32, 4, 1)]}})
# sm_86 / sm_89 / sm_120: sm_80's mma.sync tiles within 99 KiB of shared memory per block (sm_80's D = 256
# forward needs 106,496 B there, its dQ 102,400 B, the TF32 dK/dV tiles 114,688 B), and the tiles whose
# sm_86 build keeps a stack frame (bf16 D = 64 dK/dV at 4 warps, TF32 D = 256 forward, ieee D = 256 dK/dV)
# moved to ones that do not.
_SM86_BF16 = _override(_SM80_BF16, {"fwd": {256: [(64, 32, 8, 2), (64, 64, 8, 1)]},
                                    "bwd_dkdv": {64: [(64, 64, 8, 2), (32, 64, 4, 2)]},
                                    "bwd_dq": {256: [(64, 16, 8, 2), (32, 32, 4, 2)]}})
_SM86_TF32 = _override(_SM80_TF32, {"fwd": {256: [(32, 32, 8, 1)]},
                                    "bwd_dkdv": {128: [(32, 32, 4, 1)], 256: [(16, 16, 8, 1)]}})
_SM86_IEEE = _override(_IEEE, {"bwd_dkdv": {256: [(16, 16, 4, 1)]}})
CONFIGS: dict = {
    90: {"bf16": _SM90_BF16, "tf32": _SM90_TF32, "ieee": _IEEE},
    80: {"bf16": _SM80_BF16, "tf32": _SM80_TF32, "ieee": _IEEE},
    86: {"bf16": _SM86_BF16, "tf32": _SM86_TF32, "ieee": _SM86_IEEE},
    89: {"bf16": _SM86_BF16, "tf32": _SM86_TF32, "ieee": _SM86_IEEE},
    100: {"bf16": _SM90_BF16, "tf32": _SM90_TF32, "ieee": _IEEE},
    120: {"bf16": _SM86_BF16, "tf32": _SM86_TF32, "ieee": _IEEE},  # sm_120 ptxas: (16, 16, 4, 1) keeps a stack
}


def preprocess_block_m(block_d: int) -> int:
    """Rows per program of the delta = rowsum(dO * O) kernel: 4096 elements per [rows, BLOCK_D] tile."""
    return max(16, 4096 // block_d)


_PREPROCESS_WARPS = 4
# Fixed config under TRITON_INTERPRET=1 (programs run one after another on the CPU).
INTERPRET_CONFIG: Config = (32, 32, 4, 1)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST (interpreter only: its tl.dot multiplies bf16 bit patterns
    as integers) computes the same product in fp32: bf16 x bf16 products are exact in fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _program_tile(N_ROWS, H, BLOCK: tl.constexpr):
    """(tile, bh, b, h) of this program. The 1-D grid holds cdiv(N_ROWS, BLOCK) row tiles per
    (batch, head), tiles fastest; b and h are int64 (they multiply strides of tensors over 2^31)."""
    pid = tl.program_id(0)
    num_tiles = tl.cdiv(N_ROWS, BLOCK)
    bh = pid // num_tiles
    return pid % num_tiles, bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64)


@triton.jit
def _head(X, b, h, stride_b, stride_h):
    """Pointer to element [b, h, 0, 0] of a [B, H, N, D] tensor."""
    return X + b * stride_b + h * stride_h


@triton.jit
def _load_rows(ptrs, mask_rows, mask_d, EVEN_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile; rows outside mask_rows and padded head-dim columns read 0."""
    if EVEN_ROWS and EVEN_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=mask_rows[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def _load_row_stats(LSE, DELTA, row_base, offs_m, mask_m, EVEN_M: tl.constexpr):
    """(c lse_i, delta_i) of the query rows offs_m (c = log2 e: lse in base 2); 0 for masked rows."""
    if EVEN_M:
        lse2 = tl.load(LSE + row_base + offs_m) * 1.4426950408889634
        delta = tl.load(DELTA + row_base + offs_m)
    else:
        lse2 = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
    return lse2, delta


@triton.jit
def _store_rows(ptrs, val, mask_rows, mask_d, EVEN_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Store a [rows, BLOCK_D] fp32 tile in the pointer's dtype, skipping masked rows and columns."""
    if EVEN_ROWS and EVEN_D:
        tl.store(ptrs, val.to(ptrs.dtype.element_ty))
    else:
        tl.store(ptrs, val.to(ptrs.dtype.element_ty), mask=mask_rows[:, None] & mask_d[None, :])


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N_Q, N_KV,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, RELOAD_Q: tl.constexpr,
):
    # qk_scale = sm_scale * log2(e) = s c: scores T in base 2.
    pid_m, bh, b, h = _program_tile(N_Q, H, BLOCK_M)
    k_base = _head(K, b, h, stride_kb, stride_kh)
    v_base = _head(V, b, h, stride_vb, stride_vh)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_DIM

    q_ptrs = _head(Q, b, h, stride_qb, stride_qh) + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    if not RELOAD_Q:
        q = _load_rows(q_ptrs, mask_m, mask_d, EVEN_M, EVEN_D)

    # m_i <- -inf, l_i <- 0, acc_i <- 0
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, N_KV, BLOCK_N):
        # key block J: K_J^T [BLOCK_D, BLOCK_N] (loaded transposed), V_J [BLOCK_N, BLOCK_D]
        offs_n = start_n + offs_n0
        mask_n = offs_n < N_KV
        kt_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if EVEN_N and EVEN_D:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        else:
            kt = tl.load(kt_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if RELOAD_Q:
            # D = 256: re-read the q tile (L1/L2 hit) every key block instead of keeping it live in
            # registers across the loop; the tensor-core dot then takes it from shared memory.
            q = _load_rows(q_ptrs, mask_m, mask_d, EVEN_M, EVEN_D)
        # T = (s c) Q K_J^T, key columns j >= Nk at -inf
        s = _dot(q, kt, PREC, UPCAST) * qk_scale
        if not EVEN_N:
            s = tl.where(mask_n[None, :], s, float("-inf"))
        # m' = max(m_i, max_j T_ij); P~ = exp2(T - m'); alpha = exp2(m_i - m')
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        # l_i = alpha l_i + sum_j P~_ij; acc_i = alpha acc_i + P~ V_J
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new

    # o_i = acc_i / l_i; lse_i = (m_i + log2 l_i) / c
    o = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634
    o_ptrs = _head(O, b, h, stride_ob, stride_oh) + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    _store_rows(o_ptrs, o, mask_m, mask_d, EVEN_M, EVEN_D)
    lse_ptrs = LSE + bh.to(tl.int64) * N_Q + offs_m
    if EVEN_M:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=mask_m)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    H, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # delta_i = sum_d dO_id O_id
    pid_m, bh, b, h = _program_tile(N_Q, H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask = mask_m[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(_head(O, b, h, stride_ob, stride_oh) + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(_head(DO, b, h, stride_dob, stride_doh) + offs_m[:, None] * stride_don
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(DELTA + bh.to(tl.int64) * N_Q + offs_m, delta, mask=mask_m)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, N_Q, N_KV,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, PART: tl.constexpr,
):
    # PART 0: dK and dV; 1: dK only; 2: dV only (two launches at D = 256, where two [BLOCK_N, 256]
    # fp32 accumulators next to the wgmma operands exceed 255 registers per thread).
    pid_n, bh, b, h = _program_tile(N_KV, H, BLOCK_N)
    q_base = _head(Q, b, h, stride_qb, stride_qh)
    do_base = _head(DO, b, h, stride_dob, stride_doh)
    row_base = bh.to(tl.int64) * N_Q
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N_KV
    mask_d = offs_d < HEAD_DIM

    # this program's key rows j: k_J, v_J (v only where dK is computed: dP needs it)
    k_ptrs = _head(K, b, h, stride_kb, stride_kh) + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = _head(V, b, h, stride_vb, stride_vh) + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    k = _load_rows(k_ptrs, mask_n, mask_d, EVEN_N, EVEN_D)
    if PART != 2:
        v = _load_rows(v_ptrs, mask_n, mask_d, EVEN_N, EVEN_D)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N_Q, BLOCK_M):
        # query block I: q_I, dO_I, c lse_I, delta_I
        offs_m = start_m + offs_m0
        mask_m = offs_m < N_Q
        q = _load_rows(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask_m, mask_d,
                       EVEN_M, EVEN_D)
        do = _load_rows(do_base + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod, mask_m, mask_d,
                        EVEN_M, EVEN_D)
        lse2, delta = _load_row_stats(LSE, DELTA, row_base, offs_m, mask_m, EVEN_M)
        # transposed tiles [BLOCK_N, BLOCK_M] (rows are keys): P^T = exp2(T^T - c lse), masked queries 0
        st = _dot(k, tl.trans(q), PREC, UPCAST) * qk_scale
        pt = tl.math.exp2(st - lse2[None, :])
        if not EVEN_M:
            pt = tl.where(mask_m[None, :], pt, 0.0)
        if PART != 1:
            # dV_j += sum_i P_ij dO_i
            dv += _dot(pt.to(do.dtype), do, PREC, UPCAST)
        if PART != 2:
            # dP^T = v_J dO_I^T; dS^T = P^T (dP^T - delta); dK_j += sum_i dS_ij q_i (times s below)
            dpt = _dot(v, tl.trans(do), PREC, UPCAST)
            dst = pt * (dpt - delta[None, :])
            dk += _dot(dst.to(q.dtype), q, PREC, UPCAST)
    dk = dk * sm_scale

    dk_ptrs = _head(DK, b, h, stride_dkb, stride_dkh) + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = _head(DV, b, h, stride_dvb, stride_dvh) + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    if PART != 2:
        _store_rows(dk_ptrs, dk, mask_n, mask_d, EVEN_N, EVEN_D)
    if PART != 1:
        _store_rows(dv_ptrs, dv, mask_n, mask_d, EVEN_N, EVEN_D)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    H, N_Q, N_KV,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m, bh, b, h = _program_tile(N_Q, H, BLOCK_M)
    k_base = _head(K, b, h, stride_kb, stride_kh)
    v_base = _head(V, b, h, stride_vb, stride_vh)
    row_base = bh.to(tl.int64) * N_Q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_DIM

    # this program's query rows i: q_I, dO_I, c lse_I, delta_I
    q_ptrs = _head(Q, b, h, stride_qb, stride_qh) + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    do_ptrs = _head(DO, b, h, stride_dob, stride_doh) + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod
    q = _load_rows(q_ptrs, mask_m, mask_d, EVEN_M, EVEN_D)
    do = _load_rows(do_ptrs, mask_m, mask_d, EVEN_M, EVEN_D)
    lse2, delta = _load_row_stats(LSE, DELTA, row_base, offs_m, mask_m, EVEN_M)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N_KV, BLOCK_N):
        # key block J: k_J [BLOCK_N, BLOCK_D], V_J^T [BLOCK_D, BLOCK_N] (loaded transposed)
        offs_n = start_n + offs_n0
        mask_n = offs_n < N_KV
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        vt_ptrs = v_base + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd
        if EVEN_N and EVEN_D:
            k = tl.load(k_ptrs)
            vt = tl.load(vt_ptrs)
        else:
            k = tl.load(k_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            vt = tl.load(vt_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        # P = exp2(T - c lse), masked keys 0
        s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if not EVEN_N:
            p = tl.where(mask_n[None, :], p, 0.0)
        # dP = dO_I V_J^T; dS = P (dP - delta); dQ_i += sum_j dS_ij k_j (times s below)
        dp = _dot(do, vt, PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PREC, UPCAST)
    dq = dq * sm_scale

    dq_ptrs = _head(DQ, b, h, stride_dqb, stride_dqh) + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd
    _store_rows(dq_ptrs, dq, mask_m, mask_d, EVEN_M, EVEN_D)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TUNED: dict[Any, Any] = {}
_PRECISIONS = ("ieee", "tf32")


def _block_d(head_dim: int) -> int:
    return max(32, triton.next_power_of_2(head_dim))


def fp32_precision() -> str:
    """The dot precision fp32 inputs get, following PyTorch's switch: "tf32" (tensor cores) when
    ``torch.get_float32_matmul_precision()`` is "high" or "medium" or
    ``torch.backends.cuda.matmul.allow_tf32`` is set, else "ieee" (exact fp32 FMA dots)."""
    if torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _precision(dtype: torch.dtype, precision: Optional[str]) -> str:
    """Dot input precision. bf16/fp16: "ieee" (a 16-bit dot always runs on tensor cores; the flag only
    matters for fp32). fp32: `precision` when given, else `fp32_precision()`."""
    if dtype != torch.float32:
        return "ieee"
    if precision is None:
        return fp32_precision()
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS} or None, got {precision!r}")
    return precision


def _reload_q(block_d: int, block_m: int) -> bool:
    """Forward: re-load the q tile every key block (instead of keeping it live across the loop) for
    the 32-row D=256 tiles of the FMA path only; the tensor-core configs keep q (their wgmma reads it
    from shared memory)."""
    return block_d >= 256 and block_m < 64


def _table_name(dtype: torch.dtype, prec: str) -> str:
    return prec if dtype == torch.float32 else "bf16"


def _configs(kind: str, block_d: int, dtype: torch.dtype, prec: str, arch: int) -> list[Config]:
    """The config list of `kind` ("fwd", "bwd_dkdv", "bwd_dq") for this head dim, dtype, precision, arch."""
    return CONFIGS[arch][_table_name(dtype, prec)][kind][block_d]


def device_arch(device: torch.device) -> int:
    """The CONFIGS table of `device`: `kernels.arch.arch_of` its compute capability (80, 86, 89, 90,
    100, 120); 90 in the interpreter and for CPU tensors (so the tests run the sm_90 launch plan, the
    D = 256 dK/dV split included)."""
    if _interpret() or device.type != "cuda":
        return 90
    return arch_of(torch.cuda.get_device_capability(device))


def _even_flags(args: dict) -> dict:
    return {
        "EVEN_M": args["N_Q"] % args["BLOCK_M"] == 0,
        "EVEN_N": args["N_KV"] % args["BLOCK_N"] == 0,
    }


def _check_config(config: Optional[Sequence[int]]) -> Optional[Config]:
    if config is None:
        return None
    if len(config) != 4 or not all(isinstance(c, int) for c in config):
        raise ValueError(f"config must be (BLOCK_M, BLOCK_N, num_warps, num_stages) ints, got {config!r}")
    bm, bn, _, _ = config
    for name, val in (("BLOCK_M", bm), ("BLOCK_N", bn)):
        if val < 16 or val & (val - 1):
            raise ValueError(f"config {name} must be a power of two >= 16, got {val}")
    return tuple(config)


def _config_kwargs(kind: str, config: Config, n_q: int, n_kv: int, block_d: int) -> dict:
    """Launch keywords of one fixed config: tiles, EVEN flags (RELOAD_Q for the forward), warps,
    stages, fp fusion. Shared by the launcher and aot_specs, so the AOT gate compiles what runs."""
    bm, bn, warps, stages = config
    kw = dict(BLOCK_M=bm, BLOCK_N=bn, EVEN_M=n_q % bm == 0, EVEN_N=n_kv % bn == 0,
              num_warps=warps, num_stages=stages, enable_fp_fusion=_FP_FUSION)
    if kind == "fwd":
        kw["RELOAD_Q"] = _reload_q(block_d, bm)
    return kw


def _launch(kernel, kind: str, n_rows: int, bh: int, args: list, consts: dict,
            n_q: int, n_kv: int, dtype: torch.dtype, config: Optional[Config], arch: int) -> None:
    """Launch `kernel` with a fixed config (interpreter / forced) or through triton.autotune.

    The grid is 1-D: cdiv(n_rows, BLOCK) * (batch*heads), BLOCK = BLOCK_N when the program owns key
    rows (dK/dV) and BLOCK_M when it owns query rows (forward, dQ); the kernel recomputes the count.
    """
    if config is None and _interpret():
        config = INTERPRET_CONFIG
    blk_name = "BLOCK_N" if kind == "bwd_dkdv" else "BLOCK_M"
    if config is not None:
        kw = _config_kwargs(kind, config, n_q, n_kv, consts["BLOCK_D"])
        kernel[(triton.cdiv(n_rows, kw[blk_name]) * bh,)](*args, **consts, **kw)
        return
    # one autotuner per power-of-two bucket of batch * heads too: Triton's key (Nq, Nk, head dim) does
    # not see how many programs share the SMs
    key = (kind, consts["BLOCK_D"], dtype, consts["PREC"], consts.get("PART", 0), arch, triton.next_power_of_2(bh))
    tuned = _TUNED.get(key)
    if tuned is None:
        configs = []
        for bm, bn, w, st in _configs(kind, consts["BLOCK_D"], dtype, consts["PREC"], arch):
            meta = {"BLOCK_M": bm, "BLOCK_N": bn}
            if kind == "fwd":
                meta["RELOAD_Q"] = _reload_q(consts["BLOCK_D"], bm)
            configs.append(triton.Config(meta, num_warps=w, num_stages=st))
        tuned = triton.autotune(configs, key=["N_Q", "N_KV", "HEAD_DIM"])(
            triton.heuristics(_even_flags)(kernel))
        _TUNED[key] = tuned

    def grid(meta):
        return (triton.cdiv(n_rows, meta[blk_name]) * bh,)

    tuned[grid](*args, **consts, enable_fp_fusion=_FP_FUSION)


def _check_tensor(t: Any, name: str, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor, got shape {tuple(t.shape)}")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    """`checks.check_attention` for the kernels' dtypes, and head_dim within the kernels' limit;
    returns (B, H, Nq, Nk, D)."""
    check_attention(q, k, v, _DTYPES)
    b, h, n_q, d = q.shape
    if not 1 <= d <= _MAX_HEAD_DIM:
        raise ValueError(f"q head_dim (last dim) must be in [1, {_MAX_HEAD_DIM}], got {d}")
    return b, h, n_q, k.shape[2], d


def _check_scale(sm_scale: Any) -> float:
    try:
        s = float(sm_scale)
    except (TypeError, ValueError):
        raise ValueError(f"sm_scale must be a finite float, got {sm_scale!r}") from None
    if not math.isfinite(s):
        raise ValueError(f"sm_scale must be a finite float, got {sm_scale!r}")
    return s


def _strides(t: torch.Tensor) -> list[int]:
    """All four strides (B, heads, N, head_dim): views are read in place, whatever their layout."""
    return list(t.stride())


def pixel_major(t: torch.Tensor) -> bool:
    """Whether t [B, H, N, D] runs along N fastest (stride(N) == 1 != stride(D)): the U-Net's q, k, v,
    views of the [B, 3C, H*W] qkv projection, and the gradient the output projection sends back."""
    return t.shape[2] > 1 and t.stride(2) == 1 and t.stride(3) != 1


_OUT_LAYOUTS = ("like_input", "pixel")


def empty_like_layout(t: torch.Tensor, shape: Sequence[int], dtype: Optional[torch.dtype] = None,
                      out_layout: str = "like_input") -> torch.Tensor:
    """An empty [B, H, N, D] tensor of `shape`: N-fastest ([B, H, D, N] memory, so a [B, C, H, W] reshape
    of its transpose is a view) when `out_layout` is "pixel" or t is `pixel_major`, else contiguous."""
    if out_layout not in _OUT_LAYOUTS:
        raise ValueError(f"out_layout must be one of {_OUT_LAYOUTS}, got {out_layout!r}")
    b, h, n, d = shape
    dtype = t.dtype if dtype is None else dtype
    if out_layout == "pixel" or pixel_major(t):  # not a view: see fastddpm.ops.attention._empty_pixel_major
        return torch.empty_strided((b, h, n, d), (h * d * n, d * n, 1, n), dtype=dtype, device=t.device)
    return torch.empty((b, h, n, d), dtype=dtype, device=t.device)


def _fwd_args(q, k, v, o, lse, scale: float, prec: str) -> tuple[list, dict]:
    """Positional arguments and constexprs of `_attn_fwd_kernel` (launcher and aot_specs share it)."""
    b, h, n_q, d = q.shape
    block_d = _block_d(d)
    args = [q, k, v, o, lse, scale * _LOG2E, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            h, n_q, k.shape[2]]
    consts = dict(HEAD_DIM=d, BLOCK_D=block_d, EVEN_D=d == block_d, PREC=prec,
                  UPCAST=_interpret() and q.dtype == torch.bfloat16)
    return args, consts


def _preprocess_args(o, do, delta) -> tuple[list, dict]:
    b, h, n_q, d = o.shape
    block_d = _block_d(d)
    return ([o, do, delta, *_strides(o), *_strides(do), h, n_q],
            dict(HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=preprocess_block_m(block_d)))


def dkdv_parts(block_d: int, dtype: torch.dtype, arch: int) -> tuple:
    """PART values of the dK/dV launches: (0,) one launch for both; (1, 2) dK then dV in two launches
    for 16-bit D = 256 on sm_90 (one [64, 256] fp32 accumulator per program keeps the 64-row wgmma
    tile spill-free; the price is recomputing P in both: 6 matmul passes instead of 4 in that kernel).
    The mma.sync archs (sm_80, sm_86, sm_89, sm_120) run 32-row tiles with both accumulators in one launch."""
    return (1, 2) if block_d >= 256 and dtype != torch.float32 and arch in _SPLIT_DKDV_ARCHS else (0,)


def _bwd_args(kind: str, q, k, v, do, lse, delta, grads: Sequence[torch.Tensor], scale: float,
              prec: str, part: int = 0) -> tuple[list, dict]:
    """Arguments of `_attn_bwd_dkdv_kernel` (grads = (dk, dv)) or `_attn_bwd_dq_kernel` (grads = (dq,))."""
    b, h, n_q, d = q.shape
    block_d = _block_d(d)
    args = [q, k, v, do, lse, delta, *grads, scale * _LOG2E, scale, *_strides(q), *_strides(k),
            *_strides(v), *_strides(do)]
    for g in grads:
        args += _strides(g)
    args += [h, n_q, k.shape[2]]
    consts = dict(HEAD_DIM=d, BLOCK_D=block_d, EVEN_D=d == block_d, PREC=prec,
                  UPCAST=_interpret() and q.dtype == torch.bfloat16)
    if kind == "bwd_dkdv":
        consts["PART"] = part
    return args, consts


@on_tensor_device
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float,
                      config: Optional[Sequence[int]] = None, precision: Optional[str] = None,
                      out_layout: str = "like_input") -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention forward: o = softmax(sm_scale * q k^T) v, non-causal.

    q [B, H, Nq, D], k and v [B, H, Nk, D], any strides (read in place: no copies), one dtype (float32,
    bfloat16, float16), one device (CUDA, or CPU under TRITON_INTERPRET=1), D <= 256. Returns (o, lse):
    o [B, H, Nq, D] in the input dtype, laid out like q (`empty_like_layout`: N-fastest for the
    U-Net's pixel-major views, else contiguous), lse float32 [B, H, Nq] contiguous, the natural-log
    log-sum-exp of each row of scaled scores. `precision` ("ieee" | "tf32", fp32 inputs only; default
    `fp32_precision()`, PyTorch's matmul switch). `out_layout` "pixel" makes o N-fastest whatever q's
    layout (the fixed layout `fastddpm.ops.attention` returns). `config` = (BLOCK_M, BLOCK_N, num_warps, num_stages)
    forces a tile config (default: autotune over the config lists on a GPU, INTERPRET_CONFIG in the
    interpreter).
    """
    b, h, n_q, n_kv, d = _check_qkv(q, k, v)
    scale = _check_scale(sm_scale)
    config = _check_config(config)
    prec = _precision(q.dtype, precision)
    o = empty_like_layout(q, (b, h, n_q, d), out_layout=out_layout)
    lse = torch.empty((b, h, n_q), dtype=torch.float32, device=q.device)
    if b * h * n_q == 0:
        return o, lse
    args, consts = _fwd_args(q, k, v, o, lse, scale, prec)
    _launch(_attn_fwd_kernel, "fwd", n_q, b * h, args, consts, n_q, n_kv, q.dtype, config, device_arch(q.device))
    return o, lse


@on_tensor_device
def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       o: torch.Tensor, lse: torch.Tensor, sm_scale: float,
                       config: Optional[Sequence[int]] = None, precision: Optional[str] = None,
                       out_layout: str = "like_input") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash attention backward: (dq, dk, dv) from dO, the inputs, o and lse of `attention_forward`.

    do and o [B, H, Nq, D] in q's dtype, any strides; lse float32 [B, H, Nq]. Three launches: delta =
    rowsum(dO * O) (fp32), then the dK/dV kernel and the dQ kernel (P recomputed in each; no atomics,
    deterministic). Returns dq, dk, dv in the input dtype, each laid out like its input
    (`empty_like_layout`; N-fastest with `out_layout="pixel"`). `config` forces (BLOCK_M, BLOCK_N,
    warps, stages) for both main kernels; `precision` as in `attention_forward`.
    """
    b, h, n_q, n_kv, d = _check_qkv(q, k, v)
    for name, t in (("do", do), ("o", o)):
        _check_tensor(t, name, 4)
        if tuple(t.shape) != tuple(q.shape) or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must match q (shape {tuple(q.shape)}, {q.dtype}, {q.device}), got "
                             f"shape {tuple(t.shape)}, {t.dtype}, {t.device}")
    _check_tensor(lse, "lse", 3)
    if tuple(lse.shape) != (b, h, n_q) or lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError(f"lse must be float32 of shape {(b, h, n_q)} on {q.device}, got "
                         f"{lse.dtype} {tuple(lse.shape)} on {lse.device}")
    scale = _check_scale(sm_scale)
    config = _check_config(config)
    prec = _precision(q.dtype, precision)
    lse = lse.contiguous()  # [B, H, N] fp32: a no-op for the forward's own lse
    dq = empty_like_layout(q, q.shape, out_layout=out_layout)
    dk = empty_like_layout(k, k.shape, out_layout=out_layout)
    dv = empty_like_layout(v, v.shape, out_layout=out_layout)
    if b * h == 0 or n_kv == 0:
        return dq, dk, dv
    if n_q == 0:
        return dq, dk.zero_(), dv.zero_()
    delta = torch.empty((b, h, n_q), dtype=torch.float32, device=q.device)
    args, consts = _preprocess_args(o, do, delta)
    _attn_bwd_preprocess_kernel[(triton.cdiv(n_q, consts["BLOCK_M"]) * b * h,)](
        *args, **consts, num_warps=_PREPROCESS_WARPS, enable_fp_fusion=_FP_FUSION)
    arch = device_arch(q.device)
    for part in dkdv_parts(_block_d(d), q.dtype, arch):
        args, consts = _bwd_args("bwd_dkdv", q, k, v, do, lse, delta, (dk, dv), scale, prec, part)
        _launch(_attn_bwd_dkdv_kernel, "bwd_dkdv", n_kv, b * h, args, consts, n_q, n_kv, q.dtype, config, arch)
    args, consts = _bwd_args("bwd_dq", q, k, v, do, lse, delta, (dq,), scale, prec)
    _launch(_attn_bwd_dq_kernel, "bwd_dq", n_q, b * h, args, consts, n_q, n_kv, q.dtype, config, arch)
    return dq, dk, dv


# The traffic model and the AOT spec lists: kernels/attention_specs.py (imported on first use).
_SPEC_NAMES = frozenset({"modelled_hbm_bytes", "aot_specs", "launch_specs", "AOT_SHAPE", "AOT_VARIANTS",
                         "AOT_VARIANTS_FP32"})


def __getattr__(name: str) -> Any:
    """Forward the names of `kernels.attention_specs` (``kernels.attention.aot_specs`` and the like)."""
    if name in _SPEC_NAMES:
        from . import attention_specs

        return getattr(attention_specs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

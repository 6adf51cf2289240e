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
interpreter's dots are exact), except the D = 256 dQ kernel, which stays ieee (no spill-free TF32
tile). bf16/fp16 always run on tensor cores.
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
(90: Hopper, 80: the rest, `device_arch`), precision ("bf16" for bf16/fp16, "tf32", "ieee") and
kernel ("fwd", "bwd_dkdv", "bwd_dq"); these lists are what ``triton.autotune`` tries on a GPU (key:
Nq, Nk, head dim) and what ``aot_specs`` compiles, each arch's list for that arch, with the
specialisation Triton's launcher gives the real arguments. Every config compiles with no spills
(checked with ``cuobjdump --dump-resource-usage``: LOCAL = 0 *and* STACK = 0; ptxas puts spills in
the stack frame, so a nonzero STACK with LOCAL = 0 is still a spill), shared memory within the limit,
and to the intended tensor-core instructions (wgmma on sm_90: the tile a program owns is >= 64 rows,
4 warps per 64; mma.sync on sm_80), read from the PTX. At D = 256 on sm_90 the dK/dV kernel runs
twice (`dkdv_parts`: PART 1 dK, PART 2 dV), since both [64, 256] fp32 accumulators in one program
spill. ``RELOAD_Q`` (re-read the q tile every key block) is left for the 32-row D = 256 FMA tiles.
Under TRITON_INTERPRET=1 the fixed ``INTERPRET_CONFIG`` is used; every launcher also takes
``config=(BLOCK_M, BLOCK_N, warps, stages)`` to force one.

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
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

import torch
import triton
import triton.language as tl

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
    "modelled_hbm_bytes",
    "aot_specs",
]

_LOG2E = 1.4426950408889634
_FP_FUSION = True
_MAX_HEAD_DIM = 256

Config = tuple  # (BLOCK_M, BLOCK_N, num_warps, num_stages)

# Explicit config lists (autotune on a GPU + aot_specs): CONFIGS[arch][precision][kernel][BLOCK_D],
# entries (BLOCK_M, BLOCK_N, num_warps, num_stages); arch 90 (Hopper) or 80 (Ampere and the rest),
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
    # D = 256 runs the ieee dQ kernel (`_dq_precision`): every TF32 dQ tile tried spilled (8-312 bytes)
    "bwd_dq": {32: [(64, 32, 4, 1)], 64: [(64, 32, 4, 1)], 128: [(64, 32, 4, 1)], 256: [(16, 16, 8, 1)]},
}
# fp32 under "highest" (ieee FMA dots, operands in registers): small tiles, one config each, any arch.
_IEEE = {
    "fwd": {32: [(32, 32, 4, 1)], 64: [(32, 32, 4, 1)], 128: [(16, 16, 4, 1)], 256: [(16, 16, 4, 1)]},
    "bwd_dkdv": {32: [(32, 32, 4, 1)], 64: [(16, 16, 4, 1)], 128: [(16, 32, 4, 1)], 256: [(16, 16, 8, 1)]},
    # D = 64 dQ: 16 x 16 tiles left a 16-byte stack frame on sm_80 for the pixel-major views
    "bwd_dq": {32: [(32, 32, 4, 1)], 64: [(16, 32, 4, 1)], 128: [(16, 32, 4, 1)], 256: [(16, 16, 8, 1)]},
}


def _override(table: dict, changes: dict) -> dict:
    return {kind: {**per_d, **changes.get(kind, {})} for kind, per_d in table.items()}


# sm_80: mma.sync has no 64-row minimum; D = 256 takes the smaller tiles that stay spill-free there.
_SM80_BF16 = _override(_SM90_BF16, {"bwd_dkdv": {256: [(32, 32, 8, 2)]}})
_SM80_TF32 = _override(_SM90_TF32, {"bwd_dq": {128: [(32, 32, 4, 1)]}})
CONFIGS: dict = {
    90: {"bf16": _SM90_BF16, "tf32": _SM90_TF32, "ieee": _IEEE},
    80: {"bf16": _SM80_BF16, "tf32": _SM80_TF32, "ieee": _IEEE},
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
    # qk_scale = sm_scale * log2(e): scores in base 2.
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(N_Q, BLOCK_M)
    pid_m = pid % num_m_blocks
    bh = pid // num_m_blocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = O + b * stride_ob + h * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_DIM

    q_ptrs = q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    if not RELOAD_Q:
        if EVEN_M and EVEN_D:
            q = tl.load(q_ptrs)
        else:
            q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, N_KV, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < N_KV
        # K loaded transposed: [BLOCK_D, BLOCK_N].
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
            if EVEN_M and EVEN_D:
                q = tl.load(q_ptrs)
            else:
                q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        s = _dot(q, kt, PREC, UPCAST) * qk_scale
        if not EVEN_N:
            s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new

    o = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634
    o_ptrs = o_base + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    lse_ptrs = LSE + bh.to(tl.int64) * N_Q + offs_m
    if EVEN_M and EVEN_D:
        tl.store(o_ptrs, o.to(O.dtype.element_ty))
    else:
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
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
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(N_Q, BLOCK_M)
    pid_m = pid % num_m_blocks
    bh = pid // num_m_blocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask = mask_m[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
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
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N_KV, BLOCK_N)
    pid_n = pid % num_n_blocks
    bh = pid // num_n_blocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    row_base = bh.to(tl.int64) * N_Q

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N_KV
    mask_d = offs_d < HEAD_DIM
    mask_nd = mask_n[:, None] & mask_d[None, :]

    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if EVEN_N and EVEN_D:
        k = tl.load(k_ptrs)
    else:
        k = tl.load(k_ptrs, mask=mask_nd, other=0.0)
    if PART != 2:
        if EVEN_N and EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=mask_nd, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N_Q, BLOCK_M):
        offs_m = start_m + offs_m0
        mask_m = offs_m < N_Q
        q_ptrs = q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
        do_ptrs = do_base + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod
        if EVEN_M and EVEN_D:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
        else:
            q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        if EVEN_M:
            lse2 = tl.load(LSE + row_base + offs_m) * 1.4426950408889634
            delta = tl.load(DELTA + row_base + offs_m)
        else:
            lse2 = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
        # Transposed tiles [BLOCK_N, BLOCK_M]: rows are keys, columns queries.
        st = _dot(k, tl.trans(q), PREC, UPCAST) * qk_scale
        pt = tl.math.exp2(st - lse2[None, :])
        if not EVEN_M:
            pt = tl.where(mask_m[None, :], pt, 0.0)
        if PART != 1:
            dv += _dot(pt.to(do.dtype), do, PREC, UPCAST)
        if PART != 2:
            dpt = _dot(v, tl.trans(do), PREC, UPCAST)
            dst = pt * (dpt - delta[None, :])
            dk += _dot(dst.to(q.dtype), q, PREC, UPCAST)
    dk = dk * sm_scale

    dk_ptrs = DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    if PART != 2:
        if EVEN_N and EVEN_D:
            tl.store(dk_ptrs, dk.to(DK.dtype.element_ty))
        else:
            tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=mask_nd)
    if PART != 1:
        if EVEN_N and EVEN_D:
            tl.store(dv_ptrs, dv.to(DV.dtype.element_ty))
        else:
            tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask_nd)


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
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(N_Q, BLOCK_M)
    pid_m = pid % num_m_blocks
    bh = pid // num_m_blocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    row_base = bh.to(tl.int64) * N_Q

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_DIM
    mask_md = mask_m[:, None] & mask_d[None, :]

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod
    if EVEN_M and EVEN_D:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
    else:
        q = tl.load(q_ptrs, mask=mask_md, other=0.0)
        do = tl.load(do_ptrs, mask=mask_md, other=0.0)
    if EVEN_M:
        lse2 = tl.load(LSE + row_base + offs_m) * 1.4426950408889634
        delta = tl.load(DELTA + row_base + offs_m)
    else:
        lse2 = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N_KV, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < N_KV
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        # V loaded transposed: [BLOCK_D, BLOCK_N].
        vt_ptrs = v_base + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd
        if EVEN_N and EVEN_D:
            k = tl.load(k_ptrs)
            vt = tl.load(vt_ptrs)
        else:
            k = tl.load(k_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            vt = tl.load(vt_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if not EVEN_N:
            p = tl.where(mask_n[None, :], p, 0.0)
        dp = _dot(do, vt, PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PREC, UPCAST)
    dq = dq * sm_scale

    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd
    if EVEN_M and EVEN_D:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty))
    else:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mask_md)


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


def _dq_precision(prec: str, block_d: int) -> str:
    """The dQ kernel's dot precision: TF32 except at D = 256, where no TF32 tile was spill-free (the
    exact ieee kernel runs instead: slower, more accurate)."""
    return "ieee" if prec == "tf32" and block_d >= 256 else prec


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
    """90 on Hopper (compute capability 9.x and later), 80 elsewhere; 90 in the interpreter (so the
    tests run the sm_90 launch plan, the D = 256 dK/dV split included)."""
    if _interpret() or device.type != "cuda":
        return 90
    return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80


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
    key = (kind, consts["BLOCK_D"], dtype, consts["PREC"], consts.get("PART", 0), arch)
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
    sm_80's mma.sync runs 32-row tiles with both accumulators in one launch."""
    return (1, 2) if block_d >= 256 and dtype != torch.float32 and arch >= 90 else (0,)


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
    args, consts = _bwd_args("bwd_dq", q, k, v, do, lse, delta, (dq,), scale, _dq_precision(prec, _block_d(d)))
    _launch(_attn_bwd_dq_kernel, "bwd_dq", n_q, b * h, args, consts, n_q, n_kv, q.dtype, config, arch)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Traffic model and ahead-of-time specs
# ----------------------------------------------------------------------------------------------


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
        if kind == "bwd_dq":
            prec = _dq_precision(prec, _block_d(d))
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
    for arch in (90, 80):
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

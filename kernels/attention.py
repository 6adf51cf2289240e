"""Triton flash attention (non-causal) forward and backward for the U-Net's self-attention.

Layout: q [B, H, Nq, D], k and v [B, H, Nk, D] (the layout of ``F.scaled_dot_product_attention``),
any strides in the B, H and N dimensions (the launchers copy a tensor whose last-dim stride is not 1);
outputs are contiguous. Nq = Nk = N for self-attention; Nq != Nk works too. D <= 256.

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
fp32 inputs: every dot uses ``input_precision="ieee"`` (true fp32 FMA dots, no TF32 rounding), on
the GPU as in the interpreter: fp32 is the accuracy path (PyTorch's default keeps
``torch.backends.cuda.matmul.allow_tf32`` False too); bf16/fp16 is the speed path (tensor cores). The
fp32 configs are therefore small tiles (FMA dots hold their operands in registers).
The interpreter's ``tl.dot`` multiplies bf16 bit patterns as integers (triton 3.9), so under
TRITON_INTERPRET=1 bf16 operands are converted to fp32 before each dot (``UPCAST``); bf16 x bf16
products are exact in fp32, so this is the tensor-core arithmetic up to summation order.
FP fusion: launched with ``enable_fp_fusion=True`` explicitly (FMA contraction of the score scaling
and the online-softmax rescale); the effect is a few fp32 ulps, far below the stated tolerances
(tests: fp32 2e-5 absolute on unit-scale data vs a float64 reference; bf16/fp16 within 2x the error of
``F.scaled_dot_product_attention`` in the same dtype plus a floor).

Configs
-------
``FWD_CONFIGS[BLOCK_D]`` / ``BWD_CONFIGS[BLOCK_D]`` hold (BLOCK_M, BLOCK_N, num_warps, num_stages) for
16-bit inputs and ``FWD_CONFIGS_FP32`` / ``BWD_CONFIGS_FP32`` for fp32 inputs; these lists are what
``triton.autotune`` tries on a GPU (key: Nq, Nk, head dim, dtypes) and what ``aot_specs`` compiles for
sm_80 / sm_90. Every config compiles with no spills on both (checked with ``cuobjdump
--dump-resource-usage``: LOCAL = 0 *and* STACK = 0; ptxas puts spills in the stack frame, so a
nonzero STACK with LOCAL = 0 is still a spill) and shared memory within the limit. D = 256 needs
32-row query tiles in the forward (64-row tiles spill on sm_90, where the [64, 256] fp32 accumulator
of the wgmma path takes 128+ registers per thread), 8 warps, and re-reads the q tile every key block
(``RELOAD_Q``) instead of keeping it live across the loop. Under TRITON_INTERPRET=1 the fixed
``INTERPRET_CONFIG`` is used; every launcher also takes ``config=(BLOCK_M, BLOCK_N, warps, stages)``
to force one.

Modelled HBM traffic (``modelled_hbm_bytes``): T = one [B, H, N, D] tensor, A = one [B, H, N, N]
matrix in the input dtype, R = one fp32 [B, H, N] vector; compulsory traffic (a tile re-read by
several programs of one head is counted once: it comes from L2).

    fused     forward  q, k, v, o, lse                                          4T + R
              backward preprocess dO, O, delta; dK/dV q, k, v, dO, lse, delta,
                       dk, dv; dQ q, k, v, dO, lse, delta, dq                  13T + 5R
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

from .device_guard import on_tensor_device

__all__ = [
    "FWD_CONFIGS",
    "BWD_CONFIGS",
    "FWD_CONFIGS_FP32",
    "BWD_CONFIGS_FP32",
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

# Explicit config lists (autotune on a GPU + aot_specs), keyed by BLOCK_D. 16-bit inputs.
FWD_CONFIGS: dict[int, list[Config]] = {
    32: [(128, 64, 4, 3), (64, 64, 4, 3)],
    64: [(128, 64, 8, 3), (64, 64, 4, 3)],
    128: [(64, 64, 8, 3), (64, 32, 4, 3)],
    256: [(32, 64, 8, 2), (32, 32, 8, 2)],
}
# Backward: BLOCK_M = query tile, BLOCK_N = key tile, in both the dK/dV and the dQ kernel.
BWD_CONFIGS: dict[int, list[Config]] = {
    32: [(64, 64, 4, 2), (32, 64, 4, 2)],
    64: [(32, 64, 4, 2), (32, 32, 4, 2)],
    128: [(32, 64, 8, 2), (32, 32, 4, 2)],
    256: [(32, 32, 8, 2), (16, 32, 8, 1)],
}
# fp32 inputs (ieee FMA dots, operands in registers): small tiles, one config each.
FWD_CONFIGS_FP32: dict[int, list[Config]] = {
    32: [(32, 32, 4, 1)],
    64: [(32, 32, 4, 1)],
    128: [(16, 16, 4, 1)],
    256: [(16, 16, 4, 1)],
}
BWD_CONFIGS_FP32: dict[int, list[Config]] = {
    32: [(32, 32, 4, 1)],
    64: [(16, 16, 4, 1)],
    128: [(16, 32, 4, 1)],
    256: [(16, 16, 8, 1)],
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
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
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

    q_ptrs = q_base + offs_m[:, None] * stride_qn + offs_d[None, :]
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
        kt_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None]
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
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
    o_ptrs = o_base + offs_m[:, None] * stride_on + offs_d[None, :]
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
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
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
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(DELTA + bh.to(tl.int64) * N_Q + offs_m, delta, mask=mask_m)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, N_Q, N_KV,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
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

    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    if EVEN_N and EVEN_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=mask_nd, other=0.0)
        v = tl.load(v_ptrs, mask=mask_nd, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N_Q, BLOCK_M):
        offs_m = start_m + offs_m0
        mask_m = offs_m < N_Q
        q_ptrs = q_base + offs_m[:, None] * stride_qn + offs_d[None, :]
        do_ptrs = do_base + offs_m[:, None] * stride_don + offs_d[None, :]
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
        dv += _dot(pt.to(do.dtype), do, PREC, UPCAST)
        dpt = _dot(v, tl.trans(do), PREC, UPCAST)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, PREC, UPCAST)
    dk = dk * sm_scale

    dk_ptrs = DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :]
    if EVEN_N and EVEN_D:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty))
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty))
    else:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=mask_nd)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
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

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :]
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
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
        # V loaded transposed: [BLOCK_D, BLOCK_N].
        vt_ptrs = v_base + offs_n[None, :] * stride_vn + offs_d[:, None]
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

    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :]
    if EVEN_M and EVEN_D:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty))
    else:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mask_md)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TUNED: dict[Any, Any] = {}


def _block_d(head_dim: int) -> int:
    return max(32, triton.next_power_of_2(head_dim))


def _precision(dtype: torch.dtype) -> str:
    """Dot input precision: "ieee" (true fp32 for fp32 inputs; ignored for bf16/fp16 tensor-core dots)."""
    return "ieee"


def _reload_q(block_d: int) -> bool:
    """Forward: re-load the q tile every key block when BLOCK_D = 256 (register pressure)."""
    return block_d >= 256


def _configs(kind: str, block_d: int, dtype: torch.dtype) -> list[Config]:
    fp32 = dtype == torch.float32
    if kind == "fwd":
        return (FWD_CONFIGS_FP32 if fp32 else FWD_CONFIGS)[block_d]
    return (BWD_CONFIGS_FP32 if fp32 else BWD_CONFIGS)[block_d]


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


def _launch(kernel, name: str, rows_of: str, n_rows: int, bh: int, args: list, consts: dict,
            n_q: int, n_kv: int, dtype: torch.dtype, config: Optional[Config]) -> None:
    """Launch `kernel` with a fixed config (interpreter / forced) or through triton.autotune.

    The grid is 1-D: cdiv(n_rows, BLOCK) * (batch*heads), BLOCK = BLOCK_M when the program owns query
    rows (forward, dQ) and BLOCK_N when it owns key rows (dK/dV); the kernel recomputes the block count.
    """
    if config is None and _interpret():
        config = INTERPRET_CONFIG
    blk_name = "BLOCK_M" if rows_of == "M" else "BLOCK_N"
    if config is not None:
        bm, bn, warps, stages = config
        blk = bm if rows_of == "M" else bn
        kernel[(triton.cdiv(n_rows, blk) * bh,)](
            *args, **consts, BLOCK_M=bm, BLOCK_N=bn, EVEN_M=n_q % bm == 0, EVEN_N=n_kv % bn == 0,
            num_warps=warps, num_stages=stages, enable_fp_fusion=_FP_FUSION)
        return
    key = (name, consts["BLOCK_D"], dtype)
    tuned = _TUNED.get(key)
    if tuned is None:
        kind = "fwd" if name == "fwd" else "bwd"
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                   for bm, bn, w, s in _configs(kind, consts["BLOCK_D"], dtype)]
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
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(t, name, 4)
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} dtype must be one of float32, bfloat16, float16, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, h, n_q, d = q.shape
    if tuple(k.shape) != tuple(v.shape) or k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError("k and v must have shape [B, heads, Nk, head_dim] matching q "
                         f"{tuple(q.shape)}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not 1 <= d <= _MAX_HEAD_DIM:
        raise ValueError(f"q head_dim (last dim) must be in [1, {_MAX_HEAD_DIM}], got {d}")
    n_kv = k.shape[2]
    if n_kv == 0 and b * h * n_q > 0:
        raise ValueError("k must have at least one key (k.shape[2] >= 1)")
    return b, h, n_q, n_kv, d


def _check_scale(sm_scale: Any) -> float:
    try:
        s = float(sm_scale)
    except (TypeError, ValueError):
        raise ValueError(f"sm_scale must be a finite float, got {sm_scale!r}") from None
    if not math.isfinite(s):
        raise ValueError(f"sm_scale must be a finite float, got {sm_scale!r}")
    return s


def _rows(t: torch.Tensor) -> torch.Tensor:
    """Last-dim stride 1 (copy otherwise); other strides are passed to the kernels as they are."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> list[int]:
    return [t.stride(0), t.stride(1), t.stride(2)]


@on_tensor_device
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float,
                      config: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention forward: o = softmax(sm_scale * q k^T) v, non-causal.

    q [B, H, Nq, D], k and v [B, H, Nk, D], one dtype (float32, bfloat16, float16), one device
    (CUDA, or CPU under TRITON_INTERPRET=1), D <= 256. Returns (o, lse): o [B, H, Nq, D] contiguous in
    the input dtype, lse float32 [B, H, Nq], the natural-log log-sum-exp of each row of scaled scores.
    `config` = (BLOCK_M, BLOCK_N, num_warps, num_stages) forces a tile config (default: autotune on a
    GPU over FWD_CONFIGS / FWD_CONFIGS_FP32, INTERPRET_CONFIG in the interpreter).
    """
    b, h, n_q, n_kv, d = _check_qkv(q, k, v)
    scale = _check_scale(sm_scale)
    config = _check_config(config)
    q, k, v = _rows(q), _rows(k), _rows(v)
    o = torch.empty((b, h, n_q, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, n_q), dtype=torch.float32, device=q.device)
    if b * h * n_q == 0:
        return o, lse
    block_d = _block_d(d)
    args = [q, k, v, o, lse, scale * _LOG2E, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            h, n_q, n_kv]
    consts = dict(HEAD_DIM=d, BLOCK_D=block_d, EVEN_D=d == block_d, PREC=_precision(q.dtype),
                  UPCAST=_interpret() and q.dtype == torch.bfloat16, RELOAD_Q=_reload_q(block_d))
    _launch(_attn_fwd_kernel, "fwd", "M", n_q, b * h, args, consts, n_q, n_kv, q.dtype, config)
    return o, lse


@on_tensor_device
def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       o: torch.Tensor, lse: torch.Tensor, sm_scale: float,
                       config: Optional[Sequence[int]] = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash attention backward: (dq, dk, dv) from dO, the inputs, o and lse of `attention_forward`.

    do and o [B, H, Nq, D] in q's dtype; lse float32 [B, H, Nq]. Three launches: delta = rowsum(dO * O)
    (fp32), then the dK/dV kernel and the dQ kernel (P recomputed in each; no atomics, deterministic).
    Returns contiguous tensors in the input dtype. `config` forces (BLOCK_M, BLOCK_N, warps, stages)
    for both main kernels.
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
    q, k, v, o, do = _rows(q), _rows(k), _rows(v), _rows(o), _rows(do)
    lse = lse.contiguous()
    dq = torch.empty((b, h, n_q, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, h, n_kv, d), dtype=q.dtype, device=q.device)
    dv = torch.empty((b, h, n_kv, d), dtype=q.dtype, device=q.device)
    if b * h == 0 or n_kv == 0:
        return dq, dk, dv
    if n_q == 0:
        return dq, dk.zero_(), dv.zero_()
    block_d = _block_d(d)
    delta = torch.empty((b, h, n_q), dtype=torch.float32, device=q.device)
    _attn_bwd_preprocess_kernel[(triton.cdiv(n_q, preprocess_block_m(block_d)) * b * h,)](
        o, do, delta, *_strides(o), *_strides(do), h, n_q,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=preprocess_block_m(block_d), num_warps=_PREPROCESS_WARPS,
        enable_fp_fusion=_FP_FUSION)
    consts = dict(HEAD_DIM=d, BLOCK_D=block_d, EVEN_D=d == block_d, PREC=_precision(q.dtype),
                  UPCAST=_interpret() and q.dtype == torch.bfloat16)
    common = [scale * _LOG2E, scale, *_strides(q), *_strides(k), *_strides(v), *_strides(do)]
    _launch(_attn_bwd_dkdv_kernel, "bwd_dkdv", "N", n_kv, b * h,
            [q, k, v, do, lse, delta, dk, dv, *common, *_strides(dk), *_strides(dv), h, n_q, n_kv],
            consts, n_q, n_kv, q.dtype, config)
    _launch(_attn_bwd_dq_kernel, "bwd_dq", "M", n_q, b * h,
            [q, k, v, do, lse, delta, dq, *common, *_strides(dq), h, n_q, n_kv],
            consts, n_q, n_kv, q.dtype, config)
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
AOT_HEAD_DIMS = (32, 64, 128, 256)
_AOT_FP32_HEAD_DIMS = AOT_HEAD_DIMS


def _strides_sig(prefix: str) -> dict:
    return {f"stride_{prefix}{c}": "i32" for c in "bhn"}


def aot_specs() -> list[dict]:
    """One dict per kernel per config per head_dim (32, 64, 128, 256), bf16 and fp32.

    Kernels: attn_fwd, attn_bwd_preprocess, attn_bwd_dkdv, attn_bwd_dq: 44 specs. Compiled with
    EVEN_M = EVEN_N = False (the masked variant, which needs the most registers); EVEN_D = True (D is a
    power of two). The unmasked EVEN_M = EVEN_N = True variants of the same configs were also compiled
    for sm_80 / sm_90 when the lists were chosen (no spills, LOCAL = STACK = 0) but are left out here to
    keep the report's compile time down; fp16 uses the bf16 configs (same tile sizes and layouts).
    hbm_bytes_fused / hbm_bytes_unfused: forward + backward totals of ``modelled_hbm_bytes`` at
    B=128, heads=1, N=256, D=256 (bf16; fp32 rows use 4-byte elements), the same on every row.
    """
    b, h, n, d_model = AOT_SHAPE
    specs = []
    for dt, head_dims in (("bf16", AOT_HEAD_DIMS), ("fp32", _AOT_FP32_HEAD_DIMS)):
        torch_dt = torch.bfloat16 if dt == "bf16" else torch.float32
        elem = 2 if dt == "bf16" else 4
        model = modelled_hbm_bytes(b, h, n, d_model, elem)
        p = "*" + dt
        ints = {"H": "i32", "N_Q": "i32", "N_KV": "i32"}
        for d in head_dims:
            block_d = _block_d(d)
            base = dict(HEAD_DIM=d, BLOCK_D=block_d)
            flags = dict(EVEN_M=False, EVEN_N=False, EVEN_D=d == block_d,
                         PREC="ieee", UPCAST=False)
            kernels = []
            for bm, bn, w, st in _configs("fwd", block_d, torch_dt):
                sig = {"Q": p, "K": p, "V": p, "O": p, "LSE": "*fp32", "qk_scale": "fp32",
                       **_strides_sig("q"), **_strides_sig("k"), **_strides_sig("v"), **_strides_sig("o"),
                       **ints}
                kernels.append(("attn_fwd", _attn_fwd_kernel, sig,
                                dict(base, BLOCK_M=bm, BLOCK_N=bn, **flags, RELOAD_Q=_reload_q(block_d)),
                                w, st))
            kernels.append(("attn_bwd_preprocess", _attn_bwd_preprocess_kernel,
                            {"O": p, "DO": p, "DELTA": "*fp32", **_strides_sig("o"), **_strides_sig("do"),
                             "H": "i32", "N_Q": "i32"},
                            dict(base, BLOCK_M=preprocess_block_m(block_d)), _PREPROCESS_WARPS, 1))
            for bm, bn, w, st in _configs("bwd", block_d, torch_dt):
                common = {"qk_scale": "fp32", "sm_scale": "fp32", **_strides_sig("q"), **_strides_sig("k"),
                          **_strides_sig("v"), **_strides_sig("do")}
                consts = dict(base, BLOCK_M=bm, BLOCK_N=bn, **flags)
                kernels.append(("attn_bwd_dkdv", _attn_bwd_dkdv_kernel,
                                {"Q": p, "K": p, "V": p, "DO": p, "LSE": "*fp32", "DELTA": "*fp32", "DK": p,
                                 "DV": p, **common, **_strides_sig("dk"), **_strides_sig("dv"), **ints},
                                consts, w, st))
                kernels.append(("attn_bwd_dq", _attn_bwd_dq_kernel,
                                {"Q": p, "K": p, "V": p, "DO": p, "LSE": "*fp32", "DELTA": "*fp32", "DQ": p,
                                 **common, **_strides_sig("dq"), **ints},
                                consts, w, st))
            for name, fn, sig, consts, w, st in kernels:
                signature = dict(sig, **{key: "constexpr" for key in consts})
                cfg = ",".join(f"{key}={consts[key]}" for key in ("BLOCK_M", "BLOCK_N") if key in consts)
                specs.append({
                    "kernel": name,
                    "config": f"D={d},{cfg},warps={w},stages={st},{dt}",
                    "fn": fn,
                    "signature": signature,
                    "constexprs": consts,
                    "num_warps": w,
                    "num_stages": st,
                    "options": {"enable_fp_fusion": _FP_FUSION},
                    "hbm_bytes_fused": model["fused"],
                    "hbm_bytes_unfused": model["unfused"],
                })
    return specs

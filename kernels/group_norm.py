"""Triton forward and backward of ``group_norm_silu``: GroupNorm (+ additive input) + affine + FiLM + SiLU.

Math (x: [N, C, *spatial], flattened to [N, C, HW]; G groups of CPG = C / G channels; per (n, g) the
group is x[n, g*CPG:(g+1)*CPG, :], M = CPG * HW elements; memory layout NCHW or channels-last, below):

    u      = x + add[n, c]                               (add omitted: u = x)
    mean   = mean(u over the group),  var = mean((u - mean)^2),  rstd = 1 / sqrt(var + eps)
    y_hat  = (u - mean) * rstd
    A[n,c] = w[c] * (1 + scale[n,c])                     (w = 1, b = 0, scale = 0, shift = 0 when None)
    B[n,c] = b[c] * (1 + scale[n,c]) + shift[n,c]
    z      = A * y_hat + B        ( = (y_hat*w + b) * (1 + scale) + shift )
    y      = silu(z) = z * sigmoid(z)   if silu else z

add, scale and shift ([N, C]) are read with a row stride VS (unit column stride): the U-Net passes
column slices of its one stacked time projection, which the launchers hand over in place instead of
copying (`_vectors`; a mix of strides falls back to contiguous copies). Their gradients are
contiguous [N, C].

Statistics are always fp32 whatever the input dtype. They are computed by a chunked merge (Chan et
al.): each tile of the group gets its own mean (one tile reduction) and the squared deviations from
that tile mean are accumulated per lane; tiles are merged with the exact pairwise update
``M2 += M2_tile + delta^2 * n_a n_b / (n_a + n_b)`` (single-tile kernels: exact two-pass in
registers; split path: the same merge over slice partials). Never E[u^2] - E[u]^2. The forward returns
mean and rstd (fp32 [N, G]) and saves nothing else.

Backward (dy given; everything recomputed from x, mean, rstd):

    g          = dy * silu'(z),  silu'(z) = s (1 + z (1 - s)), s = sigmoid(z)     (g = dy without silu)
    per (n,c):  Sg = sum_hw g,   Sgy = sum_hw g * y_hat
    dshift     = Sg
    dscale     = w * Sgy + b * Sg                        ( = sum_hw g * (w y_hat + b) )
    dweight    = sum_n (1 + scale) * Sgy,   dbias = sum_n (1 + scale) * Sg
    dy_hat     = g * A
    c1 = mean_group(dy_hat) = sum_c A Sg / M,   c2 = mean_group(dy_hat * y_hat) = sum_c A Sgy / M
    dx         = rstd * (dy_hat - c1 - y_hat * c2)
    dadd[n,c]  = sum_hw dx

dweight/dbias: per-(n, c) fp32 partials written by the program that owns (n, group), then summed over
the batch in torch (deterministic, no atomics). No kernel uses atomics: every output element has
exactly one writer, so results are bitwise reproducible for a fixed config and split.

Memory layout (NCHW and channels-last)
--------------------------------------
Every kernel reads x / dy and writes y / dx at element offset n*C*HW + c*stride_c + hw*stride_hw:
NCHW (contiguous) stride_c = HW, stride_hw = 1; channels-last (NHWC, e.g. torch.channels_last: any x
whose movedim(1, -1) is contiguous) stride_c = 1, stride_hw = C. The launchers pass both layouts in
place (no copy; outputs come back in x's layout, dy is brought to x's layout only when it differs);
other strides are copied to NCHW once. The math, the fp32 Chan-merge statistics, the tile loops and
the one-writer-per-element rule are the same for both; only the addressing and the tile shape change.

Choice: a ``CHANNELS_LAST: tl.constexpr`` per kernel, not runtime strides. With the unit stride a
literal, Triton's axis analysis knows which tile axis is contiguous and its coalescing pass makes that
axis the fastest-varying one of the thread layout and vectorises along it (HW in NCHW, C in NHWC).
Runtime stride arguments would get there too in triton 3.9 (an int argument equal to 1 is specialised
into a constant), but only through that launch-time rule (a version or a launch path without it goes
scalar, silently), the host needs the layout anyway to pick the tile shape, and the strides follow
from C and HW: the flag carries all the information. NCHW compiles to the program it was before the
flag (the literal-1 multiplies fold away; the sm_90 PTX of the NCHW aot_specs at BLOCK=1024 and of the
single-tile kernels was compared instruction for instruction: identical, debug info aside).

Coalescing in NHWC: a group is CPG adjacent elements per pixel (4 or 8 in the DDPM U-Net: 8 or 16
bytes in bf16), pixels C elements apart. So the looped tiles give the channel axis the budget first
(BLOCK_C = min(next_pow2(CPG), BLOCK), BLOCK_HW = BLOCK / BLOCK_C; NCHW gives HW the budget) and each
thread reads one group's run of channels of a pixel. CPG is a runtime int and, not being a multiple of
16, Triton would take it as divisible by 1 (scalar 2-byte accesses: the group base g*CPG and the channel
mask are not known aligned); the ``ALIGN`` constexpr (largest power of two <= 8 dividing CPG, 1 in
NCHW) restates CPG as (CPG // ALIGN) * ALIGN so both come in runs of ALIGN: with CPG = 4 in bf16 every
x/dy load and y/dx store is one 8-byte vector per pixel (ld.global.v2.b32 in sm_90 PTX; NCHW:
16-byte v4). A warp then covers 32 pixels x 8 bytes of one group: sectors are shared with the programs
of the neighbouring groups of the same pixels (adjacent program ids, running at the same time), so
DRAM traffic stays one pass per tensor pass through L2, but the L1/L2 transaction count is higher than
in NCHW. Whether that beats the NCHW copies around cuDNN's NHWC convolutions is what
benchmarks/gpu_check.py (part "layout") measures; the modelled HBM bytes below are the same for both
layouts (same passes over the same tensors).

Kernels and launch plan
-----------------------
A group is walked as a [CPG, HW] matrix in tiles [BLOCK_C, BLOCK_HW] (BLOCK_HW = min(next_pow2(HW),
BLOCK), BLOCK_C = min(BLOCK // BLOCK_HW, next_pow2(CPG))), so per-channel parameters are per-row
vectors and per-channel sums are row reductions; any CPG and any HW work (HW = 1 uses [BLOCK_C, 1]
tiles), with loops over channel tiles and HW tiles: no single-block assumption.

* Single-tile path (next_pow2(CPG) * next_pow2(HW) <= SINGLE_MAX = 4096, e.g. every GroupNorm of
  the DDPM CIFAR-10 U-Net): one program per (n, group) holds the whole group in registers.
  ``_gn_fwd_single_kernel``: one read of x, exact two-pass statistics in registers, one write of y.
  ``_gn_bwd_single_kernel``: one read of x and dy, one write of dx. num_warps from the tile size.
* Looped path (S = 1): one program per (n, group) walks the group tile by tile.
  forward  ``_gn_fwd_kernel[FUSED_STATS=True]``: pass 1 statistics, pass 2 normalise + write y.
  backward ``_gn_bwd_dx_kernel[FUSED=True]``: pass 1 per-channel sums, pass 2 dx and dadd.
* Split path (S > 1) for big groups and few programs (e.g. 1x128x256x256, 32 groups: only 32 programs
  of 262144 elements for 132 SMs): the HW axis of each group is cut into S slices of HW_PER_SPLIT
  (a multiple of every config's BLOCK_HW), grid (N*G, S).
  forward  ``_gn_stats_kernel`` writes per-slice (mean, M2) partials; ``_gn_fwd_kernel[FUSED_STATS=False]``
  merges the S partials of its group (Chan) and normalises its slice.
  backward ``_gn_bwd_reduce_kernel`` writes per-(n, c, slice) Sg and Sgy; ``_gn_bwd_dx_kernel[FUSED=False]``
  sums them, the slice-0 program writes the per-channel outputs, every program writes dx of its slice
  and its dadd partial (summed over slices in torch).
  S is chosen so that N*G*S reaches ~4 programs per SM when N*G is below 2 per SM (launcher ``split=``
  forces it); 1x128x256x256 on 132 SMs: S = 16, 512 programs of 4 x 4096 elements. Only HW is split:
  a huge group made of many channels with a tiny HW (e.g. groups=1, C=4096, 4x4) stays one program.

Configs: ``CONFIGS`` (BLOCK, num_warps) is the explicit list used by ``aot_specs`` and by
``triton.autotune`` of the looped/split kernels on a GPU (key: CPG, HW, S, CHANNELS_LAST and dtypes; BLOCK_C/BLOCK_HW
follow from BLOCK by ``triton.heuristics``). Autotuning picks the fastest config once per key and
process; results are bitwise reproducible for a given config. Under TRITON_INTERPRET=1 one fixed small
config is used (``INTERPRET_BLOCK``), and every launcher takes ``block=`` to force a BLOCK and the
looped kernels (tests use it to make a group span many tiles cheaply).

FP fusion: kernels are launched (and AOT-compiled, spec "options") with ``enable_fp_fusion=True``
(FMA contraction, explicit, independent of TRITON_DEFAULT_FP_FUSION). The forward computes
z = (u - mean) * (A rstd) + B: the subtraction comes first (exact for near-constant groups, where rstd
is up to 1/sqrt(eps)), then one FMA. Contraction changes results by a few fp32 ulps; fp32 tolerance:
1e-5 relative to the largest magnitude of each output (tests, against float64). rstd uses IEEE sqrt
and division (sqrt_rn, div_rn), not the approximate rsqrt.

The traffic model (``modelled_hbm_bytes``: 8 passes over the activation fused vs 24 eager, forward +
backward) and the AOT spec lists (``aot_specs``) live beside this file in ``kernels/group_norm_specs.py``;
their names are also reachable here (forwarded on first use).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from .checks import check_group_norm
from .device_guard import on_tensor_device

__all__ = [
    "CONFIGS",
    "INTERPRET_BLOCK",
    "group_norm_forward",
    "group_norm_backward",
]

# (BLOCK elements per tile, num_warps): the explicit config list (aot_specs + autotune on a GPU).
# 4 or 8 elements per thread: at 16 per thread the backward's two per-lane accumulators plus the
# recomputed tile need 115-154 registers and sm_80 gets a stack frame (checked with cuobjdump).
CONFIGS: list[tuple[int, int]] = [(512, 4), (1024, 8), (2048, 8), (4096, 16)]
_MAX_BLOCK = max(b for b, _ in CONFIGS)
# Single-tile kernels (whole group in registers, one read): tile = next_pow2(CPG) x next_pow2(HW) up to
# SINGLE_MAX elements, num_warps from `_single_tile` (4 elements per thread up to 2048-element tiles, at
# 8 per thread the 8x256 backward needs 111-115 registers, at 4 about 64), no autotune needed.
SINGLE_MAX = 4096
# The fixed config used under TRITON_INTERPRET=1 (interpreter programs run sequentially on the CPU).
INTERPRET_BLOCK = 256
_INTERPRET_WARPS = 4
_FP_FUSION = True


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------- helpers
@triton.jit
def _merge(cnt, mean, m2, n_b, mean_b, m2_b):
    """Chan's pairwise merge of (count, mean, M2) with (n_b, mean_b, m2_b); all fp32 scalars."""
    tot = cnt + n_b
    delta = mean_b - mean
    frac = n_b / tot
    mean = mean + delta * frac
    m2 = m2 + m2_b + delta * delta * cnt * frac
    return tot, mean, m2


@triton.jit
def _known_multiple(v, ALIGN: tl.constexpr):
    """v itself (the launcher guarantees ALIGN | v), written so Triton's axis analysis knows ALIGN divides
    it: with CPG a multiple of ALIGN, a channels-last group's base offset and its channel mask come in
    runs of ALIGN, so loads and stores along C vectorise (an int argument not divisible by 16 is
    otherwise taken as divisible by 1: scalar 2-byte accesses)."""
    return (v // ALIGN) * ALIGN


@triton.jit
def _group_base(n, g, C, HW, CPG, CHANNELS_LAST: tl.constexpr):
    """(offset of element (n, c=g*CPG, hw=0), channel stride, spatial stride) of group (n, g).

    NCHW: stride_c = HW, stride_hw = 1; channels-last (NHWC): stride_c = 1, stride_hw = C. The unit
    stride is a literal, so Triton's axis analysis sees which tile axis is contiguous and vectorises
    and coalesces along it (HW in NCHW, C in NHWC)."""
    if CHANNELS_LAST:
        return n.to(tl.int64) * C * HW + g * CPG, 1, C
    else:
        return n.to(tl.int64) * C * HW + g.to(tl.int64) * CPG * HW, HW, 1


@triton.jit
def _slice_stats(X, ADD, x_base, add_base, CPG, sc, shw, hw_lo, hw_hi,
                 HAS_ADD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """(count, mean, M2) in fp32 of u = x + add over channels [0, CPG) x hw [hw_lo, hw_hi) of a group."""
    cnt = tl.zeros([], dtype=tl.float32)
    mean = tl.zeros([], dtype=tl.float32)
    m2b = tl.zeros([], dtype=tl.float32)
    m2acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    offs_c = tl.arange(0, BLOCK_C)
    offs_h = tl.arange(0, BLOCK_HW)
    for c0 in range(0, CPG, BLOCK_C):
        c = c0 + offs_c
        cmask = c < CPG
        nc = tl.minimum(CPG - c0, BLOCK_C)
        if HAS_ADD:
            a = tl.load(ADD + add_base + c, mask=cmask, other=0.0).to(tl.float32)
        for h0 in range(hw_lo, hw_hi, BLOCK_HW):
            h = h0 + offs_h
            mask = cmask[:, None] & (h < hw_hi)[None, :]
            u = tl.load(X + x_base + c[:, None] * sc + h[None, :] * shw, mask=mask, other=0.0).to(tl.float32)
            if HAS_ADD:
                u = tl.where(mask, u + a[:, None], 0.0)
            n_t = (nc * tl.minimum(hw_hi - h0, BLOCK_HW)).to(tl.float32)
            t_mean = tl.sum(tl.sum(u, axis=1), axis=0) / n_t
            d = tl.where(mask, u - t_mean, 0.0)
            m2acc += d * d
            cnt, mean, m2b = _merge(cnt, mean, m2b, n_t, t_mean, 0.0)
    m2 = tl.sum(tl.sum(m2acc, axis=1), axis=0) + m2b
    return cnt, mean, m2


@triton.jit
def _channel_coefs(W, B, SCALE, SHIFT, c, cmask, nc_base,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
                   HAS_SHIFT: tl.constexpr):
    """Per-channel fp32 vectors (w, b, 1 + scale, A = w (1 + scale), Bc = b (1 + scale) + shift)."""
    if HAS_W:
        w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = tl.full(c.shape, 1.0, tl.float32)
    if HAS_B:
        b = tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros(c.shape, tl.float32)
    if HAS_SCALE:
        s1 = 1.0 + tl.load(SCALE + nc_base + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        s1 = tl.full(c.shape, 1.0, tl.float32)
    A = w * s1
    Bc = b * s1
    if HAS_SHIFT:
        Bc = Bc + tl.load(SHIFT + nc_base + c, mask=cmask, other=0.0).to(tl.float32)
    return w, b, s1, A, Bc


@triton.jit
def _grad_tile(DY, X, x_base, c, cmask, h, hmask, sc, shw, a, mean, rstd, A, Bc,
               HAS_ADD: tl.constexpr, SILU: tl.constexpr):
    """Recompute y_hat = (x + a - mean) rstd and g = dy * silu'(z) on one [BLOCK_C, BLOCK_HW] tile
    (both 0 outside the mask; `a` is the per-channel add vector, ignored unless HAS_ADD)."""
    mask = cmask[:, None] & hmask[None, :]
    offs = x_base + c[:, None] * sc + h[None, :] * shw
    u = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        u = u + a[:, None]
    g = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    y_hat = tl.where(mask, (u - mean) * rstd, 0.0)
    if SILU:
        z = A[:, None] * y_hat + Bc[:, None]
        sig = tl.sigmoid(z)
        g = g * (sig * (1.0 + z * (1.0 - sig)))
    return mask, offs, y_hat, g


# ------------------------------------------------------------------------------------------ forward
@triton.jit
def _gn_stats_kernel(X, ADD, PMEAN, PM2, C, VS, HW, CPG, G, HW_PER_SPLIT, S,
                     HAS_ADD: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK: tl.constexpr):
    """Split path, forward pass 1: (mean, M2) of slice s of group (n, g) -> PMEAN/PM2[(n*G+g)*S + s]."""
    ng = tl.program_id(0)
    s = tl.program_id(1)
    n = ng // G
    g = ng % G
    CPG = _known_multiple(CPG, ALIGN)
    x_base, sc, shw = _group_base(n, g, C, HW, CPG, CHANNELS_LAST)
    add_base = n * VS + g * CPG  # add/scale/shift rows: stride VS (views of a wider projection)
    hw_lo = s * HW_PER_SPLIT
    hw_hi = tl.minimum(hw_lo + HW_PER_SPLIT, HW)
    cnt, mean, m2 = _slice_stats(X, ADD, x_base, add_base, CPG, sc, shw, hw_lo, hw_hi,
                                 HAS_ADD, BLOCK_C, BLOCK_HW)
    tl.store(PMEAN + ng * S + s, mean)
    tl.store(PM2 + ng * S + s, m2)


@triton.jit
def _gn_fwd_kernel(X, ADD, W, B, SCALE, SHIFT, Y, MEAN, RSTD, PMEAN, PM2,
                   C, VS, HW, CPG, G, HW_PER_SPLIT, S, eps,
                   HAS_ADD: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
                   FUSED_STATS: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
                   BLOCK: tl.constexpr):
    """Statistics (in-program, or merged from S slice partials) then y = act(u * alpha + beta) on slice s."""
    ng = tl.program_id(0)
    s = tl.program_id(1)
    n = ng // G
    g = ng % G
    CPG = _known_multiple(CPG, ALIGN)
    x_base, sc, shw = _group_base(n, g, C, HW, CPG, CHANNELS_LAST)
    v_base = n * VS + g * CPG  # add/scale/shift rows: stride VS (views of a wider projection)
    if FUSED_STATS:
        cnt, mean, m2 = _slice_stats(X, ADD, x_base, v_base, CPG, sc, shw, 0, HW,
                                     HAS_ADD, BLOCK_C, BLOCK_HW)
    else:
        cnt = tl.zeros([], dtype=tl.float32)
        mean = tl.zeros([], dtype=tl.float32)
        m2 = tl.zeros([], dtype=tl.float32)
        for j in range(0, S):
            lo = j * HW_PER_SPLIT
            n_j = (CPG * (tl.minimum(lo + HW_PER_SPLIT, HW) - lo)).to(tl.float32)
            mean_j = tl.load(PMEAN + ng * S + j)
            m2_j = tl.load(PM2 + ng * S + j)
            cnt, mean, m2 = _merge(cnt, mean, m2, n_j, mean_j, m2_j)
    var = tl.maximum(m2 / cnt, 0.0)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    if s == 0:
        tl.store(MEAN + ng, mean)
        tl.store(RSTD + ng, rstd)

    hw_lo = s * HW_PER_SPLIT
    hw_hi = tl.minimum(hw_lo + HW_PER_SPLIT, HW)
    offs_c = tl.arange(0, BLOCK_C)
    offs_h = tl.arange(0, BLOCK_HW)
    for c0 in range(0, CPG, BLOCK_C):
        c = g * CPG + c0 + offs_c
        cmask = (c0 + offs_c) < CPG
        w, b, s1, A, Bc = _channel_coefs(W, B, SCALE, SHIFT, c, cmask, n * VS,
                                         HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
        alpha = A * rstd
        # z = (u - mean) * alpha + Bc: subtract first (exact for near-constant groups, where rstd is
        # large; folding mean into the FMA would amplify rounding by rstd), then one FMA
        if HAS_ADD:
            a = tl.load(ADD + v_base + c0 + offs_c, mask=cmask, other=0.0).to(tl.float32)
        for h0 in range(hw_lo, hw_hi, BLOCK_HW):
            h = h0 + offs_h
            mask = cmask[:, None] & (h < hw_hi)[None, :]
            offs = x_base + (c0 + offs_c)[:, None] * sc + h[None, :] * shw
            xv = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_ADD:
                xv = xv + a[:, None]
            z = (xv - mean) * alpha[:, None] + Bc[:, None]
            if SILU:
                z = z * tl.sigmoid(z)
            tl.store(Y + offs, z.to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------- backward
@triton.jit
def _gn_bwd_reduce_kernel(DY, X, ADD, W, B, SCALE, SHIFT, MEAN, RSTD, PSG, PSGY,
                          C, VS, HW, CPG, G, HW_PER_SPLIT, S,
                          HAS_ADD: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                          HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
                          CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_HW: tl.constexpr, BLOCK: tl.constexpr):
    """Split path, backward pass 1: Sg, Sgy of slice s per channel -> PSG/PSGY[(n*C + c)*S + s] (fp32)."""
    ng = tl.program_id(0)
    s = tl.program_id(1)
    n = ng // G
    g = ng % G
    CPG = _known_multiple(CPG, ALIGN)
    x_base, sc, shw = _group_base(n, g, C, HW, CPG, CHANNELS_LAST)
    nc_base = n * C + g * CPG
    v_base = n * VS + g * CPG  # add/scale/shift rows: stride VS (views of a wider projection)
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    hw_lo = s * HW_PER_SPLIT
    hw_hi = tl.minimum(hw_lo + HW_PER_SPLIT, HW)
    offs_c = tl.arange(0, BLOCK_C)
    offs_h = tl.arange(0, BLOCK_HW)
    for c0 in range(0, CPG, BLOCK_C):
        cl = c0 + offs_c
        cmask = cl < CPG
        w, b, s1, A, Bc = _channel_coefs(W, B, SCALE, SHIFT, g * CPG + cl, cmask, n * VS,
                                         HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
        if HAS_ADD:
            a = tl.load(ADD + v_base + cl, mask=cmask, other=0.0).to(tl.float32)
        else:
            a = tl.zeros([BLOCK_C], tl.float32)
        sg = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
        sgy = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
        for h0 in range(hw_lo, hw_hi, BLOCK_HW):
            h = h0 + offs_h
            mask, offs, y_hat, gt = _grad_tile(DY, X, x_base, cl, cmask, h, h < hw_hi, sc, shw, a,
                                               mean, rstd, A, Bc, HAS_ADD, SILU)
            sg += gt
            sgy += gt * y_hat
        tl.store(PSG + (nc_base + cl) * S + s, tl.sum(sg, axis=1), mask=cmask)
        tl.store(PSGY + (nc_base + cl) * S + s, tl.sum(sgy, axis=1), mask=cmask)


@triton.jit
def _gn_bwd_dx_kernel(DY, X, ADD, W, B, SCALE, SHIFT, MEAN, RSTD, PSG, PSGY,
                      DX, DADD, DSCALE, DSHIFT, DWP, DBP,
                      C, VS, HW, CPG, G, HW_PER_SPLIT, S,
                      HAS_ADD: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                      HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
                      FUSED: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Per-channel sums (in-program, or summed from S slice partials), per-channel outputs, then dx.

    DADD[(n*C + c)*S + s] receives the dadd partial of slice s (S = 1: the final dadd).
    DSCALE, DSHIFT ([N, C]) and DWP, DBP (fp32 [N, C] partials of dweight, dbias) are written by s == 0.
    """
    ng = tl.program_id(0)
    s = tl.program_id(1)
    n = ng // G
    g = ng % G
    CPG = _known_multiple(CPG, ALIGN)
    x_base, sc, shw = _group_base(n, g, C, HW, CPG, CHANNELS_LAST)
    nc_base = n * C + g * CPG
    v_base = n * VS + g * CPG  # add/scale/shift rows: stride VS (views of a wider projection)
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    offs_c = tl.arange(0, BLOCK_C)
    offs_h = tl.arange(0, BLOCK_HW)

    # pass 1: per-channel Sg, Sgy; group sums of dy_hat and dy_hat * y_hat
    c1 = tl.zeros([], dtype=tl.float32)
    c2 = tl.zeros([], dtype=tl.float32)
    for c0 in range(0, CPG, BLOCK_C):
        cl = c0 + offs_c
        cmask = cl < CPG
        w, b, s1, A, Bc = _channel_coefs(W, B, SCALE, SHIFT, g * CPG + cl, cmask, n * VS,
                                         HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
        if FUSED:
            if HAS_ADD:
                a = tl.load(ADD + v_base + cl, mask=cmask, other=0.0).to(tl.float32)
            else:
                a = tl.zeros([BLOCK_C], tl.float32)
            sg2 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
            sgy2 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
            for h0 in range(0, HW, BLOCK_HW):
                h = h0 + offs_h
                mask, offs, y_hat, gt = _grad_tile(DY, X, x_base, cl, cmask, h, h < HW, sc, shw, a,
                                                   mean, rstd, A, Bc, HAS_ADD, SILU)
                sg2 += gt
                sgy2 += gt * y_hat
            sg = tl.sum(sg2, axis=1)
            sgy = tl.sum(sgy2, axis=1)
        else:
            sg = tl.zeros([BLOCK_C], dtype=tl.float32)
            sgy = tl.zeros([BLOCK_C], dtype=tl.float32)
            for j in range(0, S):
                sg += tl.load(PSG + (nc_base + cl) * S + j, mask=cmask, other=0.0)
                sgy += tl.load(PSGY + (nc_base + cl) * S + j, mask=cmask, other=0.0)
        sg = tl.where(cmask, sg, 0.0)
        sgy = tl.where(cmask, sgy, 0.0)
        c1 += tl.sum(A * sg, axis=0)
        c2 += tl.sum(A * sgy, axis=0)
        if s == 0:
            if HAS_SHIFT:
                tl.store(DSHIFT + nc_base + cl, sg.to(DSHIFT.dtype.element_ty), mask=cmask)
            if HAS_SCALE:
                tl.store(DSCALE + nc_base + cl, (w * sgy + b * sg).to(DSCALE.dtype.element_ty), mask=cmask)
            if HAS_W:
                tl.store(DWP + nc_base + cl, s1 * sgy, mask=cmask)
            if HAS_B:
                tl.store(DBP + nc_base + cl, s1 * sg, mask=cmask)
    m_inv = 1.0 / (CPG * HW)
    c1 = c1 * m_inv
    c2 = c2 * m_inv

    # pass 2: dx on slice s, dadd partial
    hw_lo = s * HW_PER_SPLIT
    hw_hi = tl.minimum(hw_lo + HW_PER_SPLIT, HW)
    for c0 in range(0, CPG, BLOCK_C):
        cl = c0 + offs_c
        cmask = cl < CPG
        w, b, s1, A, Bc = _channel_coefs(W, B, SCALE, SHIFT, g * CPG + cl, cmask, n * VS,
                                         HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
        if HAS_ADD:
            a = tl.load(ADD + v_base + cl, mask=cmask, other=0.0).to(tl.float32)
        else:
            a = tl.zeros([BLOCK_C], tl.float32)
        da = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
        for h0 in range(hw_lo, hw_hi, BLOCK_HW):
            h = h0 + offs_h
            mask, offs, y_hat, gt = _grad_tile(DY, X, x_base, cl, cmask, h, h < hw_hi, sc, shw, a,
                                               mean, rstd, A, Bc, HAS_ADD, SILU)
            dx = rstd * (gt * A[:, None] - c1 - y_hat * c2)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_ADD:
                da += tl.where(mask, dx, 0.0)
        if HAS_ADD:
            tl.store(DADD + (nc_base + cl) * S + s, tl.sum(da, axis=1).to(DADD.dtype.element_ty),
                     mask=cmask)


# -------------------------------------------------------------------------------- single-tile path
@triton.jit
def _gn_fwd_single_kernel(X, ADD, W, B, SCALE, SHIFT, Y, MEAN, RSTD, C, VS, HW, CPG, G, eps,
                          HAS_ADD: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                          HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
                          CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_HW: tl.constexpr):
    """Whole group in one [BLOCK_C >= CPG, BLOCK_HW >= HW] tile: one read of x, exact two-pass
    statistics in registers, one write of y."""
    ng = tl.program_id(0)
    n = ng // G
    g = ng % G
    CPG = _known_multiple(CPG, ALIGN)
    x_base, sc, shw = _group_base(n, g, C, HW, CPG, CHANNELS_LAST)
    v_base = n * VS + g * CPG  # add/scale/shift rows: stride VS (views of a wider projection)
    cl = tl.arange(0, BLOCK_C)
    h = tl.arange(0, BLOCK_HW)
    cmask = cl < CPG
    mask = cmask[:, None] & (h < HW)[None, :]
    offs = x_base + cl[:, None] * sc + h[None, :] * shw
    u = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        a = tl.load(ADD + v_base + cl, mask=cmask, other=0.0).to(tl.float32)
        u = tl.where(mask, u + a[:, None], 0.0)
    mean = tl.sum(tl.sum(u, axis=1), axis=0) / (CPG * HW)
    d = tl.where(mask, u - mean, 0.0)
    var = tl.sum(tl.sum(d * d, axis=1), axis=0) / (CPG * HW)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    tl.store(MEAN + ng, mean)
    tl.store(RSTD + ng, rstd)
    w, b, s1, A, Bc = _channel_coefs(W, B, SCALE, SHIFT, g * CPG + cl, cmask, n * VS,
                                     HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
    z = d * (A * rstd)[:, None] + Bc[:, None]
    if SILU:
        z = z * tl.sigmoid(z)
    tl.store(Y + offs, z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gn_bwd_single_kernel(DY, X, ADD, W, B, SCALE, SHIFT, MEAN, RSTD,
                          DX, DADD, DSCALE, DSHIFT, DWP, DBP, C, VS, HW, CPG, G,
                          HAS_ADD: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                          HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
                          CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_HW: tl.constexpr):
    """Whole group in one tile: one read of x and dy, all sums in registers, one write of dx."""
    ng = tl.program_id(0)
    n = ng // G
    g = ng % G
    CPG = _known_multiple(CPG, ALIGN)
    x_base, sc, shw = _group_base(n, g, C, HW, CPG, CHANNELS_LAST)
    nc_base = n * C + g * CPG
    v_base = n * VS + g * CPG  # add/scale/shift rows: stride VS (views of a wider projection)
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    cl = tl.arange(0, BLOCK_C)
    h = tl.arange(0, BLOCK_HW)
    cmask = cl < CPG
    w, b, s1, A, Bc = _channel_coefs(W, B, SCALE, SHIFT, g * CPG + cl, cmask, n * VS,
                                     HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
    if HAS_ADD:
        a = tl.load(ADD + v_base + cl, mask=cmask, other=0.0).to(tl.float32)
    else:
        a = tl.zeros([BLOCK_C], tl.float32)
    mask, offs, y_hat, gt = _grad_tile(DY, X, x_base, cl, cmask, h, h < HW, sc, shw, a,
                                       mean, rstd, A, Bc, HAS_ADD, SILU)
    sg = tl.where(cmask, tl.sum(gt, axis=1), 0.0)
    sgy = tl.where(cmask, tl.sum(gt * y_hat, axis=1), 0.0)
    c1 = tl.sum(A * sg, axis=0) / (CPG * HW)
    c2 = tl.sum(A * sgy, axis=0) / (CPG * HW)
    if HAS_SHIFT:
        tl.store(DSHIFT + nc_base + cl, sg.to(DSHIFT.dtype.element_ty), mask=cmask)
    if HAS_SCALE:
        tl.store(DSCALE + nc_base + cl, (w * sgy + b * sg).to(DSCALE.dtype.element_ty), mask=cmask)
    if HAS_W:
        tl.store(DWP + nc_base + cl, s1 * sgy, mask=cmask)
    if HAS_B:
        tl.store(DBP + nc_base + cl, s1 * sg, mask=cmask)
    dx = rstd * (gt * A[:, None] - c1 - y_hat * c2)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_ADD:
        tl.store(DADD + nc_base + cl, tl.sum(tl.where(mask, dx, 0.0), axis=1).to(DADD.dtype.element_ty),
                 mask=cmask)


# ----------------------------------------------------------------------------------------- launchers
def _tiles(block: int, cpg: int, hw: int, channels_last: bool = False) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) for a tile budget of `block` elements. The contiguous axis gets the budget
    first: HW in NCHW; C in channels-last, where a group is CPG adjacent elements per pixel (a [1, 512]
    tile there would read one element every C)."""
    if channels_last:
        bc = min(triton.next_power_of_2(cpg), block)
        return bc, max(1, min(block // bc, triton.next_power_of_2(hw)))
    bhw = min(triton.next_power_of_2(hw), block)
    bc = max(1, min(block // bhw, triton.next_power_of_2(cpg)))
    return bc, bhw


# triton.heuristics: the tile shape follows from the autotuned BLOCK and the group's CPG, HW
_TILE_HEURISTICS = {
    "BLOCK_C": lambda a: _tiles(a["BLOCK"], a["CPG"], a["HW"], a["CHANNELS_LAST"])[0],
    "BLOCK_HW": lambda a: _tiles(a["BLOCK"], a["CPG"], a["HW"], a["CHANNELS_LAST"])[1],
}


@functools.lru_cache(maxsize=None)
def _sm_count_cuda(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count_cuda(device.index if device.index is not None else torch.cuda.current_device())
    return 8


def _plan(n: int, groups: int, cpg: int, hw: int, device: torch.device,
          block: Optional[int], split: Optional[int]) -> tuple[int, int]:
    """(S, HW_PER_SPLIT): slices per group along HW; HW_PER_SPLIT is a multiple of every BLOCK_HW."""
    unit = triton.next_power_of_2(min(hw, block if block is not None else _MAX_BLOCK))
    if split is None:
        target = 4 * _sm_count(device)
        programs = n * groups
        if programs * 2 >= target:
            split = 1
        else:
            # slices of at least one largest-config tile row per channel (HW is the split axis)
            split = max(1, min(triton.cdiv(target, programs), hw // unit))
    if not isinstance(split, int) or split < 1:
        raise ValueError(f"split must be a positive int or None, got {split!r}")
    per = triton.cdiv(triton.cdiv(hw, split), unit) * unit
    return triton.cdiv(hw, per), per


def _single_tile(cpg: int, hw: int, backward: bool = False) -> Optional[tuple[int, int, int]]:
    """(BLOCK_C, BLOCK_HW, num_warps) when the whole group fits one tile of <= SINGLE_MAX, else None.

    num_warps = tile / 128 in [1, 16], except the backward of a 4096-element tile, which takes 8 warps
    (16 elements per thread): at 16 warps it needs 84 registers per thread, 43K of the SM's 64K, so one
    group is resident per SM; at 8 warps 114 registers (29K), two groups per SM, twice the loads in flight
    for a kernel that waits on memory (sm_90 AOT figures, docs/kernels.md)."""
    bc, bhw = triton.next_power_of_2(cpg), triton.next_power_of_2(hw)
    if bc * bhw > SINGLE_MAX:
        return None
    cap = 8 if backward and bc * bhw > 2048 else 16
    return bc, bhw, max(1, min(cap, (bc * bhw) // 128))


_TUNED: dict[tuple, Any] = {}
# Benchmark function handed to triton.autotune (None: triton's do_bench on the GPU). Tests replace it
# to exercise the autotuned launch path in the interpreter, where no driver can time anything.
_AUTOTUNE_DO_BENCH = None


def _launch(kernel, name: str, grid, args: list, consts: dict, cpg: int, hw: int,
            block: Optional[int], use_tune: bool) -> None:
    """Launch with a fixed BLOCK (interpreter / forced) or through triton.autotune over CONFIGS.

    One autotuner per kernel and power-of-two bucket of the program count (N * G * S): the best tile and
    warp count depend on how many programs share the SMs, which Triton's key (group shape, S, layout,
    dtypes) does not see, so a config tuned at batch 256 is not reused at batch 16."""
    if use_tune:
        key = (name, triton.next_power_of_2(grid[0] * grid[1]))
        tuned = _TUNED.get(key)
        if tuned is None:
            configs = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in CONFIGS]
            tuned = triton.autotune(configs, key=["CPG", "HW", "S", "CHANNELS_LAST"],
                                    do_bench=_AUTOTUNE_DO_BENCH)(
                triton.heuristics(_TILE_HEURISTICS)(kernel))
            _TUNED[key] = tuned
        tuned[grid](*args, **consts, enable_fp_fusion=_FP_FUSION)
        return
    if block is None:
        block, warps = INTERPRET_BLOCK, _INTERPRET_WARPS
    else:
        warps = dict(CONFIGS).get(block, 4 if block <= 2048 else 8)
    bc, bhw = _tiles(block, cpg, hw, consts["CHANNELS_LAST"])
    kernel[grid](*args, **consts, BLOCK_C=bc, BLOCK_HW=bhw, BLOCK=block, num_warps=warps,
                 enable_fp_fusion=_FP_FUSION)


def _check(x: torch.Tensor, weight, bias, add, scale, shift, groups: int) -> tuple[int, int, int, int]:
    """`checks.check_group_norm` for the kernels' dtypes, and a non-empty x; returns (N, C, HW, C/groups)."""
    n, c = check_group_norm(x, weight, bias, add, scale, shift, groups, (torch.float32, torch.bfloat16, torch.float16))
    if x.numel() == 0:
        raise ValueError("x must not be empty")
    return n, c, x.numel() // (n * c), c // groups


def _c(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def _is_channels_last(t: torch.Tensor) -> bool:
    """True when t is dense with C innermost ([N, *spatial, C] in memory, e.g. 4-D channels_last) and
    not also plain contiguous (C == 1 or H*W == 1: both layouts are the same memory; NCHW is used)."""
    return t.dim() > 2 and not t.is_contiguous() and t.movedim(1, -1).is_contiguous()


def _in_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """t itself when it already has the layout (NCHW-contiguous or channels-last), else a copy in it."""
    if not channels_last:
        return t.contiguous()
    return t if _is_channels_last(t) else t.movedim(1, -1).contiguous().movedim(-1, 1)


def _align(cpg: int, channels_last: bool) -> int:
    """The ALIGN constexpr: the largest power of two <= 8 dividing CPG in channels-last (runs of 8 bf16 =
    16-byte vectors along C), 1 in NCHW (there HW, the contiguous axis, gets Triton's own divisibility
    specialisation). At most 4 variants (CPG 1, 2, 4, 8+ : the U-Net's CPG are 4 and 8)."""
    return min(cpg & -cpg, 8) if channels_last else 1


def _empty_in_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """An uninitialised tensor like t with the canonical strides of the layout (what the op's fake
    implementation returns, also for size-1 dims whose strides t may have arbitrary)."""
    if not channels_last:
        return torch.empty(t.shape, device=t.device, dtype=t.dtype)
    return torch.empty(t.movedim(1, -1).shape, device=t.device, dtype=t.dtype).movedim(-1, 1)


def _vectors(add, scale, shift, c: int) -> tuple:
    """(add, scale, shift, VS): the [N, C] vectors read in place with row stride VS when they share one
    and have unit column stride (the U-Net's column slices of its stacked time projection), else
    made contiguous (VS = C). No copy of the per-block time-embedding slices."""
    given = [t for t in (add, scale, shift) if t is not None]
    strides = {t.stride(0) for t in given if t.shape[0] > 1}
    if all(t.stride(1) == 1 or t.shape[1] == 1 for t in given) and len(strides) <= 1:
        return add, scale, shift, (strides.pop() if strides else c)
    return _c(add), _c(scale), _c(shift), c


@on_tensor_device
def group_norm_forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       add: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                       shift: Optional[torch.Tensor], groups: int, eps: float, silu: bool,
                       *, block: Optional[int] = None, split: Optional[int] = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward. Returns (y [x.shape, x.dtype], mean fp32 [N, groups], rstd fp32 [N, groups]).

    weight/bias: [C] or None; add/scale/shift: [N, C] or None (see the module docstring for the math).
    `block` forces a tile size (power of two) instead of the config list / autotune; `split` forces
    the number of HW slices per group (1 = one program per group).
    """
    n, c, hw, cpg = _check(x, weight, bias, add, scale, shift, groups)
    if block is not None and (block < 1 or block & (block - 1)):
        raise ValueError(f"block must be a power of two or None, got {block!r}")
    cl = _is_channels_last(x)
    x = _in_layout(x, cl)  # NCHW or channels-last: read in place (any other strides: one copy to NCHW)
    weight, bias = _c(weight), _c(bias)
    add, scale, shift, vs = _vectors(add, scale, shift, c)
    y = _empty_in_layout(x, cl)
    mean = torch.empty((n, groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    S, per = _plan(n, groups, cpg, hw, x.device, block, split)
    use_tune = block is None and not _interpret()
    flags = dict(HAS_ADD=add is not None, HAS_W=weight is not None, HAS_B=bias is not None,
                 HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, SILU=bool(silu),
                 CHANNELS_LAST=cl, ALIGN=_align(cpg, cl))
    single = _single_tile(cpg, hw) if (S == 1 and block is None) else None
    if single is not None:
        bc, bhw, warps = single
        _gn_fwd_single_kernel[(n * groups,)](
            x, add, weight, bias, scale, shift, y, mean, rstd, c, vs, hw, cpg, groups, float(eps), **flags,
            BLOCK_C=bc, BLOCK_HW=bhw, num_warps=warps, enable_fp_fusion=_FP_FUSION)
        return y, mean, rstd
    if S > 1:
        pmean = torch.empty((n * groups, S), device=x.device, dtype=torch.float32)
        pm2 = torch.empty_like(pmean)
        _launch(_gn_stats_kernel, "stats", (n * groups, S),
                [x, add, pmean, pm2, c, vs, hw, cpg, groups, per, S],
                dict(HAS_ADD=flags["HAS_ADD"], CHANNELS_LAST=cl, ALIGN=flags["ALIGN"]),
                cpg, hw, block, use_tune)
    else:
        pmean = pm2 = mean
    _launch(_gn_fwd_kernel, "fwd", (n * groups, S),
            [x, add, weight, bias, scale, shift, y, mean, rstd, pmean, pm2, c, vs, hw, cpg, groups, per, S,
             float(eps)], dict(flags, FUSED_STATS=S == 1), cpg, hw, block, use_tune)
    return y, mean, rstd


@on_tensor_device
def group_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                        bias: Optional[torch.Tensor], add: Optional[torch.Tensor],
                        scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                        mean: torch.Tensor, rstd: torch.Tensor, groups: int, silu: bool,
                        *, block: Optional[int] = None, split: Optional[int] = None):
    """Fused backward. Returns (dx, dweight, dbias, dadd, dscale, dshift), None where the input was None.

    dx has x's dtype; dweight/dbias the dtype of weight/bias (reduced over the batch from fp32
    per-(n, c) partials by a torch sum: deterministic, no atomics); dadd/dscale/dshift are [N, C] in
    the dtype of add/scale/shift. `block`/`split` as in `group_norm_forward`.
    """
    n, c, hw, cpg = _check(x, weight, bias, add, scale, shift, groups)
    if dy.shape != x.shape:
        raise ValueError(f"dy must have x's shape {list(x.shape)}, got {list(dy.shape)}")
    if mean.shape != (n, groups) or rstd.shape != (n, groups):
        raise ValueError(f"mean and rstd must have shape [{n}, {groups}]")
    if block is not None and (block < 1 or block & (block - 1)):
        raise ValueError(f"block must be a power of two or None, got {block!r}")
    cl = _is_channels_last(x)
    x = _in_layout(x, cl)
    dy = _in_layout(dy, cl)  # dy follows x's layout (a copy only when the two differ)
    mean = mean.contiguous().to(torch.float32)
    rstd = rstd.contiguous().to(torch.float32)
    weight, bias = _c(weight), _c(bias)
    add, scale, shift, vs = _vectors(add, scale, shift, c)
    dev = x.device
    S, per = _plan(n, groups, cpg, hw, dev, block, split)
    use_tune = block is None and not _interpret()
    flags = dict(HAS_ADD=add is not None, HAS_W=weight is not None, HAS_B=bias is not None,
                 HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, SILU=bool(silu),
                 CHANNELS_LAST=cl, ALIGN=_align(cpg, cl))
    f32 = torch.float32
    dx = _empty_in_layout(x, cl)
    dadd = None
    if add is not None:
        dadd = torch.empty((n, c, S), device=dev, dtype=f32) if S > 1 else torch.empty((n, c), device=dev, dtype=add.dtype)
    # [N, C] contiguous whatever the inputs' row stride
    dscale = torch.empty((n, c), device=dev, dtype=scale.dtype) if scale is not None else None
    dshift = torch.empty((n, c), device=dev, dtype=shift.dtype) if shift is not None else None
    dwp = torch.empty((n, c), device=dev, dtype=f32) if weight is not None else None
    dbp = torch.empty((n, c), device=dev, dtype=f32) if bias is not None else None
    single = _single_tile(cpg, hw, backward=True) if (S == 1 and block is None) else None
    if single is not None:
        bc, bhw, warps = single
        _gn_bwd_single_kernel[(n * groups,)](
            dy, x, add, weight, bias, scale, shift, mean, rstd, dx, dadd, dscale, dshift, dwp, dbp,
            c, vs, hw, cpg, groups, **flags, BLOCK_C=bc, BLOCK_HW=bhw, num_warps=warps,
            enable_fp_fusion=_FP_FUSION)
    elif S > 1:
        psg = torch.empty((n, c, S), device=dev, dtype=f32)
        psgy = torch.empty_like(psg)
        _launch(_gn_bwd_reduce_kernel, "bwd_reduce", (n * groups, S),
                [dy, x, add, weight, bias, scale, shift, mean, rstd, psg, psgy, c, vs, hw, cpg, groups,
                 per, S], flags, cpg, hw, block, use_tune)
    if single is None:
        psg, psgy = (psg, psgy) if S > 1 else (mean, mean)  # unused when FUSED
        _launch(_gn_bwd_dx_kernel, "bwd_dx", (n * groups, S),
                [dy, x, add, weight, bias, scale, shift, mean, rstd, psg, psgy, dx, dadd, dscale, dshift,
                 dwp, dbp, c, vs, hw, cpg, groups, per, S], dict(flags, FUSED=S == 1), cpg, hw, block,
                use_tune)
    if dadd is not None and S > 1:
        dadd = dadd.sum(-1).to(add.dtype)
    dweight = dwp.sum(0).to(weight.dtype) if dwp is not None else None
    dbias = dbp.sum(0).to(bias.dtype) if dbp is not None else None
    return dx, dweight, dbias, dadd, dscale, dshift


# The traffic model and the AOT spec lists: kernels/group_norm_specs.py (imported on first use).
_SPEC_NAMES = frozenset({"modelled_hbm_bytes", "aot_specs"})


def __getattr__(name: str) -> Any:
    """Forward the names of `kernels.group_norm_specs` (``kernels.group_norm.aot_specs`` and the like)."""
    if name in _SPEC_NAMES:
        from . import group_norm_specs

        return getattr(group_norm_specs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

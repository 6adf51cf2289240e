"""Fused sampler step: one elementwise pass per sampling step for DDPM / DDIM / the multistep solvers
(DPM-Solver++ 2M / 3M, UniPC).

Contract (see fastddpm.ops.sampler_step): with m = model_output[:, :C], row = coefs[step],
    x0   = A*x + B*m
    x0c  = clamp(x0, -1, 1) if clip else x0
    mean = P*x0c + Q*x + R*m (+ P2*x0_prev + P3*x0_prev2 + P4*x0_prev3, the history given: NUM_HIST of them)
    sigma = SIGMA                                   (or SIGMA*exp(0.5*(f*LOG_MAX + (1-f)*LOG_MIN)),
                                                     f = (v+1)/2, v = model_output[:, C:] if learned_range)
    x_prev = mean + sigma*z,  returns (x_prev, x0c)
Columns of coefs: 0 A, 1 B, 2 P, 3 Q, 4 R, 5 P2, 6 SIGMA, 7 LOG_MIN, 8 LOG_MAX, 9 P3, 10 P4; the row
stride is a runtime argument, so a 9-column table (no second history) is read as it is.

Known-region replacement (HAS_MASK, inpainting): with KNOWN and MASKT (x's shape) and columns 11 KA, 12 KZ,
    x_prev = mask*(KA*known + KZ*z) + (1 - mask)*x_prev      (the step's z; NOISE_MODE != 0 then)

The step index and the seed are read from device tensors inside the kernel, so a captured CUDA graph
replays the right step with fresh noise. z is `noise` when given, otherwise Philox4x32-10 normals
generated in the kernel with counters (c0 = flat element index inside the image, c1 = image_offset +
image, c2 = step, c3 = stream 0); `fastddpm.ops.philox.philox_normal` computes the same stream in torch.
When neither noise nor seed is given, z = 0 (deterministic samplers: DDIM eta=0, DPM-Solver++).

Two launchers share the body (`_step_tile`): `sampler_step_forward` returns new tensors, and
`sampler_step_inplace` (FastSampler's whole step outside the model, one launch) writes x_{t-1} into x and
shifts the history (x0_prev3 <- x0_prev2 <- x0_prev <- x0-hat, each element read before it is written), then the last program to finish (an acq_rel completion counter, see
`_sampler_step_inplace_kernel`) increments the step counter and writes the next model timestep.

Grid: (cdiv(E, BLOCK), N) with E = elements per image, so each program knows its image and the element
indices inside that image. Math is fp32 whatever the input dtype; outputs are stored in x's dtype.

Floating-point fusion: compiled with enable_fp_fusion=False (no FMA contraction), so a GPU evaluates
the same rounding sequence as Triton's interpreter and as an fp32 torch evaluation of the formula. The
remaining differences are the transcendental functions: on sm_80/sm_90 log and cos come from libdevice
(correctly rounded to ~1 ulp), sqrt is sqrt.approx.ftz and exp is ex2.approx (about 2 ulp), so z and
the learned sigma differ from torch's float32 values by a few ulp (rtol 1e-5). Tests: fp32 outputs
rtol = atol = 1e-5 against a float64 reference with the same z; bf16 / fp16 outputs within half an ulp
of the output dtype (one final rounding; one full bf16 ulp in the interpreter, which truncates).
"""
from __future__ import annotations

import functools
import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .checks import KNOWN_COEFS, NUM_COEFS, check_sampler_step, check_sampler_step_inplace
from .device_guard import on_tensor_device

__all__ = ["sampler_step_forward", "sampler_step_inplace", "CONFIGS", "INPLACE_CONFIG", "NUM_COEFS", "MAX_HISTORY",
           "KNOWN_COEFS"]

MAX_HISTORY = 3
# (BLOCK, num_warps): the autotune list of the functional kernel on real GPUs and the AOT report's configs.
# 4-8 fp32 elements per thread (16 per thread doubles the registers to ~155 with in-kernel Philox, for no
# gain in a memory-bound kernel).
CONFIGS: List[Tuple[int, int]] = [(512, 4), (1024, 4), (2048, 8)]
# The in-place kernel's one config (no autotuning): timing it would need triton's restore_value clones
# of x and the history around every run, whose copies outweigh the step itself, so the choice would be
# noise. 8 fp32 elements per thread, two 16-byte vectors, 4 warps: the middle of CONFIGS.
INPLACE_CONFIG: Tuple[int, int] = (1024, 4)
# The fixed config of interpreter runs (one config, no autotuning on CPU).
INTERPRET_CONFIG: Tuple[int, int] = (1024, 4)
ENABLE_FP_FUSION = False

NOISE_NONE, NOISE_GIVEN, NOISE_PHILOX = 0, 1, 2
STEP_STREAM = 0


@triton.jit
def _step_tile(
    X, M, X0P, X0P2, X0P3, NOISE, COEF, STEP, SEED, XOUT, X0OUT,
    E, m_image_stride, image_offset, NCOL, KNOWN, MASKT,
    CLIP: tl.constexpr, LEARNED: tl.constexpr, NUM_HIST: tl.constexpr, NOISE_MODE: tl.constexpr,
    STREAM: tl.constexpr, STORE_X0: tl.constexpr, SHIFT: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    """The body shared by both launchers: one BLOCK of one image; returns the step it loaded.

    NUM_HIST history tensors (x0_prev, x0_prev2, x0_prev3) enter the mean with P2, P3, P4. SHIFT (the
    in-place step): X0P3 <- X0P2 and X0P2 <- X0P1 after the loads; x0 goes to X0OUT (= X0P).
    Every element is loaded and stored by this program only (XOUT may be X and X0OUT may be X0P: the
    in-place step reads an element and then overwrites that same element, race-free).
    """
    pid = tl.program_id(0)
    img = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < E
    base = img.to(tl.int64) * E
    m_base = img.to(tl.int64) * m_image_stride

    step = tl.load(STEP)
    row = COEF + step * NCOL
    ca = tl.load(row + 0)
    cb = tl.load(row + 1)
    cp = tl.load(row + 2)
    cq = tl.load(row + 3)
    cr = tl.load(row + 4)
    sig = tl.load(row + 6)

    x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(M + m_base + offs, mask=mask, other=0.0).to(tl.float32)

    x0 = ca * x + cb * m
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
    mean = cp * x0 + cq * x + cr * m
    if NUM_HIST >= 1:
        cp2 = tl.load(row + 5)
        h1_raw = tl.load(X0P + base + offs, mask=mask, other=0.0)
        mean = mean + cp2 * h1_raw.to(tl.float32)
    if NUM_HIST >= 2:
        cp3 = tl.load(row + 9)
        h2_raw = tl.load(X0P2 + base + offs, mask=mask, other=0.0)
        mean = mean + cp3 * h2_raw.to(tl.float32)
    if NUM_HIST >= 3:
        cp4 = tl.load(row + 10)
        h3_raw = tl.load(X0P3 + base + offs, mask=mask, other=0.0)
        mean = mean + cp4 * h3_raw.to(tl.float32)

    if NOISE_MODE != 0:
        if LEARNED:
            log_min = tl.load(row + 7)
            log_max = tl.load(row + 8)
            v = tl.load(M + m_base + E + offs, mask=mask, other=0.0).to(tl.float32)
            f = (v + 1.0) * 0.5
            sigma = sig * tl.exp(0.5 * (f * log_max + (1.0 - f) * log_min))
        else:
            sigma = sig
        if NOISE_MODE == 1:
            z = tl.load(NOISE + base + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            seed = tl.load(SEED)
            c0 = offs.to(tl.uint32)
            zero = c0 * 0
            c1 = zero + (image_offset + img).to(tl.uint32)
            c2 = zero + step.to(tl.uint32)
            c3 = zero + STREAM
            w0, w1, _w2, _w3 = tl.philox(seed, c0, c1, c2, c3)
            u1 = tl.random.uint_to_uniform_float(w0)
            u2 = tl.random.uint_to_uniform_float(w1)
            z, _z2 = tl.random.pair_uniform_to_normal(u1, u2)
        x_prev = mean + sigma * z
        if HAS_MASK:  # known-region replacement with the same z (see the module docstring)
            ka = tl.load(row + 11)
            kz = tl.load(row + 12)
            kn = tl.load(KNOWN + base + offs, mask=mask, other=0.0).to(tl.float32)
            mk = tl.load(MASKT + base + offs, mask=mask, other=0.0).to(tl.float32)
            x_prev = mk * (ka * kn + kz * z) + (1.0 - mk) * x_prev
    else:
        x_prev = mean

    tl.store(XOUT + base + offs, x_prev.to(XOUT.dtype.element_ty), mask=mask)
    if SHIFT:  # the stored history values move one slot back unchanged (no rounding)
        if NUM_HIST >= 3:
            tl.store(X0P3 + base + offs, h2_raw, mask=mask)
        if NUM_HIST >= 2:
            tl.store(X0P2 + base + offs, h1_raw, mask=mask)
    if STORE_X0:
        tl.store(X0OUT + base + offs, x0.to(X0OUT.dtype.element_ty), mask=mask)
    return step


@triton.jit
def _sampler_step_kernel(
    X, M, X0P, X0P2, X0P3, NOISE, COEF, STEP, SEED, XOUT, X0OUT,
    E, m_image_stride, image_offset, NCOL, KNOWN, MASKT,
    CLIP: tl.constexpr, LEARNED: tl.constexpr, NUM_HIST: tl.constexpr, NOISE_MODE: tl.constexpr,
    STREAM: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    _step_tile(X, M, X0P, X0P2, X0P3, NOISE, COEF, STEP, SEED, XOUT, X0OUT, E, m_image_stride, image_offset, NCOL,
               KNOWN, MASKT, CLIP, LEARNED, NUM_HIST, NOISE_MODE, STREAM, True, False, HAS_MASK, BLOCK)


@triton.jit
def _sampler_step_inplace_kernel(
    X, M, X0P, X0P2, X0P3, COEF, STEP, SEED, MODEL_T, TOUT, DONE,
    E, m_image_stride, image_offset, NCOL, S, NT, KNOWN, MASKT,
    CLIP: tl.constexpr, LEARNED: tl.constexpr, NUM_HIST: tl.constexpr, NOISE_MODE: tl.constexpr,
    STREAM: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    """x <- x_{t-1} and the history shift x0_prev3 <- x0_prev2 <- x0_prev <- x0-hat (the NUM_HIST buffers
    given) in place; then the last program to finish does
    step += 1, TOUT[:] = MODEL_T[min(step, S - 1)] and DONE = 0.

    Why this is race-free:
    - elementwise: each element of x / the history buffers is read and then written by the one program that owns
      it (same offsets), so no program reads an element another one writes;
    - step: every program loads STEP at its start (in `_step_tile`). The CTA barrier then makes every
      thread's load of STEP precede this program's `atomic_add(DONE, 1, acq_rel)` (issued once per
      program). The atomics on DONE form one modification order: the program that reads
      old == num_programs - 1 is the last, and its acquire synchronizes with the release of every
      earlier increment (a release sequence of RMWs), so all loads of STEP by all programs happen
      before its store of step + 1. No program of this launch reads TOUT, and DONE is reset to 0 by
      that same last program after every other program has incremented it, ready for the next launch
      (stream order makes it visible there). The counter is an integer, so the order in which programs
      arrive does not change any value: nothing here is a floating-point reduction.
    """
    step = _step_tile(X, M, X0P, X0P2, X0P3, X, COEF, STEP, SEED, X, X0P, E, m_image_stride, image_offset, NCOL,
                      KNOWN, MASKT, CLIP, LEARNED, NUM_HIST, NOISE_MODE, STREAM, NUM_HIST >= 1, True, HAS_MASK, BLOCK)
    tl.debug_barrier()
    num_programs = tl.num_programs(0) * tl.num_programs(1)
    old = tl.atomic_add(DONE, 1, sem="acq_rel")
    if old == num_programs - 1:
        nxt = step + 1
        tl.store(STEP, nxt)
        t_next = tl.load(MODEL_T + tl.minimum(nxt, S - 1))
        for start in range(0, NT, BLOCK):
            o = start + tl.arange(0, BLOCK)
            tl.store(TOUT + o, tl.zeros([BLOCK], dtype=tl.int64) + t_next, mask=o < NT)
        tl.store(DONE, 0)


_TUNE_KEY = ["E", "CLIP", "LEARNED", "NUM_HIST", "NOISE_MODE", "HAS_MASK"]


@functools.lru_cache(maxsize=None)
def _autotuned(batch_bucket: int):
    """The autotuned functional kernel (built on first GPU use, never in the interpreter), one per
    power-of-two bucket of the batch (Triton's key sees the image size E, not the batch)."""
    configs = [triton.Config({"BLOCK": b}, num_warps=w, num_stages=1) for b, w in CONFIGS]
    return triton.autotune(configs=configs, key=_TUNE_KEY)(_sampler_step_kernel)


def _launch(inplace: bool, args: tuple, flags: dict, numel_image: int, n: int) -> None:
    """Launch over (element blocks, images): INTERPRET_CONFIG in the interpreter; on a GPU the functional
    kernel is autotuned over CONFIGS and the in-place kernel runs INPLACE_CONFIG."""
    if _interpreting() or inplace:
        block, warps = INTERPRET_CONFIG if _interpreting() else INPLACE_CONFIG
        kernel = _sampler_step_inplace_kernel if inplace else _sampler_step_kernel
        kernel[(triton.cdiv(numel_image, block), n)](*args, **flags, BLOCK=block, num_warps=warps,
                                                     enable_fp_fusion=ENABLE_FP_FUSION)
    else:
        grid = lambda meta: (triton.cdiv(numel_image, meta["BLOCK"]), n)  # noqa: E731
        _autotuned(triton.next_power_of_2(n))[grid](*args, **flags, enable_fp_fusion=ENABLE_FP_FUSION)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _known_buffers(mask: Optional[torch.Tensor], known: Optional[torch.Tensor],
                   x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(known, mask) made contiguous for the launch (checked by check_sampler_step); (x, x), unread
    dummies, without them."""
    if mask is None:
        return x, x
    return known.contiguous(), mask.contiguous()


@on_tensor_device
def sampler_step_forward(
    x: torch.Tensor,
    model_output: torch.Tensor,
    coefs: torch.Tensor,
    step: torch.Tensor,
    x0_prev: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    image_offset: int,
    clip: bool,
    learned_range: bool,
    x0_prev2: Optional[torch.Tensor] = None,
    x0_prev3: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    known: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused step; returns new tensors (x_prev, x0c) in x's dtype.

    x [N, C, *spatial]; model_output [N, C or 2C (learned_range), *spatial]; coefs float32 [S, 11]
    ([S, 9] without x0_prev2); step / seed int64 tensors with one element on x's device (seed may be
    None when noise is given, or when no noise is wanted: then z = 0); noise / x0_prev / x0_prev2 /
    x0_prev3 like x or None (the history most recent first). Inputs are made contiguous.
    """
    num_hist = check_sampler_step(x, model_output, coefs, step, x0_prev, noise, seed, image_offset, learned_range,
                                  False, x0_prev2, x0_prev3, mask, known)
    kn, mk = _known_buffers(mask, known, x)
    n = x.shape[0]
    x = x.contiguous()
    model_output = model_output.contiguous()
    coefs = coefs.contiguous()
    x_prev = torch.empty_like(x)
    x0 = torch.empty_like(x)
    numel_image = x[0].numel() if n > 0 else 0
    if n == 0 or numel_image == 0:
        return x_prev, x0
    if numel_image >= 2**31:
        raise ValueError(f"x must have fewer than 2**31 elements per image, got {numel_image}")
    noise_mode = NOISE_GIVEN if noise is not None else (NOISE_PHILOX if seed is not None else NOISE_NONE)
    h1, h2, h3 = (t.contiguous() if t is not None else x for t in (x0_prev, x0_prev2, x0_prev3))
    nz = noise.contiguous() if noise is not None else x
    sd = seed if seed is not None else step
    args = (x, model_output, h1, h2, h3, nz, coefs, step, sd, x_prev, x0, numel_image, model_output[0].numel(),
            image_offset, coefs.shape[1], kn, mk)
    flags = dict(CLIP=bool(clip), LEARNED=bool(learned_range), NUM_HIST=num_hist,
                 NOISE_MODE=noise_mode, STREAM=STEP_STREAM, HAS_MASK=mask is not None)
    _launch(False, args, flags, numel_image, n)
    return x_prev, x0


@on_tensor_device
def sampler_step_inplace(
    x: torch.Tensor,
    model_output: torch.Tensor,
    coefs: torch.Tensor,
    step: torch.Tensor,
    t_out: torch.Tensor,
    model_timesteps: torch.Tensor,
    done_counter: torch.Tensor,
    x0_prev: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    image_offset: int,
    clip: bool,
    learned_range: bool,
    x0_prev2: Optional[torch.Tensor] = None,
    x0_prev3: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    known: Optional[torch.Tensor] = None,
) -> None:
    """The whole sampling step in one launch, in place (FastSampler's step outside the model).

    Writes x_{t-1} into x and shifts the history given (x0_prev3 <- x0_prev2 <- x0_prev <- x0-hat),
    then step += 1 and
    t_out[:] = model_timesteps[min(step, S - 1)] (the model timestep of the next step), done by the
    last program to finish (see `_sampler_step_inplace_kernel`). z is the Philox stream of `seed`, or
    0 when seed is None. model_output may have 2C channels also without learned_range (only the first
    C are read). x and the history buffers must be contiguous (they are written) and distinct;
    done_counter is an int32 [1] buffer holding 0, owned by the caller, and holds 0 again after the launch.
    """
    num_hist = check_sampler_step_inplace(x, model_output, coefs, step, t_out, model_timesteps, x0_prev, seed,
                                          image_offset, learned_range, done_counter, x0_prev2, x0_prev3, mask, known)
    kn, mk = _known_buffers(mask, known, x)
    if done_counter is None:
        raise ValueError("done_counter must be an int32 tensor with one element holding 0, got None")
    for name, t in (("x", x), ("x0_prev", x0_prev), ("x0_prev2", x0_prev2), ("x0_prev3", x0_prev3), ("t_out", t_out)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the in-place step writes it)")
    s_rows = coefs.shape[0]
    n = x.shape[0]
    numel_image = x[0].numel() if n > 0 else 0
    if n == 0 or numel_image == 0:
        # no program would run: do the bookkeeping with torch ops (never on the graphed path)
        step.add_(1)
        t_out.copy_(model_timesteps.index_select(0, step.clamp(max=s_rows - 1)).expand_as(t_out))
        return
    if numel_image >= 2**31:
        raise ValueError(f"x must have fewer than 2**31 elements per image, got {numel_image}")
    model_output = model_output.contiguous()
    coefs = coefs.contiguous()
    model_timesteps = model_timesteps.contiguous()
    noise_mode = NOISE_PHILOX if seed is not None else NOISE_NONE
    h1, h2, h3 = (t if t is not None else x for t in (x0_prev, x0_prev2, x0_prev3))
    sd = seed if seed is not None else step
    args = (x, model_output, h1, h2, h3, coefs, step, sd, model_timesteps, t_out, done_counter, numel_image,
            model_output[0].numel(), image_offset, coefs.shape[1], s_rows, t_out.numel(), kn, mk)
    flags = dict(CLIP=bool(clip), LEARNED=bool(learned_range), NUM_HIST=num_hist,
                 NOISE_MODE=noise_mode, STREAM=STEP_STREAM, HAS_MASK=mask is not None)
    _launch(True, args, flags, numel_image, n)


# The traffic model and the AOT spec lists: kernels/sampler_step_specs.py (imported on first use).
_SPEC_NAMES = frozenset({"aot_specs", "hbm_bytes_fused", "hbm_bytes_unfused", "hbm_bytes_inplace_unfused",
                         "REPORT_SHAPE"})


def __getattr__(name: str):
    """Forward the names of `kernels.sampler_step_specs` (``kernels.sampler_step.aot_specs`` and the like)."""
    if name in _SPEC_NAMES:
        from . import sampler_step_specs

        return getattr(sampler_step_specs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

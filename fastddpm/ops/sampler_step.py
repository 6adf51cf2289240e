"""`fastddpm::sampler_step`: one fused elementwise pass per sampling step (DDPM, DDIM, DPM-Solver++ 2M/3M, UniPC).

The op is generic over the samplers: a per-step row of a coefficient table says what to do.
With C = x.shape[1], m = model_output[:, :C] (fp32 math whatever the dtype), row = coefs[step]:

    x0    = A*x + B*m                               (eps: A=sqrt(1/ab), B=-sqrt(1/ab-1); x0: A=0, B=1;
                                                     v: A=sqrt(ab), B=-sqrt(1-ab))
    x0c   = clamp(x0, -1, 1) if clip else x0
    mean  = P*x0c + Q*x + R*m + P2*x0_prev + P3*x0_prev2 + P4*x0_prev3
                                                    (each history term only when that tensor is given;
                                                     the history is most recent first: x0_prev2 needs
                                                     x0_prev, x0_prev3 needs x0_prev2)
    sigma = SIGMA                                   if not learned_range
          = SIGMA * exp(0.5*(f*LOG_MAX + (1-f)*LOG_MIN)), f = (v+1)/2, v = model_output[:, C:2C]
    x_prev = mean + sigma * z                       returns (x_prev, x0c), both in x's dtype

Columns of coefs: 0 A, 1 B, 2 P, 3 Q, 4 R, 5 P2, 6 SIGMA, 7 LOG_MIN, 8 LOG_MAX, 9 P3, 10 P4. A table
of the first 9 columns only ([S, 9], the layout before P3 / P4 existed) is accepted without x0_prev2.

Known-region replacement (inpainting, `fastddpm.editing`): with `mask` and `known` (x's shape; mask 1 =
keep, 0 = generate), the table has two more columns, 11 KA and 12 KZ (`KNOWN_COEFS` = 13: the known
image's coefficients at the timestep the step lands on, sqrt(ab_next) and sqrt(1 - ab_next)), and

    x_prev = mask * (KA*known + KZ*z) + (1 - mask) * x_prev

with the step's own z (an element takes either the update's noise or the known region's, never both),
so z is drawn even where SIGMA = 0: `noise` or `seed` is then required.

z is `noise` when given; else, when `seed` is given, the Philox stream of `fastddpm.ops.philox`
(z[i, e] = normal(seed, c0=e, c1=image_offset+i, c2=step, c3=0)); when neither is given z = 0, which
is what deterministic samplers (DDIM with eta = 0, DPM-Solver++) use: the caller guarantees sigma = 0.

`step` (the row) and `seed` are int64 device tensors of one element, read on the device (no host
sync), so one launch can be replayed inside a CUDA graph. CUDA tensors (or any tensor under
`use_backend("triton")`) go to the Triton kernel in `kernels/sampler_step.py`; everything else to the
plain-PyTorch reference below, which is also the oracle of the kernel's tests.
"""
# No `from __future__ import annotations`: torch.library infers the op schema from real annotations.
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastddpm.kernels.checks import (KNOWN_COEFS, LEGACY_COEFS, NUM_COEFS, check_sampler_step,
                                     check_sampler_step_inplace)
from .backend import use_triton

__all__ = ["sampler_step", "sampler_step_", "sampler_step_reference", "sampler_step_inplace_reference",
           "NUM_COEFS", "COLUMNS", "KNOWN_COEFS", "KNOWN_COLUMNS"]

COLUMNS = ("A", "B", "P", "Q", "R", "P2", "SIGMA", "LOG_MIN", "LOG_MAX", "P3", "P4")
# with mask / known: two more columns, the known image's coefficients
KNOWN_COLUMNS = ("KA", "KZ")


def sampler_step_reference(
    x: Tensor, model_output: Tensor, coefs: Tensor, step: Tensor, x0_prev: Optional[Tensor] = None,
    noise: Optional[Tensor] = None, seed: Optional[Tensor] = None, image_offset: int = 0,
    clip: bool = True, learned_range: bool = False, x0_prev2: Optional[Tensor] = None,
    x0_prev3: Optional[Tensor] = None, mask: Optional[Tensor] = None, known: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """The plain-PyTorch implementation of the op (same arguments and results; no checks).

    Written to issue few full-size ops (in-place addcmul on its own temporaries; inputs are never
    written): 7 elementwise passes for DDPM with noise, 6 for DDIM with eta = 0. On the CPU a step
    whose SIGMA is 0 draws no Philox noise even when `seed` is given (the result is the same).
    """
    c = x.shape[1]
    wdt = torch.promote_types(x.dtype, torch.float32)  # fp32 math for fp32/bf16/fp16, fp64 for fp64
    row = coefs.index_select(0, step.reshape(1)).reshape(coefs.shape[1])  # on the device, no .item()
    if row.dtype != wdt:
        row = row.to(wdt)
    a, b, p, q, r, p2, sig, log_min, log_max = row[:LEGACY_COEFS].unbind(0)
    xf = x if x.dtype == wdt else x.to(wdt)  # may be x itself: never written
    m = model_output if model_output.shape[1] == c else model_output[:, :c]
    if m.dtype != wdt:
        m = m.to(wdt)  # else a view of model_output: never written
    x0 = torch.addcmul(b * m, a, xf)
    if clip:
        x0.clamp_(-1.0, 1.0)
    mean = torch.addcmul(q * xf, p, x0)
    mean.addcmul_(r, m)
    for col, h in ((5, x0_prev), (9, x0_prev2), (10, x0_prev3)):
        if h is not None:
            mean.addcmul_(row[col], h if h.dtype == wdt else h.to(wdt))
    masked = mask is not None
    if noise is None and seed is not None and (masked or not (x.device.type == "cpu" and float(sig) == 0.0)):
        # SIGMA == 0 (DDIM eta = 0, DPM-Solver++, the last step) makes sigma 0, learned_range included
        # (sigma = SIGMA * exp(...)): the draw is skipped on the CPU, where reading SIGMA costs no device
        # sync. On other devices SIGMA is never read on the host (graph-capturable, sync-free).
        from .philox import philox_normal  # lazy: written alongside the kernel

        noise = philox_normal(seed, tuple(x.shape), step, stream=0, image_offset=image_offset, device=x.device)
    if noise is not None:
        if learned_range:
            f = (model_output[:, c:].to(wdt) + 1.0) * 0.5
            sigma = torch.exp(0.5 * torch.lerp(log_min, log_max, f)) * sig
        else:
            sigma = sig
        mean.addcmul_(sigma, noise if noise.dtype == wdt else noise.to(wdt))
    if masked:
        mean = _replace_known(mean, row, mask.to(wdt), known.to(wdt), noise.to(wdt))
    if x.dtype != wdt:
        mean, x0 = mean.to(x.dtype), x0.to(x.dtype)
    return mean, x0


def _replace_known(mean: Tensor, row: Tensor, mask: Tensor, known: Tensor, z: Tensor) -> Tensor:
    """mask * (KA*known + KZ*z) + (1 - mask) * mean, the op's known-region replacement (fp32)."""
    target = torch.addcmul(row[KNOWN_COEFS - 2] * known, row[KNOWN_COEFS - 1], z)
    return torch.addcmul(mask * target, 1.0 - mask, mean)


@torch.library.custom_op("fastddpm::sampler_step", mutates_args=())
def sampler_step(
    x: Tensor,
    model_output: Tensor,
    coefs: Tensor,
    step: Tensor,
    x0_prev: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
    seed: Optional[Tensor] = None,
    image_offset: int = 0,
    clip: bool = True,
    learned_range: bool = False,
    x0_prev2: Optional[Tensor] = None,
    x0_prev3: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    known: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """One sampling step x_t -> (x_{t-1}, x0-hat) driven by the coefficient row `coefs[step]`.

    Args:
        x: x_t, [N, C, *spatial], float32/bf16/fp16 (fp64 accepted on the reference path).
        model_output: [N, C, *spatial], or [N, 2C, *spatial] with learned_range (channels C..2C-1 are
            the variance interpolation v in [-1, 1]).
        coefs: float32 [S, 11] on x's device (columns A, B, P, Q, R, P2, SIGMA, LOG_MIN, LOG_MAX, P3, P4;
            [S, 9] without x0_prev2).
        step: int64 tensor [1] on x's device: the row of `coefs` (also the Philox step counter).
        x0_prev: the previous x0-hat (multistep solvers) or None.
        noise: the standard normals z (x's shape) or None.
        seed: int64 tensor [1]: draw z from the Philox stream when `noise` is None. With neither,
            z = 0 (the caller guarantees sigma = 0).
        image_offset: global index of image 0 of this batch (Philox counter c1 = image_offset + i).
        clip: clamp x0-hat to [-1, 1] before the update.
        learned_range: sigma interpolates LOG_MIN/LOG_MAX with the model's extra channels.
        x0_prev2, x0_prev3: the x0-hat of two / three steps back (DPM-Solver++ 3M, UniPC) or None.
        mask, known: known-region replacement (x's shape; mask 1 = keep, 0 = generate; coefs [S, 13];
            see the module docstring), or None.

    Returns:
        (x_prev, x0c): new tensors in x's dtype.
    """
    check_sampler_step(x, model_output, coefs, step, x0_prev, noise, seed, image_offset, learned_range, False,
                       x0_prev2, x0_prev3, mask, known)
    _check_row(step, coefs)
    if use_triton(x):
        from fastddpm.kernels.sampler_step import sampler_step_forward

        extra = {} if mask is None else {"mask": mask, "known": known}
        return sampler_step_forward(x, model_output, coefs, step, x0_prev, noise, seed, image_offset, clip, learned_range,
                                    x0_prev2, x0_prev3, **extra)
    return sampler_step_reference(x, model_output, coefs, step, x0_prev, noise, seed, image_offset, clip, learned_range,
                                  x0_prev2, x0_prev3, mask, known)


@sampler_step.register_fake
def _(
    x: Tensor, model_output: Tensor, coefs: Tensor, step: Tensor, x0_prev: Optional[Tensor] = None,
    noise: Optional[Tensor] = None, seed: Optional[Tensor] = None, image_offset: int = 0,
    clip: bool = True, learned_range: bool = False, x0_prev2: Optional[Tensor] = None,
    x0_prev3: Optional[Tensor] = None, mask: Optional[Tensor] = None, known: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    check_sampler_step(x, model_output, coefs, step, x0_prev, noise, seed, image_offset, learned_range, False,
                       x0_prev2, x0_prev3, mask, known)
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(x, memory_format=torch.contiguous_format)


def _check_row(step: Tensor, coefs: Tensor) -> None:
    """ValueError unless 0 <= step < S. Only a CPU step is read (free there); a CUDA one stays unread,
    since reading it would sync the host on every step (callers build it from the sampler's tables)."""
    if step.device.type != "cpu":
        return
    s = int(step.reshape(-1)[0])
    if not 0 <= s < coefs.shape[0]:
        raise ValueError(f"step must index a row of coefs: 0 <= step < {coefs.shape[0]}, got {s}")


# ------------------------------------------------------------------ the in-place step (FastSampler)
def sampler_step_inplace_reference(
    x: Tensor, model_output: Tensor, coefs: Tensor, step: Tensor, t_out: Tensor, model_timesteps: Tensor,
    x0_prev: Optional[Tensor] = None, seed: Optional[Tensor] = None, image_offset: int = 0,
    clip: bool = True, learned_range: bool = False, x0_prev2: Optional[Tensor] = None,
    x0_prev3: Optional[Tensor] = None, mask: Optional[Tensor] = None, known: Optional[Tensor] = None,
) -> None:
    """The plain-PyTorch in-place step: `sampler_step_reference`, then the results and the counters
    are written into the caller's buffers, the history shifted oldest first (no checks)."""
    x_prev, x0 = sampler_step_reference(x, model_output, coefs, step, x0_prev, None, seed, image_offset, clip,
                                        learned_range, x0_prev2, x0_prev3, mask, known)
    x.copy_(x_prev)
    if x0_prev3 is not None:
        x0_prev3.copy_(x0_prev2)
    if x0_prev2 is not None:
        x0_prev2.copy_(x0_prev)
    if x0_prev is not None:
        x0_prev.copy_(x0)
    step.add_(1)
    nxt = step.clamp(max=coefs.shape[0] - 1)
    t_out.copy_(model_timesteps.index_select(0, nxt).expand_as(t_out))


@torch.library.custom_op("fastddpm::sampler_step_",
                         mutates_args=("x", "step", "t_out", "x0_prev", "done_counter", "x0_prev2", "x0_prev3"))
def sampler_step_(
    x: Tensor,
    model_output: Tensor,
    coefs: Tensor,
    step: Tensor,
    t_out: Tensor,
    model_timesteps: Tensor,
    x0_prev: Optional[Tensor] = None,
    seed: Optional[Tensor] = None,
    image_offset: int = 0,
    clip: bool = True,
    learned_range: bool = False,
    done_counter: Optional[Tensor] = None,
    x0_prev2: Optional[Tensor] = None,
    x0_prev3: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    known: Optional[Tensor] = None,
) -> None:
    """One sampling step in place, counters included: the whole step of a static-buffer sampling loop.

    Same math as `sampler_step` (z is the Philox stream of `seed`, or 0 when seed is None). Writes
    x_{t-1} into `x` and shifts the history given (x0_prev3 <- x0_prev2 <- x0_prev <- x0-hat), then
    `step += 1` and
    `t_out[:] = model_timesteps[min(step, S - 1)]`, the model timestep of the next step, so that a loop
    `model(x, t_out); sampler_step_(x, out, ..., t_out, ...)` needs nothing else per step (one op
    outside the model, no host sync: a CUDA graph replays it).

    Args:
        x: x_t [N, C, *spatial] (written; contiguous on the Triton path).
        model_output: [N, C, *spatial] or [N, 2C, *spatial]: with learned_range channels C..2C-1 are v;
            without it the extra channels are ignored (no slice op is needed by the caller).
        coefs: float32 [S, 11] ([S, 9] without x0_prev2; see `sampler_step`).
        step: int64 [1], the row of `coefs`; incremented by one.
        t_out: int64 [N'] (any N', usually N); every element is set to the next model timestep.
        model_timesteps: int64 [S], the model timestep of each row.
        x0_prev: the previous x0-hat (multistep solvers), overwritten with this step's x0-hat; or None.
        seed: int64 [1] Philox seed, or None (z = 0; the caller guarantees sigma = 0).
        image_offset: global index of image 0 of this batch.
        clip: clamp x0-hat to [-1, 1].
        learned_range: sigma interpolates LOG_MIN/LOG_MAX with the model's extra channels.
        done_counter: int32 [1] holding 0, the Triton kernel's completion counter (left at 0); a
            caller that steps repeatedly allocates it once. None: the Triton path allocates one per call.
        x0_prev2, x0_prev3: the older history (x0-hat of two / three steps back), shifted back by one
            (x0_prev3 <- x0_prev2 <- x0_prev); or None.
        mask, known: known-region replacement (see `sampler_step`; needs `seed` and coefs [S, 13]), or None.
    """
    check_sampler_step_inplace(x, model_output, coefs, step, t_out, model_timesteps, x0_prev, seed, image_offset,
                               learned_range, done_counter, x0_prev2, x0_prev3, mask, known)
    _check_row(step, coefs)
    if use_triton(x):
        from fastddpm.kernels.sampler_step import sampler_step_inplace

        if done_counter is None:
            done_counter = torch.zeros(1, dtype=torch.int32, device=x.device)
        extra = {} if mask is None else {"mask": mask, "known": known}
        sampler_step_inplace(x, model_output, coefs, step, t_out, model_timesteps, done_counter, x0_prev, seed,
                             image_offset, clip, learned_range, x0_prev2, x0_prev3, **extra)
        return
    sampler_step_inplace_reference(x, model_output, coefs, step, t_out, model_timesteps, x0_prev, seed,
                                   image_offset, clip, learned_range, x0_prev2, x0_prev3, mask, known)


@sampler_step_.register_fake
def _(
    x: Tensor, model_output: Tensor, coefs: Tensor, step: Tensor, t_out: Tensor, model_timesteps: Tensor,
    x0_prev: Optional[Tensor] = None, seed: Optional[Tensor] = None, image_offset: int = 0,
    clip: bool = True, learned_range: bool = False, done_counter: Optional[Tensor] = None,
    x0_prev2: Optional[Tensor] = None, x0_prev3: Optional[Tensor] = None, mask: Optional[Tensor] = None,
    known: Optional[Tensor] = None,
) -> None:
    check_sampler_step_inplace(x, model_output, coefs, step, t_out, model_timesteps, x0_prev, seed, image_offset,
                               learned_range, done_counter, x0_prev2, x0_prev3, mask, known)
    return None

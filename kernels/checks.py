"""Argument checks of the sampler step, shared by its launchers (`sampler_step.py`) and its op
(`fastddpm.ops.sampler_step`): one validator, one message per violation, whichever layer is called.

Imports torch only (no triton), so the op's reference path runs these checks where triton is absent.
Every check reads shapes, dtypes and devices, never a tensor's values (no device sync), and accepts
the symbolic shapes of fake tensors (the ops' fake implementations call it under torch.compile).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["NUM_COEFS", "LEGACY_COEFS", "history_count", "check_sampler_step", "check_sampler_step_inplace"]

# columns of the coefficient table: A, B, P, Q, R, P2, SIGMA, LOG_MIN, LOG_MAX, P3, P4
NUM_COEFS = 11
# tables of samplers with at most one history tensor may stop after LOG_MAX
LEGACY_COEFS = 9


def history_count(x0_prev: Optional[Tensor], x0_prev2: Optional[Tensor], x0_prev3: Optional[Tensor]) -> int:
    """The number of history tensors given; ValueError unless they are given most recent first."""
    if x0_prev3 is not None and x0_prev2 is None:
        raise ValueError("x0_prev3 needs x0_prev2 (the history is given most recent first)")
    if x0_prev2 is not None and x0_prev is None:
        raise ValueError("x0_prev2 needs x0_prev (the history is given most recent first)")
    return sum(t is not None for t in (x0_prev, x0_prev2, x0_prev3))


def _check_model_output(x: Tensor, model_output: Tensor, learned_range: bool, extra_channels_ok: bool) -> None:
    n, c = x.shape[0], x.shape[1]
    want = (n, 2 * c if learned_range else c) + tuple(x.shape[2:])
    ok = [want]  # a list: shapes may hold SymInts (unhashable) under fake tensors
    if extra_channels_ok and not learned_range:
        ok.append((n, 2 * c) + tuple(x.shape[2:]))
    if tuple(model_output.shape) not in ok or not model_output.dtype.is_floating_point:
        raise ValueError(
            f"model_output must be a floating-point tensor of shape {want} "
            f"({'2C channels with learned_range=True' if learned_range else 'C channels'}), "
            f"got {model_output.dtype} {tuple(model_output.shape)}"
        )


def check_sampler_step(
    x: Tensor, model_output: Tensor, coefs: Tensor, step: Tensor, x0_prev: Optional[Tensor],
    noise: Optional[Tensor], seed: Optional[Tensor], image_offset: int, learned_range: bool,
    extra_channels_ok: bool = False, x0_prev2: Optional[Tensor] = None, x0_prev3: Optional[Tensor] = None,
) -> int:
    """ValueError naming the argument for every violation of the step's contract; returns the number
    of history tensors. extra_channels_ok: also accept a 2C-channel model_output without learned_range
    (the in-place step reads only the first C channels)."""
    if x.dim() < 2 or not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating-point tensor [N, C, *spatial], got {x.dtype} {tuple(x.shape)}")
    _check_model_output(x, model_output, learned_range, extra_channels_ok)
    num_hist = history_count(x0_prev, x0_prev2, x0_prev3)
    widths = [LEGACY_COEFS, NUM_COEFS] if num_hist <= 1 else [NUM_COEFS]
    if coefs.dim() != 2 or coefs.shape[1] not in widths or coefs.dtype != torch.float32:
        raise ValueError(f"coefs must be a float32 tensor [S, {NUM_COEFS}] ([S, {LEGACY_COEFS}] without x0_prev2), "
                         f"got {coefs.dtype} {tuple(coefs.shape)}")
    if step.dtype != torch.int64 or step.numel() != 1:
        raise ValueError(f"step must be an int64 tensor with one element, got {step.dtype} {tuple(step.shape)}")
    if seed is not None and (seed.dtype != torch.int64 or seed.numel() != 1):
        raise ValueError(f"seed must be None or an int64 tensor with one element, got {seed.dtype} {tuple(seed.shape)}")
    for name, t in (("x0_prev", x0_prev), ("x0_prev2", x0_prev2), ("x0_prev3", x0_prev3), ("noise", noise)):
        if t is not None and (not isinstance(t, Tensor) or t.shape != x.shape or not t.dtype.is_floating_point):
            raise ValueError(f"{name} must be None or a floating-point tensor of x's shape {tuple(x.shape)}, "
                             f"got {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if not isinstance(image_offset, (int, torch.SymInt)) or image_offset < 0:
        raise ValueError(f"image_offset must be a non-negative int, got {image_offset!r}")
    for name, t in (("model_output", model_output), ("coefs", coefs), ("step", step), ("x0_prev", x0_prev),
                    ("x0_prev2", x0_prev2), ("x0_prev3", x0_prev3), ("noise", noise), ("seed", seed)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    return num_hist


def check_sampler_step_inplace(
    x: Tensor, model_output: Tensor, coefs: Tensor, step: Tensor, t_out: Tensor, model_timesteps: Tensor,
    x0_prev: Optional[Tensor], seed: Optional[Tensor], image_offset: int, learned_range: bool,
    done_counter: Optional[Tensor], x0_prev2: Optional[Tensor] = None, x0_prev3: Optional[Tensor] = None,
) -> int:
    """`check_sampler_step` for the in-place step (no noise tensor; a 2C model_output is accepted),
    plus its counters; returns the number of history tensors. The Triton launcher also needs the
    buffers it writes to be contiguous, which it checks itself."""
    num_hist = check_sampler_step(x, model_output, coefs, step, x0_prev, None, seed, image_offset, learned_range,
                                  True, x0_prev2, x0_prev3)
    s = coefs.shape[0]
    if model_timesteps.dtype != torch.int64 or tuple(model_timesteps.shape) != (s,):
        raise ValueError(f"model_timesteps must be an int64 tensor of shape ({s},) (one per coefs row), "
                         f"got {model_timesteps.dtype} {tuple(model_timesteps.shape)}")
    if t_out.dtype != torch.int64 or t_out.dim() != 1:
        raise ValueError(f"t_out must be an int64 tensor [N], got {t_out.dtype} {tuple(t_out.shape)}")
    if done_counter is not None and (done_counter.dtype != torch.int32 or done_counter.numel() != 1):
        raise ValueError(f"done_counter must be None or an int32 tensor with one element, got "
                         f"{done_counter.dtype} {tuple(done_counter.shape)}")
    for name, t in (("t_out", t_out), ("model_timesteps", model_timesteps), ("done_counter", done_counter)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    return num_hist

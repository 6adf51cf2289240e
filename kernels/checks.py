"""Argument checks of the fused ops, shared by the launchers (kernels/*.py) and the ops
(`fastddpm.ops`): one validator per op, one message per violation, whichever layer is called. Each
layer adds only what is its own: the launchers their dtype list and kernel limits (head_dim, empty
tensors, contiguous buffers they write), the ops float64 (their reference path) and the options the
launchers do not take.

Imports torch only (no triton), so the op's reference path runs these checks where triton is absent.
Every check reads shapes, dtypes and devices, never a tensor's values (no device sync), and accepts
the symbolic shapes of fake tensors (the ops' fake implementations call it under torch.compile).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["NUM_COEFS", "LEGACY_COEFS", "KNOWN_COEFS", "history_count", "check_sampler_step",
           "check_sampler_step_inplace", "check_group_norm", "check_attention"]

# columns of the coefficient table: A, B, P, Q, R, P2, SIGMA, LOG_MIN, LOG_MAX, P3, P4
NUM_COEFS = 11
# tables of samplers with at most one history tensor may stop after LOG_MAX
LEGACY_COEFS = 9
# with the known-region replacement (mask / known): two more columns, KA and KZ
KNOWN_COEFS = 13


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


def _check_known(x: Tensor, coefs: Tensor, noise: Optional[Tensor], seed: Optional[Tensor],
                 mask: Optional[Tensor], known: Optional[Tensor]) -> None:
    """The known-region replacement's inputs: mask and known together, of x's shape, floating-point, on
    x's device; coefs [S, KNOWN_COEFS]; noise or seed (the known region is noised with the step's z)."""
    if (mask is None) != (known is None):
        raise ValueError("mask and known must be given together (known-region replacement), or neither")
    for name, t in (("mask", mask), ("known", known)):
        if not isinstance(t, Tensor) or t.shape != x.shape or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be None or a floating-point tensor of x's shape {tuple(x.shape)}, "
                             f"got {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    if coefs.dim() != 2 or coefs.shape[1] != KNOWN_COEFS or coefs.dtype != torch.float32:
        raise ValueError(f"coefs must be a float32 tensor [S, {KNOWN_COEFS}] with mask/known (KA, KZ after the "
                         f"{NUM_COEFS} columns), got {coefs.dtype} {tuple(coefs.shape)}")
    if noise is None and seed is None:
        raise ValueError("mask/known need noise or seed: the known region is noised with the step's z")


def check_sampler_step(
    x: Tensor, model_output: Tensor, coefs: Tensor, step: Tensor, x0_prev: Optional[Tensor],
    noise: Optional[Tensor], seed: Optional[Tensor], image_offset: int, learned_range: bool,
    extra_channels_ok: bool = False, x0_prev2: Optional[Tensor] = None, x0_prev3: Optional[Tensor] = None,
    mask: Optional[Tensor] = None, known: Optional[Tensor] = None,
) -> int:
    """ValueError naming the argument for every violation of the step's contract; returns the number
    of history tensors. extra_channels_ok: also accept a 2C-channel model_output without learned_range
    (the in-place step reads only the first C channels). mask / known: the known-region replacement."""
    if x.dim() < 2 or not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating-point tensor [N, C, *spatial], got {x.dtype} {tuple(x.shape)}")
    _check_model_output(x, model_output, learned_range, extra_channels_ok)
    num_hist = history_count(x0_prev, x0_prev2, x0_prev3)
    widths = [LEGACY_COEFS, NUM_COEFS] if num_hist <= 1 else [NUM_COEFS]
    if mask is not None or known is not None:
        _check_known(x, coefs, noise, seed, mask, known)
    elif coefs.dim() != 2 or coefs.shape[1] not in widths or coefs.dtype != torch.float32:
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
    mask: Optional[Tensor] = None, known: Optional[Tensor] = None,
) -> int:
    """`check_sampler_step` for the in-place step (no noise tensor; a 2C model_output is accepted),
    plus its counters; returns the number of history tensors. The Triton launcher also needs the
    buffers it writes to be contiguous, which it checks itself."""
    num_hist = check_sampler_step(x, model_output, coefs, step, x0_prev, None, seed, image_offset, learned_range,
                                  True, x0_prev2, x0_prev3, mask, known)
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


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _check_param(name: str, t: Optional[Tensor], shape: tuple, x: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a Tensor of shape {list(shape)} or None, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)} (from x of shape {list(x.shape)}) or be None, "
                         f"got {list(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def check_group_norm(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], add: Optional[Tensor], scale: Optional[Tensor],
    shift: Optional[Tensor], groups: int, dtypes: Sequence[torch.dtype],
) -> Tuple[int, int]:
    """ValueError naming the argument for every violation of GroupNorm+SiLU's tensor contract: x
    [N, C, *spatial] of one of `dtypes`, groups a positive int dividing C, weight/bias [C] and
    add/scale/shift [N, C] floating-point on x's device, or None. Returns (N, C)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a Tensor [N, C, *spatial], got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape [N, C, *spatial] (at least 2 dims), got {list(x.shape)}")
    if x.dtype not in dtypes:
        raise ValueError(f"x.dtype must be one of {_dtype_names(dtypes)}, got {x.dtype}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    n, c = x.shape[0], x.shape[1]
    if c % groups != 0:
        raise ValueError(f"groups={groups} must divide the number of channels C={c}")
    for name, t, shape in (("weight", weight, (c,)), ("bias", bias, (c,)), ("add", add, (n, c)),
                           ("scale", scale, (n, c)), ("shift", shift, (n, c))):
        _check_param(name, t, shape, x)
    return n, c


def check_attention(q: Tensor, k: Tensor, v: Tensor, dtypes: Sequence[torch.dtype]) -> None:
    """ValueError naming the argument for every violation of attention's tensor contract: q [B, heads,
    N, head_dim], k and v [B, heads, M, head_dim], one dtype among `dtypes`, one device, head_dim and
    M at least 1."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a Tensor [B, heads, N, head_dim], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, heads, N, head_dim], got shape {list(t.shape)}")
        if t.dtype not in dtypes:
            raise ValueError(f"{name}.dtype must be one of {_dtype_names(dtypes)}, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, heads, M, head_dim], got {list(k.shape)} "
                         f"and {list(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q [B, heads, N, head_dim] and k/v [B, heads, M, head_dim] must match in B, heads "
                         f"and head_dim, got q {list(q.shape)} and k {list(k.shape)}")
    if q.shape[3] < 1 or k.shape[2] < 1:
        raise ValueError(f"head_dim and the key length must be at least 1, got q {list(q.shape)}, "
                         f"k {list(k.shape)}")

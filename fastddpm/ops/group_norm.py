"""`group_norm_silu`: GroupNorm (+ pre-norm add) + affine + scale-shift + SiLU as one custom op.

    u = x + add[n, c]                                   (add: DDPM's additive time embedding)
    y = GroupNorm(u) * weight[c] + bias[c]              (statistics of u per (n, group))
    y = y * (1 + scale[n, c]) + shift[n, c]             (Improved DDPM's scale-shift embedding)
    y = silu(y)                                         (when silu=True)

Two custom ops (namespace ``fastddpm``), each with a plain-PyTorch reference, a Triton branch
(``fastddpm.kernels.group_norm``, imported only when that path is taken) and a fake implementation:

* ``fastddpm::group_norm_silu(x, weight, bias, add, scale, shift, groups, eps, silu) -> (y, mean, rstd)``
* ``fastddpm::group_norm_silu_backward(dy, x, weight, bias, add, scale, shift, mean, rstd, groups, silu)
  -> (dx, dweight, dbias, dadd, dscale, dshift)``

Layout: outputs (y, dx) are channels-last when x is a 4-D channels-last tensor, else contiguous, on
every path (`_out_format`); the Triton kernels read and write NCHW and channels-last in place, so
neither path copies a channels-last x, dy, y or dx.

The autograd formula saves only the inputs and the per-(n, group) ``mean`` / ``rstd`` (float32
[N, groups]; float64 for float64 inputs) and recomputes the normalized and activated values in the
backward op: no normalized or activated tensor is kept for backward.

Precision: statistics are computed in float32 whatever the input dtype (float32, bfloat16, float16):
the input is upcast first and the variance is never E[u^2] - E[u]^2: the Triton kernel is two-pass
(mean, then mean of squared deviations); the reference calls ATen's `native_group_norm` on the upcast
u, whose CPU kernel accumulates Welford moments (equally cancellation-free). Outputs have x's dtype; gradients the dtype of their input. float64 inputs are
computed in float64 by the reference (for gradcheck); the Triton kernels take fp32/bf16/fp16 only, so
float64 always uses the reference.

torch.compile: ``eps`` is passed to the op as a Python float, and torch.compile specializes on
Python floats (one graph per distinct value). ``eps`` is a constant of a model, so this costs
nothing in practice; do not pass a varying float as eps.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastddpm.kernels.checks import check_group_norm
from .backend import use_triton

__all__ = ["group_norm_silu"]

_LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _take_triton(x: Tensor) -> bool:
    return x.dtype in _LOW_PRECISION and x.numel() > 0 and use_triton(x)


def _absent(x: Tensor) -> Tensor:
    """The stand-in returned by the backward op for the gradient of an input that was None."""
    return x.new_empty((0,))


# ------------------------------------------------------------------------------------ reference
def _out_format(x: Tensor) -> torch.memory_format:
    """The layout of the op's outputs (y; dx in backward) on every path (reference, Triton, fake):
    channels-last when x is a 4-D channels-last tensor (the CPU's fast convolution layout, see
    `backend.preferred_memory_format`; the Triton kernels read and write it in place), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _per_channel(t: Optional[Tensor], cd: torch.dtype, x: Tensor) -> Optional[Tensor]:
    """[C] -> [1, C, 1, ...] (broadcasting against x) in the compute dtype."""
    return None if t is None else t.to(cd).reshape(1, -1, *([1] * (x.dim() - 2)))


def _per_sample_channel(t: Optional[Tensor], cd: torch.dtype, x: Tensor) -> Optional[Tensor]:
    """[N, C] -> [N, C, 1, ...] (broadcasting against x) in the compute dtype."""
    return None if t is None else t.to(cd).reshape(*t.shape, *([1] * (x.dim() - 2)))


def _per_group(stat: Tensor, cd: torch.dtype, x: Tensor) -> Tensor:
    """[N, groups] -> [N, C, 1, ...]: each group's value repeated over its channels."""
    n, c = x.shape[0], x.shape[1]
    return stat.to(cd).repeat_interleave(c // stat.shape[1], dim=1).reshape(n, c, *([1] * (x.dim() - 2)))


# ATen's group norm output is folded, y = u * (rstd w) + (beta - mean rstd w): its rounding error grows
# like |mean| * rstd ulps. It is kept only where max |mean| * rstd <= this bound (error < ~1e-6 relative
# to the output's scale in float32); other inputs (e.g. a group of nearly equal values) get the exact
# centered form (u - mean) * rstd, as the Triton kernel computes it.
_FOLD_LIMIT = 8.0


def _reference_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], add: Optional[Tensor],
                       scale: Optional[Tensor], shift: Optional[Tensor], groups: int, eps: float,
                       silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """mean/rstd (and y_hat) from ATen's `native_group_norm` on the upcast u (its CPU kernel: Welford
    moments, in the compute dtype); weight/bias/scale/shift folded into one per-(n, c) affine
    y = y_hat * A + B (one pass; inside ATen's pass when there is no scale/shift); SiLU in place.
    The folded output is used on the CPU when |mean| * rstd is small (reading it there costs no device
    sync); else y_hat is recomputed centered, (u - mean) * rstd (two more passes).
    Every step keeps x's layout (ATen's kernel has a channels-last path), so a channels-last x is
    never copied to NCHW and back."""
    cd = _compute_dtype(x)
    fmt = _out_format(x)
    n, c = x.shape[0], x.shape[1]
    hw = math.prod(x.shape[2:])
    u = x.to(cd)  # x itself (never written) when x is already in the compute dtype
    if add is not None:
        u = u + _per_sample_channel(add, cd, x)
    u = u.contiguous(memory_format=fmt)  # ATen's kernel needs a dense layout (a view of a sliced x may not be)
    mean0 = None
    if fmt == torch.channels_last:
        # ATen's channels-last CPU kernel takes the variance as E[u^2] - E[u]^2 (it loses everything for a
        # group whose |mean| >> std). Subtracting each group's mean first (pass 1: per-channel sums) makes
        # that kernel the second pass of a two-pass variance: E[d] ~ 0, so nothing cancels.
        mean0 = u.sum((2, 3)).reshape(n, groups, -1).sum(-1) / (hw * (c // groups))
        u = u - _per_group(mean0, cd, x)
    w = _per_channel(weight, cd, x)
    b = _per_channel(bias, cd, x)
    native_affine = scale is None and shift is None
    z, mean, rstd = torch.ops.aten.native_group_norm(
        u, None if not native_affine or w is None else w.reshape(c),
        None if not native_affine or b is None else b.reshape(c), n, c, hw, groups, eps)
    # centered u (channels-last) has |mean| ~ 0: the folded output is exact there, no check needed
    folded_ok = mean0 is not None or (u.device.type == "cpu" and mean.numel() > 0
                                      and float((mean.abs() * rstd).amax()) <= _FOLD_LIMIT)
    # y = (y_hat * w + b) * (1 + scale) + shift = y_hat * A + B with A, B per (n, c) (None: 1 / 0)
    one_plus_s = 1 + _per_sample_channel(scale, cd, x) if scale is not None else None
    if one_plus_s is None:
        a_nc, b_nc = w, b
    else:
        a_nc = one_plus_s if w is None else w * one_plus_s
        b_nc = None if b is None else b * one_plus_s
    if shift is not None:
        sh = _per_sample_channel(shift, cd, x)
        b_nc = sh if b_nc is None else b_nc + sh
    if not folded_ok:
        # exact centered form: z = (u - mean) * (rstd * A) + B
        z = u - _per_group(mean, cd, x)
        rstd_c = _per_group(rstd, cd, x)
        a_nc = rstd_c if a_nc is None else rstd_c * a_nc
    elif native_affine:
        a_nc = b_nc = None  # already applied by ATen
    if mean0 is not None:
        mean = mean0 + mean  # the statistics of x (+ add) itself, as the backward op takes them
    if a_nc is not None and b_nc is not None:
        torch.addcmul(b_nc, z, a_nc, out=z)  # z = B + z * A: one pass, in place on our own temporary
    elif a_nc is not None:
        z.mul_(a_nc)
    elif b_nc is not None:
        z.add_(b_nc)
    if silu:
        z = F.silu(z, inplace=True)
    return z.to(x.dtype).contiguous(memory_format=fmt), mean, rstd


def _reference_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        add: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor],
                        mean: Tensor, rstd: Tensor, groups: int, silu: bool):
    """Explicit backward formulas, recomputing y_hat and z from x, mean and rstd.

        y_hat = (u - mean) rstd,  z1 = w y_hat + b,  z = z1 (1 + scale) + shift,  y = silu(z)
        g = dy * silu'(z) = dy * s (1 + z (1 - s)), s = sigmoid(z)        (g = dy without silu)
        dshift = sum_hw g,  dscale = sum_hw g z1,  g1 = g (1 + scale)
        dbias = sum_{n,hw} g1,  dweight = sum_{n,hw} g1 y_hat,  d_hat = g1 w
        du = rstd (d_hat - mean_group(d_hat) - y_hat mean_group(d_hat y_hat)),  dx = du,  dadd = sum_hw du

    The group means are per-channel sums then per-group sums (no reshape into groups), so every
    tensor keeps x's layout.
    """
    cd = _compute_dtype(x)
    n, c = x.shape[0], x.shape[1]
    spatial = tuple(range(2, x.dim()))
    count = (c // groups) * math.prod(x.shape[2:])  # elements per group

    def hw_sum(t: Tensor) -> Tensor:  # [N, C, *spatial] -> [N, C]
        return t.sum(spatial) if spatial else t.clone()  # (sum over dim=() would reduce everything)

    def group_mean(t_nc: Tensor) -> Tensor:  # [N, C] per-channel sums -> [N, C, 1, ...] group means
        g_mean = t_nc.reshape(n, groups, -1).sum(-1) / count
        return _per_group(g_mean, cd, x)

    u = x.to(cd)
    if add is not None:
        u = u + _per_sample_channel(add, cd, x)
    rstd_c = _per_group(rstd, cd, x)
    y_hat = (u - _per_group(mean, cd, x)) * rstd_c
    w = _per_channel(weight, cd, x)
    z1 = y_hat * w if w is not None else y_hat
    if bias is not None:
        z1 = z1 + _per_channel(bias, cd, x)
    one_plus_s = None if scale is None else 1 + _per_sample_channel(scale, cd, x)
    g = dy.to(cd)
    if silu:
        z = z1 * one_plus_s if one_plus_s is not None else z1
        if shift is not None:
            z = z + _per_sample_channel(shift, cd, x)
        sig = torch.sigmoid(z)
        g = g * (sig * (1 + z * (1 - sig)))
    dshift = hw_sum(g).to(shift.dtype) if shift is not None else _absent(x)
    dscale = hw_sum(g * z1).to(scale.dtype) if scale is not None else _absent(x)
    g1 = g * one_plus_s if one_plus_s is not None else g
    dbias = hw_sum(g1).sum(0).to(bias.dtype) if bias is not None else _absent(x)
    dweight = hw_sum(g1 * y_hat).sum(0).to(weight.dtype) if weight is not None else _absent(x)
    d_hat = g1 * w if w is not None else g1
    c1 = group_mean(hw_sum(d_hat))
    c2 = group_mean(hw_sum(d_hat * y_hat))
    du = rstd_c * (d_hat - c1 - y_hat * c2)
    dadd = hw_sum(du).to(add.dtype) if add is not None else _absent(x)
    dx = du.to(x.dtype).contiguous(memory_format=_out_format(x))
    return dx, dweight, dbias, dadd, dscale, dshift


# ---------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fastddpm::group_norm_silu", mutates_args=())
def _group_norm_silu_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], add: Optional[Tensor],
                        scale: Optional[Tensor], shift: Optional[Tensor], groups: int, eps: float,
                        silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    if _take_triton(x):
        from fastddpm.kernels.group_norm import group_norm_forward

        # the kernels read and write NCHW and channels-last in place: no copy of a channels-last x
        fmt = _out_format(x)
        y, mean, rstd = group_norm_forward(x.contiguous(memory_format=fmt), weight, bias, add, scale, shift,
                                           groups, eps, silu)
        return y, mean, rstd
    return _reference_forward(x, weight, bias, add, scale, shift, groups, eps, silu)


@_group_norm_silu_op.register_fake
def _group_norm_silu_fake(x, weight, bias, add, scale, shift, groups, eps, silu):
    stats = x.new_empty((x.shape[0], groups), dtype=_compute_dtype(x))
    return x.new_empty(x.shape).contiguous(memory_format=_out_format(x)), stats, torch.empty_like(stats)


@torch.library.custom_op("fastddpm::group_norm_silu_backward", mutates_args=())
def _group_norm_silu_backward_op(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                                 add: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor],
                                 mean: Tensor, rstd: Tensor, groups: int, silu: bool
                                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, dweight, dbias, dadd, dscale, dshift); an empty [0] tensor where the input was None."""
    if _take_triton(x):
        from fastddpm.kernels.group_norm import group_norm_backward

        fmt = _out_format(x)  # dx comes back in x's layout (channels-last read and written in place)
        grads = group_norm_backward(dy.contiguous(memory_format=fmt), x.contiguous(memory_format=fmt), weight,
                                    bias, add, scale, shift, mean, rstd, groups, silu)
        dx = grads[0]
        rest = [_absent(x) if t is None else t.contiguous() for t in grads[1:]]
        return (dx, *rest)
    return _reference_backward(dy, x, weight, bias, add, scale, shift, mean, rstd, groups, silu)


@_group_norm_silu_backward_op.register_fake
def _group_norm_silu_backward_fake(dy, x, weight, bias, add, scale, shift, mean, rstd, groups, silu):
    def like(t):
        return _absent(x) if t is None else t.new_empty(t.shape)

    dx = x.new_empty(x.shape).contiguous(memory_format=_out_format(x))
    return dx, like(weight), like(bias), like(add), like(scale), like(shift)


def _setup_context(ctx, inputs, output):
    x, weight, bias, add, scale, shift, groups, eps, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, add, scale, shift, mean, rstd)
    ctx.groups = groups
    ctx.silu = silu
    ctx.present = tuple(t is not None for t in (weight, bias, add, scale, shift))
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, add, scale, shift, mean, rstd = ctx.saved_tensors
    dx, *rest = _group_norm_silu_backward_op(dy, x, weight, bias, add, scale, shift, mean, rstd,
                                             ctx.groups, ctx.silu)
    rest = [g if present else None for g, present in zip(rest, ctx.present)]
    return (dx, *rest, None, None, None)


torch.library.register_autograd("fastddpm::group_norm_silu", _backward, setup_context=_setup_context)


# -------------------------------------------------------------------------------- public function
def group_norm_silu(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], groups: int = 32,
                    eps: float = 1e-5, add: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                    shift: Optional[Tensor] = None, silu: bool = True) -> Tensor:
    """Fused GroupNorm + affine + optional scale-shift + optional SiLU (see the module docstring).

    Args:
        x: [N, C, *spatial], float32 / bfloat16 / float16 (float64 runs the reference, for gradcheck).
        weight, bias: [C] affine parameters of the norm, or None (weight 1, bias 0).
        groups: number of groups; must divide C.
        eps: added to the variance. A Python float: torch.compile specializes on its value, which
            is a per-model constant.
        add: [N, C] added to x before the norm (DDPM's time embedding), or None.
        scale, shift: [N, C]; after the affine, y = y * (1 + scale) + shift (Improved DDPM), or None.
        silu: apply SiLU at the end.

    Returns:
        y with x's shape and dtype, channels-last when x is a 4-D channels-last tensor, else
        contiguous. Statistics are computed in float32 (float64 for
        float64 x) by a cancellation-free (two-pass / Welford) reduction. Differentiable in x, weight, bias, add, scale, shift;
        only the inputs and per-group mean/rstd are saved for backward.
    """
    check_group_norm(x, weight, bias, add, scale, shift, groups, _LOW_PRECISION + (torch.float64,))
    if not isinstance(eps, (float, int)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    if not isinstance(silu, bool):
        raise ValueError(f"silu must be True or False, got {silu!r}")
    y, _, _ = _group_norm_silu_op(x, weight, bias, add, scale, shift, groups, float(eps), silu)
    return y

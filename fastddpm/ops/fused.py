"""Op boundaries that fuse or recompute around the U-Net's convolutions and time projections.

* :func:`norm_conv` / :class:`NormConv`: conv2d(dropout(group_norm_silu(x))) keeping only x for backward
  (selective activation recomputation: the memory-lean training path of `fastddpm.UNet`).

They are custom autograd functions over the `fastddpm::group_norm_silu` ops and aten ops, so they live
here beside the custom ops, not in the modules that use them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .group_norm import group_norm_silu

__all__ = ["NormConv", "norm_conv", "dropout_noise"]


class NormConv(torch.autograd.Function):
    """conv2d(dropout(group_norm_silu(x, ...))) that keeps only x (and the small per-(n, c) terms) for
    backward: the normalized, activated (and dropped-out) tensor that the convolution reads is
    recomputed from x in backward instead of being stored (selective activation recomputation).

    Backward = the GroupNorm op's forward again, then exactly the two backward ops the plain path runs
    (`aten.convolution_backward`, `fastddpm::group_norm_silu_backward`), so the gradients equal the
    plain path's. Dropout (p > 0) keeps its keep-mask as a bool tensor (what `nn.Dropout` saves too);
    it draws the mask with `dropout_noise`, as the plain path does.
    Under autocast the convolution runs in the autocast dtype, as `F.conv2d` would (the recomputed input
    and the weight are cast the same way in backward, the gradients cast back to their inputs' dtypes).
    """

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, add, scale, shift, conv_weight, conv_bias, groups: int,
                eps: float, silu: bool, stride, padding, dilation, conv_groups: int, dropout_p: float):
        y, _, _ = torch.ops.fastddpm.group_norm_silu(x, norm_weight, norm_bias, add, scale, shift, groups, eps, silu)
        keep = None
        if dropout_p > 0.0:
            noise = dropout_noise(y, dropout_p)
            y = y * noise
            keep = noise != 0
        ctx.save_for_backward(x, norm_weight, norm_bias, add, scale, shift, conv_weight, keep)
        ctx.groups, ctx.eps, ctx.silu, ctx.dropout_p = groups, eps, silu, dropout_p
        ctx.conv = (stride, padding, dilation, conv_groups)
        ctx.has_conv_bias = conv_bias is not None
        dev = x.device.type
        ctx.conv_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        if ctx.conv_dtype is not None:
            y, conv_weight = y.to(ctx.conv_dtype), conv_weight.to(ctx.conv_dtype)
            conv_bias = None if conv_bias is None else conv_bias.to(ctx.conv_dtype)
        return F.conv2d(y, conv_weight, conv_bias, stride, padding, dilation, conv_groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, norm_weight, norm_bias, add, scale, shift, conv_weight, keep = ctx.saved_tensors
        y, mean, rstd = torch.ops.fastddpm.group_norm_silu(x, norm_weight, norm_bias, add, scale, shift,
                                                           ctx.groups, ctx.eps, ctx.silu)
        noise = None
        if keep is not None:
            noise = keep.to(y.dtype).div_(1.0 - ctx.dropout_p)
            y = y * noise
        stride, padding, dilation, conv_groups = ctx.conv
        bias_sizes = [conv_weight.shape[0]] if ctx.has_conv_bias else None
        cw = conv_weight
        if ctx.conv_dtype is not None:
            y, cw = y.to(ctx.conv_dtype), conv_weight.to(ctx.conv_dtype)
        dy, dconv_weight, dconv_bias = torch.ops.aten.convolution_backward(
            grad_out, y, cw, bias_sizes, list(stride), list(padding), list(dilation), False,
            [0] * len(stride), conv_groups, [True, True, ctx.has_conv_bias])
        if ctx.conv_dtype is not None:
            dy, dconv_weight = dy.to(x.dtype), dconv_weight.to(conv_weight.dtype)
            dconv_bias = None if dconv_bias is None else dconv_bias.to(conv_weight.dtype)
        if noise is not None:
            dy = dy * noise
        dx, dw, db, dadd, dscale, dshift = torch.ops.fastddpm.group_norm_silu_backward(
            dy, x, norm_weight, norm_bias, add, scale, shift, mean, rstd, ctx.groups, ctx.silu)
        grads = [g if t is not None else None
                 for g, t in zip((dw, db, dadd, dscale, dshift), (norm_weight, norm_bias, add, scale, shift))]
        return (dx, *grads, dconv_weight, dconv_bias if ctx.has_conv_bias else None,
                None, None, None, None, None, None, None, None)


def norm_conv(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, groups: int, eps: float,
              conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor], lean: bool,
              add: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
              shift: Optional[torch.Tensor] = None, silu: bool = True, dropout_p: float = 0.0,
              padding: int = 0) -> torch.Tensor:
    """conv2d(dropout(group_norm_silu(x, norm_weight, norm_bias, add, scale, shift, silu)), conv_weight, conv_bias)
    with stride 1 (`dropout_p` = 0 when not training). `lean` recomputes the norm's output in backward
    (`NormConv`) instead of letting the convolution save it; otherwise the plain ops run."""
    if lean:
        return NormConv.apply(x, norm_weight, norm_bias, add, scale, shift, conv_weight, conv_bias, groups,
                              float(eps), silu, (1, 1), (padding, padding), (1, 1), 1, float(dropout_p))
    h = group_norm_silu(x, norm_weight, norm_bias, groups=groups, eps=eps, add=add, scale=scale, shift=shift, silu=silu)
    if dropout_p > 0.0:
        h = h * dropout_noise(h, dropout_p)
    return F.conv2d(h, conv_weight, conv_bias, 1, padding)


def dropout_noise(y: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout's scaled keep-mask, bernoulli(1 - p) / (1 - p) (what `F.dropout` multiplies by), drawn into
    a contiguous tensor: the same mask for the same seed whatever y's layout, so the lean, plain and
    compiled paths agree (a channels-last buffer would be filled in a layout-dependent order)."""
    return torch.empty(y.shape, dtype=y.dtype, device=y.device).bernoulli_(1.0 - p).div_(1.0 - p)

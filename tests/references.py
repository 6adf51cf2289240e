"""The references the fused ops are tested against: the same math composed from plain torch functions.

One home for each oracle, shared by the op tests (tests/test_ops_*.py), the kernel tests
(tests/kernels/), the GPU tests (tests/gpu/) and the GPU check. Test files import it as ``references``
(pytest puts tests/, conftest.py's folder, on sys.path); a script (benchmarks/gpu_check.py) puts the
repository's tests/ folder first on sys.path and imports ``references`` the same way. Each function computes in
the dtype of its inputs: called on float64 tensors it is the oracle, called on the op's own dtype it is
the "what torch itself does at this precision" baseline of the low-precision bounds. None of them calls
fastddpm, so a bug in the library cannot hide in its own reference. The one exception is the last
section, a shared test model (not an oracle): the tiny class-conditional U-Net several tests run.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["group_norm_silu_reference", "attention_reference", "attention_float64", "sampler_step_float64",
           "tiny_class_conditional_unet"]


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    """A [C] or [N, C] tensor shaped to broadcast against x [N, C, *spatial] (one axis per spatial dim)."""
    return t.reshape(*t.shape, *(1,) * (x.dim() - 2))


def group_norm_silu_reference(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], groups: int, eps: float = 1e-5,
    add: Optional[Tensor] = None, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
    silu: bool = True, affine_in_norm: bool = True,
) -> Tensor:
    """`fastddpm.ops.group_norm_silu`'s math: u = x + add[n, c]; y = GroupNorm(u) * weight + bias;
    y = y * (1 + scale[n, c]) + shift[n, c]; then SiLU. Any rank >= 2 ([N, C, *spatial]); every
    optional tensor may be None.

    affine_in_norm: True passes weight and bias to `F.group_norm` (torch's own GroupNorm, whose affine
    is fused in its kernel); False applies them as separate elementwise ops after an affine-free
    `F.group_norm` (the unfused sequence a kernel replaces; also the only form taking a bias without a
    weight, which `F.group_norm` refuses). Equal in exact arithmetic; they round differently in low
    precision.
    """
    u = x + _per_channel(add, x) if add is not None else x
    if affine_in_norm:
        y = F.group_norm(u, groups, weight, bias, eps)
    else:
        y = F.group_norm(u, groups, None, None, eps)
        if weight is not None:
            y = y * _per_channel(weight, x)
        if bias is not None:
            y = y + _per_channel(bias, x)
    if scale is not None:
        y = y * (1 + _per_channel(scale, x))
    if shift is not None:
        y = y + _per_channel(shift, x)
    return F.silu(y) if silu else y


def attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """softmax(q k^T * scale) v in the inputs' dtype, q [B, heads, N, D], k/v [B, heads, M, D]; scale
    defaults to 1/sqrt(D) (then q k^T is divided by sqrt(D), as `fastddpm.ops.attention` specifies)."""
    s = q @ k.transpose(-1, -2)
    s = s / math.sqrt(q.shape[-1]) if scale is None else s * scale
    return torch.softmax(s, dim=-1) @ v


def attention_float64(
    q: Tensor, k: Tensor, v: Tensor, do: Tensor, scale: Optional[float] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The float64 oracle of an attention forward and backward: (o, lse, dq, dk, dv), all float64 on
    the inputs' device, lse = logsumexp of the scaled scores over the keys [B, heads, N]. The inputs
    are taken as they are (round them to the kernel's dtype first to compare like with like)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = q @ k.transpose(-1, -2)
    s = s / math.sqrt(q.shape[-1]) if scale is None else s * scale
    o = torch.softmax(s, dim=-1) @ v
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do.double())
    return o.detach(), torch.logsumexp(s.detach(), dim=-1), dq, dk, dv


def sampler_step_float64(
    x: Tensor, model_output: Tensor, coefs: Tensor, row: int, z: Tensor, clip: bool = True,
    learned_range: bool = False, history: Sequence[Optional[Tensor]] = (),
) -> Tuple[Tensor, Tensor]:
    """`fastddpm.ops.sampler_step`'s contract in float64 with the noise z given: returns (x_prev, x0c).

    x0 = A x + B m; x0c = clamp(x0, -1, 1) if clip; mean = P x0c + Q x + R m + P2 h1 + P3 h2 + P4 h3
    (h = history, most recent first, None entries skipped); sigma = SIGMA, or with learned_range
    SIGMA exp(0.5 (f LOG_MAX + (1 - f) LOG_MIN)), f = (v + 1) / 2; x_prev = mean + sigma z. m and v are
    model_output's first and second C channels; A.. are the columns of coefs[row] (9 or 11 columns).
    """
    c = x.shape[1]
    cols = coefs.double()[row].tolist()
    a, b, p, q, r, p2, sig, log_min, log_max = cols[:9]
    x = x.double()
    m = model_output[:, :c].double()
    x0 = a * x + b * m
    if clip:
        x0 = x0.clamp(-1, 1)
    mean = p * x0 + q * x + r * m
    for weight, h in zip((p2, *cols[9:11]), history):
        if h is not None:
            mean = mean + weight * h.double()
    if learned_range:
        f = (model_output[:, c:].double() + 1) / 2
        sigma = sig * torch.exp(0.5 * (f * log_max + (1 - f) * log_min))
    else:
        sigma = sig
    return mean + sigma * z.double(), x0


# ------------------------------------------------------------------------------------------- test models
def tiny_class_conditional_unet(num_classes: int = 3, seed: int = 0, perturb: float = 0.1):
    """A tiny 8x8 one-channel class-conditional `fastddpm.UNet` in eval mode, every parameter moved by
    `perturb` standard normals (from `seed`) so that no output is trivially zero (a fresh U-Net's zero-
    initialised output convolution would make the labels not matter)."""
    import fastddpm as fd

    torch.manual_seed(seed)
    unet = fd.UNet(image_size=8, in_channels=1, base_channels=16, channel_mults=(1,), num_res_blocks=1,
                   attention_resolutions=(), dropout=0.0, groups=4, num_classes=num_classes).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * perturb)
    return unet

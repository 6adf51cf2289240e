"""`attention(q, k, v)`: non-causal softmax attention as a custom op (flash-attention boundary).

q, k, v and the output are in the [B, heads, N, head_dim] layout of
``F.scaled_dot_product_attention``; the softmax scale is 1 / sqrt(head_dim).

Two custom ops (namespace ``fastddpm``), each with a plain-PyTorch reference, a Triton branch
(``fastddpm.kernels.attention``, imported only when that path is taken) and a fake implementation:

* ``fastddpm::attention(q, k, v) -> (o, lse)``: lse [B, heads, N] is the natural-log log-sum-exp
  of the scaled scores of each query row (float32; float64 for float64 inputs).
* ``fastddpm::attention_backward(do, q, k, v, o, lse) -> (dq, dk, dv)``: recomputes
  P = exp(q k^T * scale - lse) and uses delta = rowsum(dO * O) (see `_reference_backward`).

The autograd formula saves q, k, v, o and lse only: the N x N probability matrix is never kept.
No copies around the kernels: q, k, v (the U-Net passes strided views of its qkv projection, head_dim
stride H*W) and dO are read in place with all four strides; o and dq, dk, dv always come back
N-fastest ([B, heads, head_dim, N] memory viewed as [B, heads, N, head_dim]: the layout the U-Net's
output projection reads, so its [B, C, H, W] reshape of o is a view) on every path, fake included.
The layout is fixed, not derived from the inputs' strides: inductor may run the fake on inputs laid
out differently from the ones the kernel gets, and the outputs' strides must match the fake's.
fp32 inputs follow PyTorch's matmul switch on the Triton path: ``torch.get_float32_matmul_precision()``
"high"/"medium" (or ``torch.backends.cuda.matmul.allow_tf32``) run TF32 tensor-core dots (relative
error about 1e-3), "highest" the exact fp32 ones (about 1e-6).
The reference computes in float32 for float32 / bfloat16 / float16 inputs (float64 for float64)
and casts the outputs back to the input dtype.

Dispatch rule (per call, decided from the tensors' device, dtype and shape and the backend; see
`attention`):

1. head_dim > 256 on CUDA (the 512-wide heads of the 256x256 DDPM models): torch's
   ``F.scaled_dot_product_attention``, which picks flash / memory-efficient / cuDNN / math on CUDA
   and carries its own autograd. The Triton kernels take head_dim <= 256 only, and the reference's
   N x N scores are the slow, memory-hungry way on a GPU.
2. Otherwise the custom op. Its implementation runs the Triton kernel when the backend selects
   Triton (CUDA tensors with triton importable, or ``use_backend("triton")``) AND the kernel takes
   the input: dtype float32 / bfloat16 / float16, head_dim <= 256, non-empty, and the tensor is on
   CUDA or Triton's interpreter is active (TRITON_INTERPRET=1). Everything else runs the reference:
   float64 (the gradcheck oracle), CPU tensors, head_dim > 256 off CUDA.

Rule 1 reads only static tensor properties, so it adds no graph break under ``torch.compile``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastddpm.kernels.checks import check_attention
from .backend import launchable, use_triton

__all__ = ["attention"]

_LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)
# The largest head_dim the Triton kernels take (fastddpm.kernels.attention._MAX_HEAD_DIM; a test checks that
# they agree). Kept here so that the dispatch never imports triton.
KERNEL_MAX_HEAD_DIM = 256


def _compute_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def kernel_takes(q: Tensor, k: Tensor) -> bool:
    """Whether the Triton kernels accept these inputs (dtype, head_dim, non-empty, launchable device)."""
    return (q.dtype in _LOW_PRECISION and q.shape[-1] <= KERNEL_MAX_HEAD_DIM and q.numel() > 0
            and k.numel() > 0 and launchable(q))


def _take_triton(q: Tensor, k: Tensor) -> bool:
    return use_triton(q) and kernel_takes(q, k)


def _empty_pixel_major(t: Tensor, shape, dtype=None) -> Tensor:
    """Empty [B, H, N, D] on t's device in the ops' output layout: [B, H, D, N] memory, N fastest."""
    b, h, n, d = shape
    dtype = t.dtype if dtype is None else dtype
    # empty_strided, not a transposed view: an op output that is a view of a fresh tensor loses its
    # strides in compiled graphs (inductor then expects contiguous strides)
    return torch.empty_strided((b, h, n, d), (h * d * n, d * n, 1, n), dtype=dtype, device=t.device)


def _pixel(value: Tensor) -> Tensor:
    """value (a fresh reference result) in the ops' output layout: one copy, on the reference path only."""
    return _empty_pixel_major(value, value.shape).copy_(value)


def _sm_scale(q: Tensor) -> float:
    return 1.0 / math.sqrt(q.shape[-1])


# ------------------------------------------------------------------------------------ reference
def _reference_forward(q: Tensor, k: Tensor, v: Tensor, sm_scale: float) -> tuple[Tensor, Tensor]:
    """S = q k^T scale, m = rowmax(S), P~ = exp(S - m) (in place on S), l = rowsum(P~),
    o = (P~ v) / l, lse = m + log(l): the N x N scores are allocated once and never copied."""
    cd = _compute_dtype(q)
    s = torch.matmul(q.to(cd), k.to(cd).transpose(-1, -2)).mul_(sm_scale)
    m = s.amax(dim=-1, keepdim=True)
    p = s.sub_(m).exp_()
    rowsum = p.sum(dim=-1, keepdim=True)
    o = torch.matmul(p, v.to(cd)).div_(rowsum)
    lse = (m + rowsum.log()).squeeze(-1)
    return _pixel(o.to(q.dtype)), lse.contiguous()


def _reference_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                        sm_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Explicit formulas, P recomputed from q, k and the saved log-sum-exp:

        P = exp(q k^T scale - lse),  dV = P^T dO,  dP = dO V^T,  delta = rowsum(dO * O),
        dS = P (dP - delta),  dQ = dS K scale,  dK = dS^T Q scale
    """
    cd = _compute_dtype(q)
    qc, kc, vc, doc = q.to(cd), k.to(cd), v.to(cd), do.to(cd)
    p = torch.exp(torch.matmul(qc, kc.transpose(-1, -2)) * sm_scale - lse.to(cd).unsqueeze(-1))
    dv = torch.matmul(p.transpose(-1, -2), doc)
    dp = torch.matmul(doc, vc.transpose(-1, -2))
    delta = (doc * o.to(cd)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, kc) * sm_scale
    dk = torch.matmul(ds.transpose(-1, -2), qc) * sm_scale
    return _pixel(dq.to(q.dtype)), _pixel(dk.to(k.dtype)), _pixel(dv.to(v.dtype))


# ---------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fastddpm::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    sm_scale = _sm_scale(q)
    if _take_triton(q, k):
        from fastddpm.kernels.attention import attention_forward

        return attention_forward(q, k, v, sm_scale, out_layout="pixel")  # views read in place
    return _reference_forward(q, k, v, sm_scale)


@_attention_op.register_fake
def _attention_fake(q, k, v):
    o = _empty_pixel_major(q, (*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty(q.shape[:-1], dtype=_compute_dtype(q))
    return o, lse


@torch.library.custom_op("fastddpm::attention_backward", mutates_args=())
def _attention_backward_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor,
                           lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    sm_scale = _sm_scale(q)
    if _take_triton(q, k):
        from fastddpm.kernels.attention import attention_backward

        return attention_backward(do, q, k, v, o, lse, sm_scale, out_layout="pixel")
    return _reference_backward(do, q, k, v, o, lse, sm_scale)


@_attention_backward_op.register_fake
def _attention_backward_fake(do, q, k, v, o, lse):
    return _empty_pixel_major(q, q.shape), _empty_pixel_major(k, k.shape), _empty_pixel_major(v, v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    return _attention_backward_op(do, q, k, v, o, lse)


torch.library.register_autograd("fastddpm::attention", _backward, setup_context=_setup_context)


# -------------------------------------------------------------------------------- public function
def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(head_dim)) v, non-causal, like ``F.scaled_dot_product_attention``.

    Args:
        q: [B, heads, N, head_dim] queries.
        k, v: [B, heads, M, head_dim] keys and values (M = N for self-attention); same dtype and
            device as q: float32, bfloat16, float16 (float64 runs the reference, for gradcheck).

    Returns:
        o [B, heads, N, head_dim] in q's dtype, N-fastest ([B, heads, head_dim, N] memory: call
        `.contiguous()` for the row-major layout). Differentiable in q, k, v; only q, k, v,
        o and the per-row log-sum-exp are saved for backward.

    Dispatch: head_dim > 256 on CUDA goes to ``F.scaled_dot_product_attention`` (flash /
    memory-efficient / cuDNN, whatever torch picks; the Triton kernels stop at 256). Everything else
    goes to the ``fastddpm::attention`` custom op, which runs the Triton kernel where the backend
    selects Triton and the kernel takes the input (fp32/bf16/fp16, head_dim <= 256, CUDA or the
    interpreter), and the plain-PyTorch reference otherwise (float64 always).
    """
    check_attention(q, k, v, _LOW_PRECISION + (torch.float64,))
    if q.is_cuda and q.shape[3] > KERNEL_MAX_HEAD_DIM and q.dtype in _LOW_PRECISION:
        return F.scaled_dot_product_attention(q, k, v).contiguous()
    o, _ = _attention_op(q, k, v)
    return o

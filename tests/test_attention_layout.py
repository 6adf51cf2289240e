"""`fastddpm.ops.attention` reads the U-Net's strided q, k, v views in place and writes its outputs in the
layout the projections read (issue 13, item 2).

The U-Net's q, k, v are [B, heads, N, head_dim] views of one [B, 3C, H*W] qkv projection (head_dim
stride H*W, N stride 1) and the gradient of o arrives as a view of a [B, C, H, W] tensor. Every op
that runs inside the attention custom ops (forward and backward) is recorded with a dispatch mode,
except what Triton's interpreter does inside a kernel launch (it mirrors whole storages to emulate
device memory: not work a GPU does). Asserted: no copy of a q-sized tensor beyond what the same call
on contiguous inputs costs (both are zero), outputs N-fastest on every path (Triton, reference, fake:
the projection reads o in place), and values equal to a float64 reference (fp32 "highest": 5e-5 absolute).
"""
from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastddpm.ops as ops
from references import attention_float64

pytest.importorskip("triton")
from triton.runtime import interpreter  # noqa: E402

# these force the Triton path on CPU tensors: only the interpreter runs it (skips where TRITON_INTERPRET is off)
pytestmark = pytest.mark.usefixtures("triton_on_cpu")

A = sys.modules["fastddpm.ops.attention"]
_IMPLS = {torch.ops.fastddpm.attention.default: A._attention_op._init_fn,
          torch.ops.fastddpm.attention_backward.default: A._attention_backward_op._init_fn}
_COPIES = {torch.ops.aten.copy_.default, torch.ops.aten.clone.default, torch.ops.aten._to_copy.default,
           torch.ops.aten.contiguous.default}


class _CopyRecorder(TorchDispatchMode):
    """Records (op, numel of its output) for every aten op run inside the fastddpm attention ops,
    outside kernel launches."""

    def __init__(self):
        super().__init__()
        self.inside = 0
        self.records: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _IMPLS:  # run the op's body under this mode so its aten ops are seen
            self.inside += 1
            try:
                with self:
                    return _IMPLS[func](*args, **kwargs)
            finally:
                self.inside -= 1
        out = func(*args, **kwargs)
        if self.inside and not _Launch.active and func in _COPIES:
            self.records.append((str(func), out.numel() if isinstance(out, torch.Tensor) else 0))
        return out


class _Launch:
    active = 0


@contextlib.contextmanager
def _mark_launches(monkeypatch):
    call = interpreter.GridExecutor.__call__

    def marked(self, *args, **kwargs):
        _Launch.active += 1
        try:
            return call(self, *args, **kwargs)
        finally:
            _Launch.active -= 1

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", marked)
    yield


def _pixel_qkv(b, heads, d, n, seed):
    """q, k, v as the U-Net makes them: views of a [B, 3C, N] projection; dO a view of [B, C, N]."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, 3 * heads * d, n, generator=g).requires_grad_()
    q, k, v = qkv.reshape(b, 3, heads, d, n).transpose(-1, -2).unbind(1)
    do = torch.randn(b, heads * d, n, generator=g).reshape(b, heads, d, n).transpose(-1, -2)
    return qkv, (q, k, v), do


def _copies(monkeypatch, q, k, v, do):
    rec = _CopyRecorder()
    with _mark_launches(monkeypatch), ops.use_backend("triton"), rec:
        o = ops.attention(q, k, v)
        grads = torch.autograd.grad(o, (q, k, v), do)
    big = [r for r in rec.records if r[1] >= q.numel()]
    return big, o, grads


@pytest.mark.parametrize("heads,d,n", [(1, 32, 16), (2, 32, 49)])
def test_no_copies_of_strided_views(monkeypatch, heads, d, n):
    qkv, (q, k, v), do = _pixel_qkv(2, heads, d, n, seed=heads)
    assert q.stride(-2) == 1 and q.stride(-1) == n and not q.is_contiguous()
    strided, o, grads = _copies(monkeypatch, q, k, v, do)
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    contiguous, oc, _ = _copies(monkeypatch, qc, kc, vc, do.contiguous())
    assert strided == [] and contiguous == [], (strided, contiguous)
    # o (and dq, dk, dv) come back N-fastest like q: the U-Net's [B, C, H, W] reshape of o^T is a view.
    assert o.stride(-2) == 1 and o.stride(-1) == n
    assert o.transpose(-1, -2).reshape(2, heads * d, n).data_ptr() == o.data_ptr()
    for g, t in zip(grads, (q, k, v)):
        assert g.stride() == (heads * d * n, d * n, 1, n), g.stride()
    assert oc.stride() == o.stride()  # the ops' fixed output layout, whatever the inputs' strides
    o_ref, _lse, *g_ref = attention_float64(q, k, v, do)
    for got, r in zip((o, *grads), (o_ref, *g_ref)):
        assert (got.double() - r).abs().max().item() <= 5e-5


def test_reference_and_fake_outputs_have_the_triton_layout():
    _, (q, k, v), do = _pixel_qkv(1, 1, 32, 16, seed=3)
    lse = torch.zeros(q.shape[:-1])
    with ops.use_backend("reference"):
        o_ref, _ = torch.ops.fastddpm.attention(q, k, v)
        g_ref = torch.ops.fastddpm.attention_backward(do, q, k, v, o_ref, lse)
    with ops.use_backend("triton"):
        o_tri, lse_tri = torch.ops.fastddpm.attention(q, k, v)
        g_tri = torch.ops.fastddpm.attention_backward(do, q, k, v, o_tri, lse_tri)
    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode()
    fq, fk, fv, fdo = (mode.from_tensor(t.detach()) for t in (q, k, v, do))
    assert fq.stride() == q.stride()
    with mode:
        o_fake, lse_fake = torch.ops.fastddpm.attention(fq, fk, fv)
        g_fake = torch.ops.fastddpm.attention_backward(fdo, fq, fk, fv, o_fake, lse_fake)
    for a, b_, c in zip((o_ref, *g_ref), (o_tri, *g_tri), (o_fake, *g_fake)):
        assert a.stride() == b_.stride() == c.stride(), (a.stride(), b_.stride(), c.stride())
    torch.testing.assert_close(o_ref, o_tri, rtol=0, atol=5e-5)

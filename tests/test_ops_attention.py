"""Tests of the `fastddpm::attention` op boundary (reference path, and the Triton path when present).

Oracles: F.scaled_dot_product_attention evaluated in float64 (forward), and torch autograd through
softmax(q k^T / sqrt(d)) v composed from torch functions in float64 (backward).

Errors are measured as max |ours - oracle| / max(1, max |oracle|) per tensor (`rel_err`).
Tolerances:
* float32: rel_err <= 1e-5 forward, 1e-4 per gradient.
* bfloat16 / float16: rel_err at most twice that of torch's same-precision path
  (F.scaled_dot_product_attention in that dtype, forward and backward), or one unit in the last place
  at the output scale (2**-7 bf16, 2**-10 fp16), whichever is larger. The Triton path in bf16 rounds
  P and dS to bf16 before its dots (as FlashAttention does), so there the bound is 2x torch + 1 ulp.
* float64: gradcheck with torch's default tolerances.

Dispatch: what the kernels cannot launch (head_dim above their limit, CPU tensors with the interpreter
off) takes the reference, checked against the float64 oracle.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from fastddpm.ops import attention, group_norm_silu, use_backend
from references import attention_reference

# `fastddpm.ops.attention` the attribute is the function; the module is reached through importlib
attention_op_module = importlib.import_module("fastddpm.ops.attention")

ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def make_qkv(b, h, n, d, dtype=torch.float32, m=None, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    shapes = [(b, h, n, d), (b, h, m, d), (b, h, m, d)]
    # a scale of 1.5 gives peaked softmax rows, so the test is not dominated by uniform averages
    return [(torch.randn(s, generator=g, dtype=torch.float64) * 1.5).to(dtype).requires_grad_(requires_grad)
            for s in shapes]


def rel_err(a, ref):
    a, ref = a.detach().double(), ref.detach().double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def grads(fn, qkv, do):
    o = fn(*qkv)
    return o, torch.autograd.grad(o, qkv, do)


SHAPES = [  # (B, heads, N, head_dim, M)
    (1, 1, 1, 8, None),
    (2, 3, 7, 8, None),
    (1, 2, 49, 32, None),
    (2, 1, 63, 16, None),
    (1, 2, 5, 8, 9),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_fp32(shape):
    b, h, n, d, m = shape
    qkv = make_qkv(b, h, n, d, m=m, seed=n * d, requires_grad=True)
    ref = [t.detach().double().requires_grad_(True) for t in qkv]
    do = torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    o, g = grads(attention, qkv, do.float())
    assert o.dtype == torch.float32 and o.shape == (b, h, n, d) and o.transpose(-1, -2).is_contiguous()  # N-fastest
    assert rel_err(o, F.scaled_dot_product_attention(*ref)) <= 1e-5
    _, g_ref = grads(attention_reference, ref, do)
    for a, r in zip(g, g_ref):
        assert a.dtype == torch.float32 and a.shape == r.shape
        assert rel_err(a, r) <= 1e-4


def test_lse_is_natural_log_sum_exp():
    q, k, v = make_qkv(2, 2, 6, 8, dtype=torch.float64, m=5)
    o, lse = torch.ops.fastddpm.attention(q, k, v)
    expected = torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    assert lse.shape == (2, 2, 6)
    torch.testing.assert_close(lse, expected, rtol=1e-12, atol=1e-12)
    _, lse32 = torch.ops.fastddpm.attention(*(t.to(torch.bfloat16) for t in (q, k, v)))
    assert lse32.dtype == torch.float32


def test_one_key_returns_its_value():
    """A single key gets all the probability mass: o = v for every query, and dq = dk = 0."""
    q, k, v = make_qkv(1, 2, 4, 8, m=1, requires_grad=True)
    o = attention(q, k, v)
    torch.testing.assert_close(o, v.expand(1, 2, 4, 8), rtol=0, atol=1e-6)
    dq, dk, dv = torch.autograd.grad(o.sum(), (q, k, v))
    assert dq.abs().max().item() <= 1e-6 and dk.abs().max().item() <= 1e-6
    torch.testing.assert_close(dv, torch.full_like(v, 4.0))


def test_gradcheck_float64():
    qkv = make_qkv(1, 2, 5, 4, dtype=torch.float64, m=6, requires_grad=True)
    assert torch.autograd.gradcheck(attention, tuple(qkv))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 2, 49, 32), (1, 1, 64, 64), (1, 2, 7, 16)], ids=str)
def test_low_precision_error_within_twice_torch(dtype, shape):
    b, h, n, d = shape
    qkv = make_qkv(b, h, n, d, dtype=dtype, seed=7, requires_grad=True)
    qkv_t = [t.detach().clone().requires_grad_(True) for t in qkv]
    ref = [t.detach().double().requires_grad_(True) for t in qkv]
    do = torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(3)).to(dtype)
    o, g = grads(attention, qkv, do)
    o_t, g_t = grads(F.scaled_dot_product_attention, qkv_t, do)
    o_r, g_r = grads(attention_reference, ref, do.double())
    assert o.dtype == dtype and all(t.dtype == dtype for t in g)
    for name, a, t, r in zip(["o", "dq", "dk", "dv"], (o, *g), (o_t, *g_t), (o_r, *g_r)):
        bound = max(2 * rel_err(t, r), ULP[dtype])
        assert rel_err(a, r) <= bound, f"{name}: {rel_err(a, r):.3g} > {bound:.3g}"


def test_saves_no_score_matrix():
    n = 40  # N*N = 1600 > every saved tensor's size (B*heads*N*d = 2*40*8 = 640)
    qkv = make_qkv(1, 2, n, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        o = attention(*qkv)
    assert max(t.numel() for t in saved) == 2 * n * 8
    assert sum(t.numel() for t in saved) == 4 * 2 * n * 8 + 2 * n  # q, k, v, o, lse
    o.sum().backward()


# ------------------------------------------------------------------------------- op machinery
def test_opcheck_forward():
    opcheck(torch.ops.fastddpm.attention.default, tuple(make_qkv(1, 2, 5, 4, requires_grad=True)))


def test_opcheck_backward_op():
    q, k, v = make_qkv(1, 2, 5, 4, m=3)
    o, lse = torch.ops.fastddpm.attention(q, k, v)
    do = torch.randn_like(o)
    opcheck(torch.ops.fastddpm.attention_backward.default, (do, q, k, v, o, lse),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.slow  # inductor compiles C++ for the CPU
def test_compile_fullgraph_inductor_both_ops_matches_eager():
    """torch.compile(fullgraph=True) with inductor on CPU: no graph break (fullgraph raises on one),
    forward and backward equal eager's."""
    g = torch.Generator().manual_seed(0)
    c, hw, groups = 4, 9, 2
    x = torch.randn(2, c, 3, 3, generator=g, requires_grad=True)
    w = torch.randn(c, generator=g, requires_grad=True)
    b = torch.randn(c, generator=g, requires_grad=True)
    temb = torch.randn(2, c, generator=g, requires_grad=True)

    def block(x, w, b, temb):
        h = group_norm_silu(x, w, b, groups, 1e-5, add=temb)
        t = h.reshape(2, 1, c, hw).transpose(-1, -2)  # [B, heads=1, HW, C]
        o = attention(t, t * 0.5, t + 1.0)
        return x + o.transpose(-1, -2).reshape(x.shape)

    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    # No on-disk graph caches: their keys do not cover a custom op's fake (output strides), so a graph
    # cached by an older version of the ops would be replayed with stale output layouts.
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        y_c = compiled(x, w, b, temb)
        g_c = torch.autograd.grad(y_c.square().sum(), (x, w, b, temb))
    y_e = block(x, w, b, temb)
    g_e = torch.autograd.grad(y_e.square().sum(), (x, w, b, temb))
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    for a, e in zip(g_c, g_e):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
    explanation = torch._dynamo.explain(block)(x, w, b, temb)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


# ------------------------------------------------------------------------------- validation
def test_validation():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="q must be 4-D"):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="head_dim"):
        attention(q, torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    with pytest.raises(ValueError, match="heads"):
        attention(q, torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8))
    with pytest.raises(ValueError, match="k and v"):
        attention(q, q, torch.randn(1, 2, 4, 8))
    with pytest.raises(ValueError, match="same dtype"):
        attention(q, q.double(), q)
    with pytest.raises(ValueError, match="k.dtype"):
        attention(q, q.long(), q)


# ------------------------------------------------------------------------------- Triton path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_path_matches_float64(dtype, triton_on_cpu):
    """The op's Triton branch (interpreter on CPU) against the float64 oracle, same bounds as above."""
    pytest.importorskip("triton")
    try:
        import fastddpm.kernels.attention  # noqa: F401
    except ImportError as e:  # the kernel module is written separately
        pytest.skip(f"fastddpm.kernels.attention not importable: {e}")
    qkv = make_qkv(1, 1, 37, 16, dtype=dtype, seed=5, requires_grad=True)
    qkv_t = [t.detach().clone().requires_grad_(True) for t in qkv]
    ref = [t.detach().double().requires_grad_(True) for t in qkv]
    do = torch.randn(1, 1, 37, 16, generator=torch.Generator().manual_seed(6)).to(dtype)
    with use_backend("triton"):
        o, g = grads(attention, qkv, do)
    o_t, g_t = grads(F.scaled_dot_product_attention, qkv_t, do)
    o_r, g_r = grads(attention_reference, ref, do.double())
    for name, a, t, r in zip(["o", "dq", "dk", "dv"], (o, *g), (o_t, *g_t), (o_r, *g_r)):
        assert a.dtype == dtype and a.shape == r.shape
        if dtype == torch.float32:
            bound = max(2 * rel_err(t, r), 1e-5 if name == "o" else 1e-4)
        else:  # the kernel rounds P and dS to bf16 before its dots (as FlashAttention): 2x torch + 1 ulp
            bound = 2 * rel_err(t, r) + ULP[dtype]
        assert rel_err(a, r) <= bound, f"{name}: {rel_err(a, r):.3g} > {bound:.3g}"


def test_triton_path_opcheck_fake_matches_real(triton_on_cpu):
    """Schema and fake/real agreement (shapes, dtypes, strides) of both ops on the Triton branch."""
    pytest.importorskip("triton")
    try:
        import fastddpm.kernels.attention  # noqa: F401
    except ImportError as e:
        pytest.skip(f"fastddpm.kernels.attention not importable: {e}")
    q, k, v = make_qkv(1, 2, 5, 16, dtype=torch.bfloat16, m=7)
    with use_backend("triton"):
        opcheck(torch.ops.fastddpm.attention.default, (q, k, v), test_utils=("test_schema", "test_faketensor"))
        o, lse = torch.ops.fastddpm.attention(q, k, v)
        assert lse.dtype == torch.float32 and lse.shape == (1, 2, 5)
        opcheck(torch.ops.fastddpm.attention_backward.default, (torch.randn_like(o), q, k, v, o, lse),
                test_utils=("test_schema", "test_faketensor"))


def test_non_contiguous_inputs_like_the_unet():
    """q, k, v as permuted views of one qkv projection, as the U-Net's attention block makes them."""
    b, n, c, heads = 2, 6, 8, 2
    qkv = torch.randn(b, n, 3 * c, generator=torch.Generator().manual_seed(1), requires_grad=True)
    q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    opcheck(torch.ops.fastddpm.attention.default, (q, k, v), test_utils=("test_schema", "test_faketensor"))
    o = attention(q, k, v)
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    assert rel_err(o, F.scaled_dot_product_attention(q64, k64, v64)) <= 1e-5
    (dqkv,) = torch.autograd.grad(o.square().sum(), qkv)
    qkv64 = qkv.detach().double().requires_grad_(True)
    r = attention_reference(*qkv64.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0))
    (dqkv64,) = torch.autograd.grad(r.square().sum(), qkv64)
    assert rel_err(dqkv, dqkv64) <= 1e-4


# ------------------------------------------------------------------------------- dispatch by head_dim
def test_head_dim_512_under_triton_backend_matches_float64(monkeypatch, triton_on_cpu):
    """The 512-wide heads of the 256x256 DDPM models never reach the Triton launcher (which refuses
    head_dim > 256): they take the reference, even under use_backend("triton")."""
    import fastddpm.kernels.attention as K

    def refuse(*args, **kwargs):
        raise AssertionError("head_dim 512 reached the Triton launcher")

    monkeypatch.setattr(K, "attention_forward", refuse)
    monkeypatch.setattr(K, "attention_backward", refuse)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, 16, 512, generator=g, dtype=torch.float64) for _ in range(3))
    do = torch.randn(1, 1, 16, 512, generator=g, dtype=torch.float64)
    ins = [t.float().requires_grad_(True) for t in (q, k, v)]
    with use_backend("triton"):
        o = attention(*ins)
        grads = torch.autograd.grad(o, ins, do.float())
    ref_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
    o_ref = attention_reference(*ref_in)
    g_ref = torch.autograd.grad(o_ref, ref_in, do)
    assert o.dtype == torch.float32 and o.shape == (1, 1, 16, 512)
    assert rel_err(o, o_ref) <= 1e-5
    for a, r in zip(grads, g_ref):
        assert rel_err(a, r) <= 1e-4


def test_kernel_head_dim_limit_agrees_with_the_launcher(triton_on_cpu):
    import fastddpm.kernels.attention as K

    assert attention_op_module.KERNEL_MAX_HEAD_DIM == K._MAX_HEAD_DIM
    q = torch.zeros(1, 1, 4, K._MAX_HEAD_DIM + 1)
    assert not attention_op_module.kernel_takes(q, q)
    assert attention_op_module.kernel_takes(q[..., :K._MAX_HEAD_DIM], q[..., :K._MAX_HEAD_DIM])
    assert not attention_op_module.kernel_takes(q.double()[..., :8], q.double()[..., :8])


def test_cpu_tensors_without_interpreter_take_the_reference(monkeypatch):
    """What the kernel cannot launch (CPU tensors with the interpreter off) runs the reference."""
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=g) for _ in range(3))
    with use_backend("triton"):
        assert not attention_op_module.kernel_takes(q, k)
        o = attention(q, k, v)
    assert rel_err(o, attention_reference(q.double(), k.double(), v.double())) <= 1e-5

"""Tests of the `fastddpm::group_norm_silu` op boundary (reference path, and the Triton path when present).

Oracles: the same math composed from torch functions (F.group_norm, then * (1 + scale) + shift, then
F.silu) evaluated in float64, and torch autograd through that composition for the gradients.

Tolerances:
Errors are measured as max |ours - oracle| / max(1, max |oracle|) per output tensor (`rel_err`).
* float32: |ours - float64 oracle| <= 1e-5 (forward); per gradient rel_err <= 1e-4, or twice the
  error of torch's float32 composition where that is larger (tiny groups with nearly equal values
  make the gradient ill-conditioned: rstd is large).
* bfloat16 / float16: rel_err against the float64 oracle is at most
  twice that of the same-precision torch composition, or one unit in the last place at the output
  scale (2**-7 bf16, 2**-10 fp16 relative to the largest value), whichever is larger.
* float64: gradcheck with torch's default tolerances.
"""
from __future__ import annotations

import sys
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck
from torch.utils._python_dispatch import TorchDispatchMode

from fastddpm.ops import group_norm_silu, use_backend
from references import group_norm_silu_reference

OPTIONS = {
    # name: (weight, bias, add, scale, shift, silu)
    "all": (True, True, True, True, True, True),
    "plain_group_norm": (False, False, False, False, False, False),
    "ddpm_add": (True, True, True, False, False, True),
    "scale_shift": (True, True, False, True, True, True),
    "weight_scale_nosilu": (True, False, False, True, False, False),
}

# (N, groups, channels per group, spatial)
SHAPES = [
    (2, 4, 1, (1, 1)),
    (3, 2, 3, (7, 9)),
    (1, 2, 6, (33, 33)),
    (2, 3, 6, (1, 1)),
    (2, 2, 1, (7, 9)),
    (2, 2, 3, (10,)),
    (3, 2, 2, ()),
]

# one unit in the last place at the scale of the largest value (8 / 11 significant bits)
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def make_inputs(n, groups, cpg, spatial, options, dtype=torch.float32, seed=0, param_dtype=None):
    g = torch.Generator().manual_seed(seed)
    c = groups * cpg
    use_w, use_b, use_add, use_scale, use_shift, silu = options
    param_dtype = param_dtype or dtype

    def rnd(*shape, dt=dtype, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset).to(dt)

    x = rnd(n, c, *spatial, scale=1.5, offset=0.3)
    weight = rnd(c, dt=param_dtype, offset=1.0) if use_w else None
    bias = rnd(c, dt=param_dtype, scale=0.5) if use_b else None
    add = rnd(n, c, scale=0.7) if use_add else None
    scale = rnd(n, c, scale=0.3) if use_scale else None
    shift = rnd(n, c, scale=0.3) if use_shift else None
    return dict(x=x, weight=weight, bias=bias, add=add, scale=scale, shift=shift, silu=silu, groups=groups)


def ours(inp, eps=1e-5):
    return group_norm_silu(inp["x"], inp["weight"], inp["bias"], inp["groups"], eps, inp["add"], inp["scale"],
                           inp["shift"], inp["silu"])


TENSORS = ("x", "weight", "bias", "add", "scale", "shift")


def cast(inp, dtype, requires_grad=False):
    out = dict(inp)
    for k in TENSORS:
        if inp[k] is not None:
            out[k] = inp[k].detach().to(dtype).requires_grad_(requires_grad)
    return out


def grads_of(fn, inp, dy):
    leaves = [inp[k] for k in TENSORS if inp[k] is not None]
    y = fn(inp)
    return y, torch.autograd.grad(y, leaves, dy)


def rel_err(a, ref):
    """max |a - ref| / max(1, max |ref|): relative at the tensor's scale, absolute below 1 (a gradient
    that is zero in exact arithmetic, such as dadd with one channel per group, is rounding noise)."""
    a, ref = a.detach().double(), ref.detach().double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


# ------------------------------------------------------------------------------- forward / backward
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}G{s[1]}cpg{s[2]}sp{'x'.join(map(str, s[3])) or 'none'}")
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_forward_backward_fp32_vs_torch_float64(shape, opt):
    n, groups, cpg, spatial = shape
    inp32 = cast(make_inputs(n, groups, cpg, spatial, OPTIONS[opt], seed=zlib.crc32(repr((shape, opt)).encode()) % 1000), torch.float32, True)
    inp64 = cast(inp32, torch.float64, True)
    dy = torch.randn(inp32["x"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y, g = grads_of(ours, inp32, dy.float())
    y_ref, g_ref = grads_of(lambda i: group_norm_silu_reference(**i), inp64, dy)
    _, g_torch = grads_of(lambda i: group_norm_silu_reference(**i), cast(inp32, torch.float32, True), dy.float())
    assert y.dtype == torch.float32 and y.shape == inp32["x"].shape and y.is_contiguous()
    torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=1e-5)
    for got, ref, t32 in zip(g, g_ref, g_torch):
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert rel_err(got, ref) <= max(1e-4, 2 * rel_err(t32, ref))


def test_group_of_one_element_gives_bias():
    """cpg 1 and H*W 1: variance 0, y_hat 0, so y = silu(bias * (1 + scale) + shift) and dx = 0."""
    inp = cast(make_inputs(2, 4, 1, (1, 1), OPTIONS["all"]), torch.float32, True)
    y = ours(inp)
    extra = (1, 1)
    expected = F.silu(inp["bias"].reshape(1, -1, 1, 1) * (1 + inp["scale"].reshape(2, 4, *extra))
                      + inp["shift"].reshape(2, 4, *extra))
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    (dx,) = torch.autograd.grad(y.sum(), inp["x"])
    assert dx.abs().max().item() == 0.0


@pytest.mark.parametrize("opt", ["all", "plain_group_norm", "weight_scale_nosilu"])
def test_gradcheck_float64(opt):
    inp = cast(make_inputs(2, 2, 3, (3, 2), OPTIONS[opt]), torch.float64, True)
    names = [k for k in TENSORS if inp[k] is not None]

    def fn(*tensors):
        d = dict(inp)
        d.update(zip(names, tensors))
        return ours(d)

    assert torch.autograd.gradcheck(fn, tuple(inp[k] for k in names))


def test_float64_mean_rstd_match_two_pass_statistics():
    inp = make_inputs(2, 2, 3, (4, 5), OPTIONS["all"], dtype=torch.float64)
    y, mean, rstd = torch.ops.fastddpm.group_norm_silu(inp["x"], inp["weight"], inp["bias"], inp["add"],
                                                        inp["scale"], inp["shift"], 2, 1e-5, True)
    u = (inp["x"] + inp["add"][:, :, None, None]).reshape(2, 2, -1)
    torch.testing.assert_close(mean, u.mean(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rstd, (u.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_statistics_are_float32(dtype):
    inp = make_inputs(2, 2, 3, (7, 9), OPTIONS["all"], dtype=dtype)
    y, mean, rstd = torch.ops.fastddpm.group_norm_silu(inp["x"], inp["weight"], inp["bias"], inp["add"],
                                                        inp["scale"], inp["shift"], 2, 1e-5, True)
    assert y.dtype == dtype and mean.dtype == torch.float32 and rstd.dtype == torch.float32
    u = (inp["x"].double() + inp["add"].double()[:, :, None, None]).reshape(2, 2, -1)
    torch.testing.assert_close(mean.double(), u.mean(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rstd.double(), (u.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-5, atol=0)


def test_large_offset_needs_two_pass_variance():
    """mean 1e4, std 1 in float32: E[u^2] - E[u]^2 would lose the variance entirely (ulp(1e8) = 8)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) + 1e4
    y = group_norm_silu(x.float(), None, None, groups=2, silu=False)
    ref = F.group_norm(x.float().double(), 2, eps=1e-5)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 2, 3, (7, 9)), (1, 2, 6, (33, 33)), (2, 4, 1, (5, 5))], ids=str)
def test_low_precision_error_within_twice_torch(dtype, shape):
    n, groups, cpg, spatial = shape
    base = make_inputs(n, groups, cpg, spatial, OPTIONS["all"], dtype=dtype, seed=11)
    lp = cast(base, dtype, True)
    lp_torch = cast(base, dtype, True)
    ref = cast(base, torch.float64, True)
    dy = torch.randn(base["x"].shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    y, g = grads_of(ours, lp, dy)
    y_t, g_t = grads_of(lambda i: group_norm_silu_reference(**i), lp_torch, dy)
    y_r, g_r = grads_of(lambda i: group_norm_silu_reference(**i), ref, dy.double())
    assert y.dtype == dtype and all(t.dtype == dtype for t in g)
    for name, a, t, r in [("y", y, y_t, y_r)] + [(k, a, t, r) for k, a, t, r in
                                                  zip([k for k in TENSORS if base[k] is not None], g, g_t, g_r)]:
        e_ours, e_torch = rel_err(a, r), rel_err(t, r)
        bound = max(2 * e_torch, ULP[dtype])
        assert e_ours <= bound, f"{name}: error {e_ours:.3g} > {bound:.3g} (torch {dtype}: {e_torch:.3g})"


def test_mixed_dtypes_bf16_input_fp32_params():
    """Autocast-style call: bf16 activations, fp32 affine parameters; grads keep each input's dtype."""
    base = make_inputs(2, 2, 3, (4, 4), OPTIONS["all"], dtype=torch.bfloat16, param_dtype=torch.float32)
    inp = dict(base)
    for k in TENSORS:
        if base[k] is not None:
            inp[k] = base[k].clone().requires_grad_(True)
    y, g = grads_of(ours, inp, torch.ones_like(inp["x"]))
    assert y.dtype == torch.bfloat16
    assert [t.dtype for t in g] == [inp[k].dtype for k in TENSORS]
    ref = group_norm_silu_reference(**cast(base, torch.float64))
    assert rel_err(y, ref) <= ULP[torch.bfloat16]


# ------------------------------------------------------------------------------- op machinery
@pytest.mark.parametrize("opt", ["all", "plain_group_norm", "ddpm_add"])
def test_opcheck_forward(opt):
    inp = cast(make_inputs(2, 2, 3, (3, 3), OPTIONS[opt]), torch.float32, True)
    args = (inp["x"], inp["weight"], inp["bias"], inp["add"], inp["scale"], inp["shift"], 2, 1e-5, inp["silu"])
    opcheck(torch.ops.fastddpm.group_norm_silu.default, args)


def test_opcheck_backward_op():
    inp = make_inputs(2, 2, 3, (3, 3), OPTIONS["scale_shift"])
    _, mean, rstd = torch.ops.fastddpm.group_norm_silu(inp["x"], inp["weight"], inp["bias"], None, inp["scale"],
                                                        inp["shift"], 2, 1e-5, True)
    dy = torch.randn_like(inp["x"])
    args = (dy, inp["x"], inp["weight"], inp["bias"], None, inp["scale"], inp["shift"], mean, rstd, 2, True)
    opcheck(torch.ops.fastddpm.group_norm_silu_backward.default, args,
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    dx, dw, db, dadd, dscale, dshift = torch.ops.fastddpm.group_norm_silu_backward(*args)
    assert dadd.numel() == 0 and dscale.shape == (2, 6) and dw.shape == (6,)


def test_saves_only_inputs_and_statistics():
    """Nothing of x's size is saved for backward except x itself (no normalized/activated tensor)."""
    inp = cast(make_inputs(2, 2, 3, (6, 6), OPTIONS["all"]), torch.float32, True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ours(inp)
    x = inp["x"]
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    small = [t for t in saved if t.numel() < x.numel()]
    assert sum(t.numel() for t in small) <= 2 * 6 + 3 * 2 * 6 + 2 * 2 * 2
    y.sum().backward()  # the saved set is enough to differentiate


def test_compile_fullgraph_forward_backward_matches_eager():
    inp = make_inputs(2, 2, 3, (5, 5), OPTIONS["all"])
    leaves = {k: inp[k].clone().requires_grad_(True) for k in TENSORS}

    def fn(x, weight, bias, add, scale, shift):
        return group_norm_silu(x, weight, bias, 2, 1e-5, add, scale, shift) * 2.0

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    y_c = compiled(**leaves)
    g_c = torch.autograd.grad(y_c.square().sum(), list(leaves.values()))
    y_e = fn(**leaves)
    g_e = torch.autograd.grad(y_e.square().sum(), list(leaves.values()))
    torch.testing.assert_close(y_c, y_e, rtol=0, atol=0)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------- validation
def test_groups_must_divide_channels():
    x = torch.randn(2, 6, 3, 3)
    with pytest.raises(ValueError, match=r"groups=4.*C=6"):
        group_norm_silu(x, None, None, groups=4)
    with pytest.raises(ValueError, match="groups"):
        group_norm_silu(x, None, None, groups=0)


@pytest.mark.parametrize("name,value", [("weight", torch.ones(5)), ("bias", torch.ones(6, 1)),
                                        ("add", torch.ones(6)), ("scale", torch.ones(3, 6)),
                                        ("shift", torch.ones(2, 6, 1))])
def test_bad_parameter_shapes(name, value):
    kwargs = dict(weight=None, bias=None)
    kwargs[name] = value
    with pytest.raises(ValueError, match=name):
        group_norm_silu(torch.randn(2, 6, 3, 3), groups=3, **kwargs)


def test_bad_x():
    with pytest.raises(ValueError, match="x.dtype"):
        group_norm_silu(torch.ones(2, 6, 3, 3, dtype=torch.int64), None, None, groups=3)
    with pytest.raises(ValueError, match="x must have shape"):
        group_norm_silu(torch.ones(6), None, None, groups=3)
    with pytest.raises(ValueError, match="weight must be a floating"):
        group_norm_silu(torch.ones(2, 6, 3), torch.ones(6, dtype=torch.int64), None, groups=3)


# ------------------------------------------------------------------------------- Triton path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_path_matches_float64(dtype, triton_on_cpu):
    """The op's Triton branch (interpreter on CPU) against the float64 oracle, same bounds as above."""
    pytest.importorskip("triton")
    try:
        import fastddpm.kernels.group_norm  # noqa: F401
    except ImportError as e:  # the kernel module is written separately
        pytest.skip(f"fastddpm.kernels.group_norm not importable: {e}")
    base = make_inputs(2, 2, 3, (7, 9), OPTIONS["all"], dtype=dtype, seed=4)
    dy = torch.randn(base["x"].shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    with use_backend("triton"):
        y, g = grads_of(ours, cast(base, dtype, True), dy)
    y_t, g_t = grads_of(lambda i: group_norm_silu_reference(**i), cast(base, dtype, True), dy)
    y_r, g_r = grads_of(lambda i: group_norm_silu_reference(**i), cast(base, torch.float64, True), dy.double())
    assert y.dtype == dtype and y.shape == y_r.shape
    names = ["y"] + [k for k in TENSORS if base[k] is not None]
    for name, a, t, r in zip(names, (y, *g), (y_t, *g_t), (y_r, *g_r)):
        assert a.dtype == t.dtype and a.shape == r.shape
        floor = (1e-5 if name == "y" else 1e-4) if dtype == torch.float32 else ULP[dtype]
        bound = max(2 * rel_err(t, r), floor)
        assert rel_err(a, r) <= bound, f"{name}: {rel_err(a, r):.3g} > {bound:.3g}"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_triton_path_opcheck_fake_matches_real(layout, triton_on_cpu):
    """Schema and fake/real agreement (shapes, dtypes, strides) of both ops on the Triton branch, for an
    NCHW x and for a channels-last x (which the kernels read and write in place)."""
    pytest.importorskip("triton")
    try:
        import fastddpm.kernels.group_norm  # noqa: F401
    except ImportError as e:
        pytest.skip(f"fastddpm.kernels.group_norm not importable: {e}")
    inp = make_inputs(2, 2, 3, (3, 5), OPTIONS["scale_shift"], dtype=torch.bfloat16, param_dtype=torch.float32)
    if layout == "channels_last":
        inp["x"] = inp["x"].contiguous(memory_format=torch.channels_last)
    args = (inp["x"], inp["weight"], inp["bias"], None, inp["scale"], inp["shift"], 2, 1e-5, True)
    with use_backend("triton"):
        opcheck(torch.ops.fastddpm.group_norm_silu.default, args, test_utils=("test_schema", "test_faketensor"))
        _, mean, rstd = torch.ops.fastddpm.group_norm_silu(*args)
        assert mean.dtype == torch.float32 and mean.shape == (2, 2)
        bargs = (torch.randn_like(inp["x"]), *args[:6], mean, rstd, 2, True)
        opcheck(torch.ops.fastddpm.group_norm_silu_backward.default, bargs,
                test_utils=("test_schema", "test_faketensor"))
        if layout == "channels_last":
            y, _, _ = torch.ops.fastddpm.group_norm_silu(*args)
            dx = torch.ops.fastddpm.group_norm_silu_backward(*bargs)[0]
            assert y.stride() == dx.stride() == inp["x"].stride() == (90, 1, 30, 6)


class _CopyRecorder(TorchDispatchMode):
    """(op, numel) of every aten copy run inside the group_norm custom ops' bodies, outside Triton
    kernel launches (the interpreter mirrors whole storages to emulate device memory: no GPU work)."""

    _COPIES = {torch.ops.aten.copy_.default, torch.ops.aten.clone.default, torch.ops.aten._to_copy.default,
               torch.ops.aten.contiguous.default}

    def __init__(self, monkeypatch):
        super().__init__()
        from triton.runtime import interpreter

        gn = sys.modules["fastddpm.ops.group_norm"]
        self.impls = {torch.ops.fastddpm.group_norm_silu.default: gn._group_norm_silu_op._init_fn,
                      torch.ops.fastddpm.group_norm_silu_backward.default: gn._group_norm_silu_backward_op._init_fn}
        self.inside = self.launching = 0
        self.records: list = []
        launch = interpreter.GridExecutor.__call__

        def marked(grid_self, *args, **kwargs):
            self.launching += 1
            try:
                return launch(grid_self, *args, **kwargs)
            finally:
                self.launching -= 1

        monkeypatch.setattr(interpreter.GridExecutor, "__call__", marked)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.impls:  # run the op's body under this mode so that its aten ops are seen
            self.inside += 1
            try:
                with self:
                    return self.impls[func](*args, **kwargs)
            finally:
                self.inside -= 1
        out = func(*args, **kwargs)
        if self.inside and not self.launching and func in self._COPIES:
            self.records.append((str(func), out.numel() if isinstance(out, torch.Tensor) else 0))
        return out


@pytest.mark.parametrize("path", ["single_tile", "looped"])
def test_triton_channels_last_makes_no_x_sized_copy(path, monkeypatch, triton_on_cpu):
    """Forward and backward of a channels-last x (and dy) on the Triton branch copy nothing of x's size
    (before: x to NCHW and y back, dy and x to NCHW and dx back); the outputs are channels-last and equal
    the NCHW run's (float64 oracle bound of test_triton_path_matches_float64)."""
    kernels = pytest.importorskip("fastddpm.kernels.group_norm")
    if path == "looped":
        monkeypatch.setattr(kernels, "SINGLE_MAX", 0)
    base = make_inputs(2, 2, 3, (4, 5), OPTIONS["all"], seed=6)
    dy = torch.randn(base["x"].shape, generator=torch.Generator().manual_seed(7))
    cl = torch.channels_last
    inp = cast(dict(base, x=base["x"].contiguous(memory_format=cl)), torch.float32, True)
    rec = _CopyRecorder(monkeypatch)
    with use_backend("triton"), rec:
        y, g = grads_of(ours, inp, dy.contiguous(memory_format=cl))
    big = [r for r in rec.records if r[1] >= base["x"].numel()]
    assert rec.inside == 0 and big == [], big
    assert y.stride() == g[0].stride() == inp["x"].stride() and not y.is_contiguous()
    y_r, g_r = grads_of(lambda i: group_norm_silu_reference(**i), cast(base, torch.float64, True), dy.double())
    for name, a, r in zip(["y", *TENSORS], (y, *g), (y_r, *g_r)):
        assert rel_err(a, r) <= (1e-5 if name == "y" else 1e-4), name


def test_triton_channels_last_compiles_fullgraph(triton_on_cpu):
    """torch.compile(fullgraph=True) over the Triton branch with a channels-last x: the fake ops' strides
    carry the layout through the graph; values equal eager."""
    pytest.importorskip("fastddpm.kernels.group_norm")
    inp = make_inputs(2, 2, 3, (5, 5), OPTIONS["all"])
    inp["x"] = inp["x"].contiguous(memory_format=torch.channels_last)
    leaves = {k: inp[k].clone().requires_grad_(True) for k in TENSORS}

    def fn(x, weight, bias, add, scale, shift):
        return group_norm_silu(x, weight, bias, 2, 1e-5, add, scale, shift) * 2.0

    with use_backend("triton"):
        y_c = torch.compile(fn, fullgraph=True, backend="aot_eager")(**leaves)
        g_c = torch.autograd.grad(y_c.square().sum(), list(leaves.values()))
        y_e = fn(**leaves)
        g_e = torch.autograd.grad(y_e.square().sum(), list(leaves.values()))
    assert y_c.stride() == y_e.stride() == leaves["x"].stride() and g_c[0].stride() == leaves["x"].stride()
    torch.testing.assert_close(y_c, y_e, rtol=0, atol=0)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_non_contiguous_inputs_like_the_unet():
    """channels_last x and scale/shift as chunks of one [N, 2C] projection (strided views)."""
    base = make_inputs(2, 2, 3, (4, 5), OPTIONS["all"])
    x = base["x"].to(memory_format=torch.channels_last).requires_grad_(True)
    proj = torch.randn(2, 12, generator=torch.Generator().manual_seed(2), requires_grad=True)
    scale, shift = proj.chunk(2, dim=1)
    assert not scale.is_contiguous() and not x.is_contiguous()
    args = (x, base["weight"], base["bias"], None, scale, shift, 2, 1e-5, True)
    opcheck(torch.ops.fastddpm.group_norm_silu.default, args, test_utils=("test_schema", "test_faketensor"))
    y = group_norm_silu(x, base["weight"], base["bias"], 2, scale=scale, shift=shift)
    expected = group_norm_silu_reference(x.double(), base["weight"].double(), base["bias"].double(), 2,
                                         scale=scale.double(), shift=shift.double())
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-5)
    dx, dproj = torch.autograd.grad(y.square().sum(), (x, proj))
    x64, p64 = x.detach().double().requires_grad_(True), proj.detach().double().requires_grad_(True)
    s64, sh64 = p64.chunk(2, dim=1)
    r = group_norm_silu_reference(x64, base["weight"].double(), base["bias"].double(), 2, scale=s64, shift=sh64)
    dx64, dp64 = torch.autograd.grad(r.square().sum(), (x64, p64))
    assert rel_err(dx, dx64) <= 1e-4 and rel_err(dproj, dp64) <= 1e-4


@pytest.mark.parametrize("offset", [0.3, 1e3], ids=["folded", "centered"])  # 1e3: the exact centered branch
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_channels_last_layout_is_kept(opt, offset):
    """A channels-last x (the U-Net's CPU layout) gives channels-last y and dx, equal to the NCHW results,
    and the fake ops report the same strides as the real ones."""
    inp = make_inputs(2, 2, 3, (4, 5), OPTIONS[opt], seed=3)
    inp["x"] = inp["x"] + offset
    cl = dict(inp, x=inp["x"].contiguous(memory_format=torch.channels_last))
    assert not cl["x"].is_contiguous()
    args = lambda d: (d["x"], d["weight"], d["bias"], d["add"], d["scale"], d["shift"], 2, 1e-5, d["silu"])  # noqa: E731
    y_cl, mean, rstd = torch.ops.fastddpm.group_norm_silu(*args(cl))
    y_nchw, _, _ = torch.ops.fastddpm.group_norm_silu(*args(inp))
    assert y_cl.is_contiguous(memory_format=torch.channels_last) and not y_cl.is_contiguous()
    assert y_nchw.is_contiguous()
    # float32 rounds the group mean to ulp(offset) / 2 (3e-5 at 1e3), an error of that over std (1.5) in y
    tol = 1e-5 if offset < 1 else 1e-5 + 2 * torch.finfo(torch.float32).eps * offset
    expected = group_norm_silu_reference(**cast(inp, torch.float64))
    torch.testing.assert_close(y_cl.double(), expected, rtol=0, atol=tol)
    torch.testing.assert_close(y_cl, y_nchw, rtol=0, atol=2 * tol)
    dy = torch.randn(inp["x"].shape, generator=torch.Generator().manual_seed(4))
    bargs = lambda d: (dy, *args(d)[:6], mean, rstd, 2, d["silu"])  # noqa: E731
    g_cl = torch.ops.fastddpm.group_norm_silu_backward(*bargs(cl))
    g_nchw = torch.ops.fastddpm.group_norm_silu_backward(*bargs(inp))
    assert g_cl[0].is_contiguous(memory_format=torch.channels_last) and not g_cl[0].is_contiguous()
    for a, b in zip(g_cl, g_nchw):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2 * tol * (1 + (b.abs().max().item() if b.numel() else 0)))
    opcheck(torch.ops.fastddpm.group_norm_silu.default, args(cl), test_utils=("test_schema", "test_faketensor"))
    opcheck(torch.ops.fastddpm.group_norm_silu_backward.default, bargs(cl),
            test_utils=("test_schema", "test_faketensor"))

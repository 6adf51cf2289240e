"""kernels/group_norm.py against a float64 autograd reference (interpreter on CPU; GPU tests skip).

Reference: u = x + add; F.group_norm(u) * w + b; * (1 + scale) + shift; silu, all in float64 with
autograd. Tolerances (error measured against float64, relative to max |reference| of each output):
  fp32       1e-5 (fp32 statistics, single-rounding outputs; FMA contraction on)
  bf16/fp16  <= 2 x the error of the same-precision PyTorch path (F.group_norm etc. run in that
             dtype on the same inputs) + a floor of one unit of the dtype's eps.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

from fastddpm.kernels.group_norm import CONFIGS, _single_tile, group_norm_backward, group_norm_forward
from fastddpm.kernels.group_norm_specs import aot_specs, modelled_hbm_bytes
from references import group_norm_silu_reference

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
EPS = 1e-5
NAMES = ("x", "weight", "bias", "add", "scale", "shift")


def _reference(x, w, b, add, scale, shift, groups, eps, silu):
    """The unfused sequence (affine as separate ops: F.group_norm refuses a bias without a weight)."""
    return group_norm_silu_reference(x, w, b, groups, eps, add, scale, shift, silu, affine_in_norm=False)


def _inputs(n, c, h, w, *, weight=True, bias=True, add=True, scale=True, shift=True, seed=0,
            offset=0.5, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * spread + offset
    ins = [x,
           torch.randn(c, generator=g, dtype=torch.float64) if weight else None,
           torch.randn(c, generator=g, dtype=torch.float64) if bias else None,
           torch.randn(n, c, generator=g, dtype=torch.float64) if add else None,
           0.5 * torch.randn(n, c, generator=g, dtype=torch.float64) if scale else None,
           torch.randn(n, c, generator=g, dtype=torch.float64) if shift else None]
    dy = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    return ins, dy


def _ref_run(ins, dy, groups, silu, dtype=torch.float64):
    """Forward and grads of the reference sequence in `dtype` (float64: the oracle)."""
    leaves = [None if t is None else t.to(dtype).clone().requires_grad_() for t in ins]
    y = _reference(*leaves, groups, EPS, silu)
    y.backward(dy.to(dtype))
    grads = [None if t is None else t.grad for t in leaves]
    return y.detach(), grads


def _kernel_run(ins, dy, groups, silu, dtype, **kw):
    args = [None if t is None else t.to(device=DEV, dtype=dtype) for t in ins]
    y, mean, rstd = group_norm_forward(*args, groups, EPS, silu, **kw)
    grads = group_norm_backward(dy.to(device=DEV, dtype=dtype), args[0], *args[1:], mean, rstd, groups,
                                silu, **kw)
    return y, mean, rstd, list(grads)


def _err(a, ref):
    return (a.double().cpu() - ref.double().cpu()).abs().max().item()


def _scale(ref):
    return max(ref.abs().max().item(), 1.0)


def _check_fp32(ins, dy, groups, silu, **kw):
    y_ref, g_ref = _ref_run(ins, dy, groups, silu)
    y, mean, rstd, grads = _kernel_run(ins, dy, groups, silu, torch.float32, **kw)
    assert y.dtype == torch.float32 and y.shape == ins[0].shape
    assert _err(y, y_ref) <= 1e-5 * _scale(y_ref), "y"
    for name, got, want in zip(NAMES, grads, g_ref):
        if want is None:
            assert got is None, name
            continue
        assert got is not None and got.shape == want.shape and got.dtype == torch.float32, name
        assert _err(got, want) <= 1e-5 * _scale(want), (name, _err(got, want), _scale(want))
    # statistics of u = x + add in fp32 [N, G]
    x = ins[0] if ins[3] is None else ins[0] + ins[3][:, :, None, None]
    xg = x.reshape(x.shape[0], groups, -1)
    m_ref = xg.mean(-1)
    r_ref = (xg.var(-1, unbiased=False) + EPS).rsqrt()
    assert mean.dtype == torch.float32 and mean.shape == (x.shape[0], groups)
    assert _err(mean, m_ref) <= 1e-5 * _scale(m_ref)
    assert _err(rstd, r_ref) <= 1e-5 * _scale(r_ref)
    return y, grads


# ------------------------------------------------------------------------------------ option grid
# Single-tile kernels: all 64 on/off combinations of (add, scale, shift, silu, weight, bias).
# Looped kernels (block=4: 2x2 tiles per group): every combination of (add, scale, shift, silu),
# crossed with the four affine variants (w+b, none, w only, b only) in rotation.
_FULL = list(itertools.product([False, True], repeat=6))
_AFFINE = [(True, True), (False, False), (True, False), (False, True)]
_ROTATED = [(add, scale, shift, silu, *_AFFINE[i % 4])
            for i, (add, scale, shift, silu) in enumerate(itertools.product([False, True], repeat=4))]
# The quick run (-m "not slow") keeps the rotated 16 on both kernels; the other 48 single-tile ones are slow.
_GRID = ([pytest.param(*opts, None, marks=() if opts in _ROTATED else pytest.mark.slow) for opts in _FULL]
         + [(*opts, 4) for opts in _ROTATED])


@pytest.mark.parametrize("add,scale,shift,silu,weight,bias,block", _GRID)
def test_options_fp32(add, scale, shift, silu, weight, bias, block):
    ins, dy = _inputs(2, 4, 2, 3, weight=weight, bias=bias, add=add, scale=scale, shift=shift,
                      seed=hash((add, scale, shift, silu, weight, bias)) % 1000)
    _check_fp32(ins, dy, 2, silu, block=block)


# ------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("n,c,h,w,groups", [
    (2, 3, 1, 1, 3),      # 1 channel x 1 pixel per group: var 0, rstd = 1/sqrt(eps)
    (2, 6, 7, 9, 2),      # 3 channels per group, H*W = 63
    (1, 6, 33, 33, 1),    # 6 channels per group, H*W = 1089: 8 x 2048 tile > 4096, looped kernels
    (1, 2, 33, 33, 2),    # 1 channel per group, odd H*W (single tile 1 x 2048)
    (2, 12, 1, 1, 2),     # H*W = 1, 6 channels per group
])
def test_odd_shapes_fp32(n, c, h, w, groups):
    ins, dy = _inputs(n, c, h, w, seed=n * 100 + c * 10 + h)
    _check_fp32(ins, dy, groups, True)


@pytest.mark.parametrize("shape", [(2, 4, 5), (2, 4), (1, 2, 2, 3, 2)])
def test_other_ranks_fp32(shape):
    """[N, C, L], [N, C] and [N, C, D, H, W]: the spatial dims are flattened to H*W."""
    ins, dy = _inputs(*shape[:2], 1, 1, seed=19)
    g = torch.Generator().manual_seed(23)
    ins[0] = torch.randn(shape, generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    flat = (shape[0], shape[1], -1, 1)
    y_ref, g_ref = _ref_run([ins[0].reshape(flat), *ins[1:]], dy.reshape(flat), 2, True)
    y, _, _, grads = _kernel_run(ins, dy, 2, True, torch.float32)
    assert y.shape == shape and grads[0].shape == shape
    assert _err(y.reshape(flat), y_ref) <= 1e-5 * _scale(y_ref)
    for name, got, want in zip(NAMES, grads, g_ref):
        assert _err(got.reshape(want.shape), want) <= 1e-5 * _scale(want), name


@pytest.mark.parametrize("shape,groups,block", [
    ((1, 4, 7, 9), 2, 16),   # tiles [1, 16]: 4 HW tiles x 2 channels per group, masked tail
    ((2, 12, 1, 3), 2, 16),  # tiles [4, 4]: 2 channel tiles for 6 channels, masked rows
])
def test_group_spans_many_blocks(shape, groups, block):
    ins, dy = _inputs(*shape, seed=7)
    _check_fp32(ins, dy, groups, True, block=block)


@pytest.mark.parametrize("split", [2, 3])
def test_split_reduction(split):
    """HW cut into slices (grid N*G x S): stats partials + merge, per-slice backward partials.

    H*W = 49 with BLOCK 8: split 2 -> slices of 32 + 17, split 3 -> 24 + 24 + 1."""
    ins, dy = _inputs(2, 4, 7, 7, seed=11)
    _check_fp32(ins, dy, 2, True, block=8, split=split)


def test_split_plan(monkeypatch):
    """Launch plan on a 132-SM device: big groups with few programs are split along HW."""
    import fastddpm.kernels.group_norm as K

    monkeypatch.setattr(K, "_sm_count", lambda device: 132)
    dev = torch.device("cpu")
    assert K._plan(1, 32, 4, 256 * 256, dev, None, None) == (16, 4096)    # 32 groups -> 512 programs
    assert K._plan(32, 32, 4, 64 * 64, dev, None, None) == (1, 4096)      # 1024 programs: no split
    assert K._plan(8, 32, 8, 128 * 128, dev, None, None) == (2, 8192)     # 256 programs -> 512
    assert K._plan(1, 1, 4096, 16, dev, None, None) == (1, 16)            # HW too small to split
    assert K._plan(1, 2, 2, 49, dev, 8, 3) == (3, 24)                     # forced: 24 + 24 + 1


def test_large_offset_statistics():
    """mean 1e4, std 1 in fp32: a one-pass E[u^2] - E[u]^2 would lose the variance entirely."""
    ins, dy = _inputs(1, 4, 16, 16, offset=1e4, spread=1.0, add=False, seed=3)
    x32 = ins[0].float()
    _, mean, rstd = group_norm_forward(x32.to(DEV), None, None, None, None, None, 2, EPS, False,
                                       block=64)
    xg = x32.double().reshape(1, 2, -1)  # exact statistics of the fp32 input
    r_ref = (xg.var(-1, unbiased=False) + EPS).rsqrt()
    assert (rstd.double().cpu() / r_ref - 1).abs().max().item() < 1e-4
    assert _err(mean, xg.mean(-1)) < 1e-3


# ------------------------------------------------------------------------------------ low precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,groups", [((2, 6, 7, 9), 2), ((2, 4, 1, 1), 2), ((1, 4, 16, 16), 2)])
def test_low_precision_vs_torch_same_dtype(dtype, shape, groups):
    ins, dy = _inputs(*shape, seed=5)
    # round inputs to the dtype first so the oracle and both low-precision paths see the same numbers
    ins = [None if t is None else t.to(dtype).double() for t in ins]
    dy = dy.to(dtype).double()
    y_ref, g_ref = _ref_run(ins, dy, groups, True)
    y_t, g_t = _ref_run(ins, dy, groups, True, dtype=dtype)
    y, _, _, grads = _kernel_run(ins, dy, groups, True, dtype)
    floor = torch.finfo(dtype).eps
    assert y.dtype == dtype
    assert _err(y, y_ref) <= 2 * _err(y_t, y_ref) + floor * _scale(y_ref), "y"
    for name, got, want, torch_lp in zip(NAMES, grads, g_ref, g_t):
        assert got.dtype == dtype, name
        bound = 2 * _err(torch_lp, want) + floor * _scale(want)
        assert _err(got, want) <= bound, (name, _err(got, want), bound)


# ------------------------------------------------------------------------------------ channels-last
# Every path on channels-last (NHWC) x and dy: single tile, looped (block=16: [4, 4] C-first tiles,
# several per group), split (block=8, split=2: two HW slices). The kernels read and write NHWC in place;
# outputs keep the layout.
_PATHS = {"single_tile": {}, "looped": dict(block=16), "split": dict(block=8, split=2)}
_CL_OPTIONS = {  # (weight, bias, add, scale, shift, silu)
    "all": (True, True, True, True, True, True),
    "none": (False, False, False, False, False, False),
    "w_add_silu": (True, False, True, False, False, True),
    "b_scale_shift": (False, True, False, True, True, False),
}


def _to_channels_last(ins, dy):
    cl = torch.channels_last
    return [ins[0].contiguous(memory_format=cl), *ins[1:]], dy.contiguous(memory_format=cl)


def _check_channels_last(shape, groups, opts, path, seed):
    w, b, add, scale, shift, silu = opts
    ins, dy = _to_channels_last(*_inputs(*shape, weight=w, bias=b, add=add, scale=scale, shift=shift,
                                         seed=seed))
    y, grads = _check_fp32(ins, dy, groups, silu, **_PATHS[path])  # values against float64
    cl = torch.channels_last
    assert y.is_contiguous(memory_format=cl) and grads[0].is_contiguous(memory_format=cl)
    if shape[2] * shape[3] > 1:  # H*W = 1: NHWC and NCHW are the same memory, both contiguous
        assert not y.is_contiguous() and not grads[0].is_contiguous()


@pytest.mark.parametrize("path", list(_PATHS))
@pytest.mark.parametrize("opt", list(_CL_OPTIONS))
def test_channels_last_options_fp32(path, opt):
    """CPG = 3 (not a power of two: masked channel rows), H*W = 15 (masked tails)."""
    _check_channels_last((2, 6, 3, 5), 2, _CL_OPTIONS[opt], path, seed=len(opt))


@pytest.mark.parametrize("path", list(_PATHS))
@pytest.mark.parametrize("shape,groups", [
    ((2, 8, 3, 4), 2),    # CPG = 4 (ALIGN 4), H*W = 12
    ((1, 6, 1, 5), 3),    # CPG = 2, H = 1
    ((2, 12, 1, 1), 2),   # H*W = 1: channels-last is also contiguous (the NCHW kernels, same memory)
    ((1, 16, 2, 3), 1),   # CPG = 16: ALIGN capped at 8, two runs of 8 per pixel
])
def test_channels_last_shapes_fp32(path, shape, groups):
    _check_channels_last(shape, groups, _CL_OPTIONS["all"], path, seed=shape[1])


@pytest.mark.parametrize("path", list(_PATHS))
def test_channels_last_bf16_vs_torch_same_dtype(path):
    """bf16 NHWC with the per-dtype bound of test_low_precision_vs_torch_same_dtype (torch's bf16 path on
    the same values in NCHW)."""
    ins, dy = _inputs(2, 6, 3, 5, seed=8)
    ins = [None if t is None else t.to(torch.bfloat16).double() for t in ins]
    dy = dy.to(torch.bfloat16).double()
    y_ref, g_ref = _ref_run(ins, dy, 2, True)
    y_t, g_t = _ref_run(ins, dy, 2, True, dtype=torch.bfloat16)
    y, _, _, grads = _kernel_run(*_to_channels_last(ins, dy), 2, True, torch.bfloat16, **_PATHS[path])
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    floor = torch.finfo(torch.bfloat16).eps
    assert _err(y, y_ref) <= 2 * _err(y_t, y_ref) + floor * _scale(y_ref), "y"
    for name, got, want, torch_lp in zip(NAMES, grads, g_ref, g_t):
        assert got.dtype == torch.bfloat16, name
        assert _err(got, want) <= 2 * _err(torch_lp, want) + floor * _scale(want), name


@pytest.mark.parametrize("shape", [(2, 4, 5), (1, 2, 2, 3, 2)])
def test_channels_innermost_other_ranks_fp32(shape):
    """[N, C, L] and [N, C, D, H, W] stored with C innermost (movedim(1, -1) contiguous, e.g.
    channels_last_3d): read in place by the channels-last kernels, outputs in the same strides."""
    g = torch.Generator().manual_seed(29)
    ins, _ = _inputs(*shape[:2], 1, 1, seed=31)
    last = (shape[0], *shape[2:], shape[1])
    x = torch.randn(last, generator=g, dtype=torch.float64).movedim(-1, 1)
    dy = torch.randn(last, generator=g, dtype=torch.float64).movedim(-1, 1)
    assert not x.is_contiguous() and x.stride(1) == 1
    flat = (shape[0], shape[1], -1, 1)
    y_ref, g_ref = _ref_run([x.reshape(flat), *ins[1:]], dy.reshape(flat), 2, True)
    y, _, _, grads = _kernel_run([x, *ins[1:]], dy, 2, True, torch.float32)
    assert y.stride() == grads[0].stride() == x.stride()
    assert _err(y.reshape(flat), y_ref) <= 1e-5 * _scale(y_ref)
    for name, got, want in zip(NAMES, grads, g_ref):
        assert _err(got.reshape(want.shape), want) <= 1e-5 * _scale(want), name


def test_channels_last_x_with_nchw_dy():
    """dy in the other layout than x: dy is brought to x's layout, dx has x's layout; same values as
    with matching layouts."""
    ins, dy = _to_channels_last(*_inputs(2, 6, 3, 5, seed=9))
    y, mean, rstd, grads = _kernel_run(ins, dy, 2, True, torch.float32, block=16)
    args = [None if t is None else t.float() for t in ins]
    mixed = group_norm_backward(dy.float().contiguous(), args[0], *args[1:], mean, rstd, 2, True, block=16)
    assert mixed[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(grads, mixed):
        assert torch.equal(a, b)


def test_channels_last_tiles_follow_the_contiguous_axis():
    """Looped tiles: NCHW gives the HW axis the budget, channels-last the C axis (CPG first)."""
    import fastddpm.kernels.group_norm as K

    assert K._tiles(512, 4, 4096) == (1, 512) and K._tiles(512, 4, 4096, True) == (4, 128)
    assert K._tiles(16, 3, 15, True) == (4, 4) and K._tiles(8, 16, 6, True) == (8, 1)
    assert [K._align(cpg, True) for cpg in (1, 2, 3, 4, 6, 8, 16, 24)] == [1, 2, 1, 4, 2, 8, 8, 8]
    assert K._align(4, False) == 1


# ------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("split", [1, 2])
def test_deterministic(split):
    ins, dy = _inputs(2, 2, 4, 5, seed=13)
    a = _kernel_run(ins, dy, 1, True, torch.float32, block=8, split=split)
    b = _kernel_run(ins, dy, 1, True, torch.float32, block=8, split=split)
    for t, u in zip([a[0], a[1], a[2], *a[3]], [b[0], b[1], b[2], *b[3]]):
        assert torch.equal(t, u)


def test_autotuned_launch_path(monkeypatch):
    """The GPU launch path (triton.autotune over CONFIGS + tile heuristics) with a stand-in timer."""
    import fastddpm.kernels.group_norm as K

    calls = []

    def fake_bench(kernel_call, quantiles=None):
        kernel_call()
        calls.append(1)
        t = 1.0 / len(calls)  # later configs look faster: the last one is picked
        return [t, t, t]

    monkeypatch.setattr(K, "_interpret", lambda: False)
    monkeypatch.setattr(K, "CONFIGS", [(8, 4), (16, 4)])
    monkeypatch.setattr(K, "_MAX_BLOCK", 16)  # slices are multiples of the largest config's tile
    monkeypatch.setattr(K, "SINGLE_MAX", 0)   # no single-tile shortcut: the looped kernels
    monkeypatch.setattr(K, "_TUNED", {})
    monkeypatch.setattr(K, "_AUTOTUNE_DO_BENCH", fake_bench)
    ins, dy = _inputs(2, 2, 3, 7, seed=17)  # H*W = 21: split 2 -> slices of 16 + 5
    _check_fp32(ins, dy, 1, True, split=1)
    _check_fp32(ins, dy, 1, True, split=2)
    assert len(calls) == 2 * 6  # 2 configs x (fwd, bwd_dx, then stats, fwd, bwd_reduce, bwd_dx)
    assert {name for name, _ in K._TUNED} == {"stats", "fwd", "bwd_reduce", "bwd_dx"}
    # a batch in the same power-of-two bucket of programs (N * G * S) reuses the tuned configs; a larger
    # batch is tuned again (the best tile depends on how many programs share the SMs)
    _check_fp32(ins, dy, 1, True, split=1)
    assert len(calls) == 2 * 6
    big, dy_big = _inputs(8, 2, 3, 7, seed=18)
    _check_fp32(big, dy_big, 1, True, split=1)
    assert len(calls) == 2 * 6 + 2 * 2  # fwd and bwd_dx tuned again at 8 x 2 programs


def test_single_tile_warps():
    """Forward: tile / 128 warps up to 16. Backward: the same up to 2048-element tiles, 8 warps for
    4096-element ones (two groups resident per SM instead of one: docs/kernels.md)."""
    assert _single_tile(4, 1024) == (4, 1024, 16) and _single_tile(4, 1024, backward=True) == (4, 1024, 8)
    assert _single_tile(8, 256) == (8, 256, 16) and _single_tile(8, 256, backward=True) == (8, 256, 16)
    assert _single_tile(8, 64, backward=True) == (8, 64, 4) and _single_tile(1, 1) == (1, 1, 1)
    assert _single_tile(8, 1024) is None


# ------------------------------------------------------------------------------------ errors, model
def test_bad_input_raises():
    x = torch.randn(2, 6, 3, 3, device=DEV)
    with pytest.raises(ValueError, match="groups"):
        group_norm_forward(x, None, None, None, None, None, 4, EPS, True)
    with pytest.raises(ValueError, match="x.dtype"):
        group_norm_forward(x.double(), None, None, None, None, None, 2, EPS, True)
    with pytest.raises(ValueError, match="scale"):
        group_norm_forward(x, None, None, None, torch.zeros(6, device=DEV), None, 2, EPS, True)
    with pytest.raises(ValueError, match="weight"):
        group_norm_forward(x, torch.ones(5, device=DEV), None, None, None, None, 2, EPS, True)
    with pytest.raises(ValueError, match="block"):
        group_norm_forward(x, None, None, None, None, None, 2, EPS, True, block=24)
    with pytest.raises(ValueError, match="split"):
        group_norm_forward(x, None, None, None, None, None, 2, EPS, True, split=0)


def test_hbm_model_and_specs():
    m = modelled_hbm_bytes(32, 128, 64, 64, 32, 2)
    act = 32 * 128 * 64 * 64 * 2
    assert 8 * act < m["fused"] < 8.01 * act
    assert 24 * act < m["unfused"] < 24.01 * act
    assert m["fused"] <= 0.45 * m["unfused"]
    specs = aot_specs()
    kernels = {s["kernel"] for s in specs}
    looped = {"gn_stats", "gn_fwd", "gn_fwd_split", "gn_bwd_reduce", "gn_bwd_dx", "gn_bwd_dx_split"}
    assert kernels == looped | {"gn_fwd_single", "gn_bwd_single"}
    nchw = [s for s in specs if "channels_last" not in s["config"]]
    assert len([s for s in nchw if s["kernel"] in looped]) == len(looped) * len(CONFIGS) + 2
    for s in nchw:
        assert set(s["constexprs"]) <= set(s["signature"])
        assert all(s["signature"][k] == "constexpr" for k in s["constexprs"])
        assert s["constexprs"]["CHANNELS_LAST"] is False and s["constexprs"]["ALIGN"] == 1
        assert s["hbm_bytes_fused"] == m["fused"] and s["hbm_bytes_unfused"] == m["unfused"]
    # channels-last variants: every kernel once per looped/split config and per single-tile shape, built
    # from launch arguments (constexprs keyed by argument index, divisibility attributes as at launch)
    cl = [s for s in specs if "channels_last" in s["config"]]
    assert sorted(s["kernel"] for s in cl if s["kernel"] in looped) == sorted(looped)
    assert len([s for s in cl if s["kernel"].endswith("_single")]) == 6
    for s in cl:
        names = list(s["signature"])
        consts = {names[i]: v for (i,), v in s["constexprs"].items()}
        assert all(s["signature"][k] == "constexpr" for k in consts)
        assert consts["CHANNELS_LAST"] is True and consts["ALIGN"] == consts["BLOCK_C"] in (4, 8)
        assert s["attrs"][(names.index("X"),)] == [["tt.divisibility", 16]]
        assert s["attrs"][(names.index("CPG"),)] == []  # CPG 4 / 8: why the ALIGN constexpr exists


# ------------------------------------------------------------------------------------ GPU only
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@gpu
@pytest.mark.parametrize("shape,split", [((32, 128, 64, 64), None), ((1, 128, 256, 256), None),
                                         ((1, 128, 256, 256), 1)])
def test_gpu_bitwise_deterministic(shape, split):
    ins, dy = _inputs(*shape, seed=1)
    a = _kernel_run(ins, dy, 32, True, torch.bfloat16, split=split)
    b = _kernel_run(ins, dy, 32, True, torch.bfloat16, split=split)
    for t, u in zip([a[0], a[1], a[2], *a[3]], [b[0], b[1], b[2], *b[3]]):
        assert torch.equal(t, u)


@gpu
@pytest.mark.parametrize("shape", [(32, 128, 64, 64), (1, 128, 256, 256)])
def test_gpu_bf16_parity(shape):
    ins, dy = _inputs(*shape, seed=2)
    ins = [t.to(DEV) for t in ins]
    dy = dy.to(DEV)
    ins = [t.to(torch.bfloat16).double() for t in ins]
    dy = dy.to(torch.bfloat16).double()
    y_ref, g_ref = _ref_run(ins, dy, 32, True)
    y_t, g_t = _ref_run(ins, dy, 32, True, dtype=torch.bfloat16)
    y, _, _, grads = _kernel_run(ins, dy, 32, True, torch.bfloat16)
    floor = torch.finfo(torch.bfloat16).eps
    assert _err(y, y_ref) <= 2 * _err(y_t, y_ref) + floor * _scale(y_ref)
    for name, got, want, lp in zip(NAMES, grads, g_ref, g_t):
        assert _err(got, want) <= 2 * _err(lp, want) + floor * _scale(want), name


@pytest.mark.parametrize("single", [True, False], ids=["single_tile", "looped"])
def test_time_embedding_slices_are_read_in_place(single):
    """add / scale / shift as column slices of one wider [N, R] projection (the U-Net's stacked time
    projection): the launchers pass their row stride to the kernels instead of copying them, and
    every output equals the same call on contiguous copies (bitwise: same arithmetic)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    g = torch.Generator().manual_seed(21)
    n, c, h, w, groups = 2, 8, 4, 4, 2
    x = torch.randn(n, c, h, w, generator=g)
    dy = torch.randn(n, c, h, w, generator=g)
    wt, bs = torch.randn(c, generator=g), torch.randn(c, generator=g)
    proj = torch.randn(n, 5 * c, generator=g)  # [N, R]: this block's columns are a view with row stride 5C
    add, scale, shift = proj[:, c:2 * c], proj[:, 2 * c:3 * c], proj[:, 4 * c:]
    assert not add.is_contiguous() and add.stride() == (5 * c, 1)
    block = None if single else 16  # a forced block takes the looped kernels

    class Copies(TorchDispatchMode):
        seen: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default) and \
                    isinstance(out, torch.Tensor) and out.shape == (n, c):
                Copies.seen.append(str(func))
            return out

    with Copies():
        y, mean, rstd = group_norm_forward(x, wt, bs, add, scale, shift, groups, 1e-5, True, block=block)
    grads = group_norm_backward(dy, x, wt, bs, add, scale, shift, mean, rstd, groups, True, block=block)
    assert Copies.seen == [], Copies.seen
    ref = [t.contiguous() for t in (add, scale, shift)]
    y2, mean2, rstd2 = group_norm_forward(x, wt, bs, *ref, groups, 1e-5, True, block=block)
    grads2 = group_norm_backward(dy, x, wt, bs, *ref, mean2, rstd2, groups, True, block=block)
    assert torch.equal(y, y2) and torch.equal(mean, mean2) and torch.equal(rstd, rstd2)
    for a, b in zip(grads, grads2):
        assert torch.equal(a, b)
    # and against the float64 reference of this file
    y_ref = _reference(x.double(), wt.double(), bs.double(), add.double(), scale.double(), shift.double(),
                       groups, 1e-5, True)
    assert (y.double() - y_ref).abs().max().item() <= 1e-5 * max(1.0, y_ref.abs().max().item())

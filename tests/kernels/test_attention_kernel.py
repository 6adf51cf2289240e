"""kernels/attention.py against a float64 autograd reference (interpreter on CPU; GPU tests skip).

Reference: o = softmax(q k^T * sm_scale) v with autograd in float64, on the same (dtype-rounded)
inputs the kernel gets; lse against torch.logsumexp of the float64 scaled scores. Tolerances (error
measured against float64, absolute, on unit-variance data where outputs and grads are O(1)):
  fp32       o, lse: 2e-5; dq, dk, dv: 5e-5   (fp32 accumulators, ieee dots in the interpreter)
  bf16/fp16  <= 2 x the error of F.scaled_dot_product_attention (forward and autograd backward) run
             in the same dtype on the same inputs, + a floor of 2 eps(dtype) x max(max|reference|, 1)
             (lse: 2 eps(dtype) x max|lse| + 1e-3 for the scores' rounding to the input dtype).
The interpreter runs with the fixed INTERPRET_CONFIG (32 x 32 tiles), so N = 49, 100 exercise masked
tails over several blocks; a few cases force other tile shapes through `config=`.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastddpm.kernels.arch import SHARED_LIMIT_BYTES, arch_of
from fastddpm.kernels.attention import CONFIGS, attention_backward, attention_forward, dkdv_parts, fp32_precision
from fastddpm.kernels.attention_specs import AOT_VARIANTS, AOT_VARIANTS_FP32, aot_specs, modelled_hbm_bytes
from references import attention_float64

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
FP32_TOL = {"o": 2e-5, "lse": 2e-5, "grad": 5e-5}
# fp32 under torch.set_float32_matmul_precision("high"/"medium"): TF32 tensor-core dots (10-bit
# mantissa operands, fp32 accumulation), unit-scale data, absolute error vs float64. The interpreter's
# dots are exact, so only the GPU test reaches this bound; it is the one the GPU must meet.
TF32_TOL = {"o": 1e-2, "lse": 1e-2, "grad": 2e-2}


def _inputs(b, h, n_q, d, n_kv=None, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    n_kv = n_q if n_kv is None else n_kv
    q = torch.randn(b, h, n_q, d, generator=g, dtype=torch.float64) * spread
    k = torch.randn(b, h, n_kv, d, generator=g, dtype=torch.float64) * spread
    v = torch.randn(b, h, n_kv, d, generator=g, dtype=torch.float64)
    do = torch.randn(b, h, n_q, d, generator=g, dtype=torch.float64)
    return q, k, v, do


def _sdpa_errors(q, k, v, do, scale, ref):
    """Errors of F.scaled_dot_product_attention in the inputs' dtype vs the float64 reference."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, scale=scale)
    o.backward(do)
    outs = (o.detach(), q.grad, k.grad, v.grad)
    refs = (ref[0], ref[2], ref[3], ref[4])
    return [(a.double() - r).abs().max().item() for a, r in zip(outs, refs)]


def _run(b, h, n_q, d, dtype, n_kv=None, seed=0, spread=1.0, config=None, scale=None, precision=None):
    q, k, v, do = (t.to(dtype) for t in _inputs(b, h, n_q, d, n_kv, seed, spread))
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    ref = attention_float64(q, k, v, do, scale)
    o, lse = attention_forward(q.to(DEV), k.to(DEV), v.to(DEV), scale, config=config, precision=precision)
    grads = attention_backward(do.to(DEV), q.to(DEV), k.to(DEV), v.to(DEV), o, lse, scale, config=config,
                               precision=precision)
    return (q, k, v, do, scale), ref, (o, lse, *grads)


def _check(inputs, ref, got, dtype, fp32_tol=FP32_TOL):
    o, lse, dq, dk, dv = (t.cpu() for t in got)
    assert o.dtype == dtype and dq.dtype == dtype and dk.dtype == dtype and dv.dtype == dtype
    assert lse.dtype == torch.float32 and lse.shape == o.shape[:-1]
    assert o.shape == ref[0].shape and dk.shape == ref[3].shape
    for name, t in (("o", o), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), name
    err = {name: (a.double() - r).abs().max().item()
           for name, a, r in (("o", o, ref[0]), ("lse", lse, ref[1]), ("dq", dq, ref[2]),
                              ("dk", dk, ref[3]), ("dv", dv, ref[4]))}
    if dtype == torch.float32:
        assert err["o"] <= fp32_tol["o"], err
        assert err["lse"] <= fp32_tol["lse"], err
        for name in ("dq", "dk", "dv"):
            assert err[name] <= fp32_tol["grad"], (name, err)
        return err
    eps = torch.finfo(dtype).eps
    sdpa = dict(zip(("o", "dq", "dk", "dv"), _sdpa_errors(*inputs, ref)))
    for i, name in enumerate(("o", "dq", "dk", "dv")):
        r = ref[(0, 2, 3, 4)[i]]
        bound = 2 * sdpa[name] + 2 * eps * max(r.abs().max().item(), 1.0)
        assert err[name] <= bound, (name, err, sdpa)
    assert err["lse"] <= 2 * eps * ref[1].abs().max().item() + 1e-3, err
    return err


# (B, H, N, D): masked tails (1, 49, 100), an exact multiple (64), every head dim.
FP32_CASES = [(1, 2, 49, 64), (1, 1, 1, 32), (1, 1, 100, 128), (1, 1, 64, 256), (2, 1, 100, 32)]
LOWP_CASES = [(torch.bfloat16, (1, 1, 49, 64)), (torch.bfloat16, (1, 1, 100, 256)),
              (torch.bfloat16, (1, 2, 1, 128)), (torch.bfloat16, (1, 1, 64, 32)),
              (torch.float16, (1, 1, 100, 64)), (torch.float16, (1, 1, 49, 128)),
              (torch.float16, (1, 1, 64, 256))]


@pytest.mark.parametrize("shape", FP32_CASES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_float64(shape):
    inputs, ref, got = _run(*shape, torch.float32)
    _check(inputs, ref, got, torch.float32)


@pytest.mark.parametrize("dtype,shape", LOWP_CASES,
                         ids=[f"{str(dt)[6:]}-{'x'.join(map(str, s))}" for dt, s in LOWP_CASES])
def test_low_precision_within_twice_sdpa_error(dtype, shape):
    inputs, ref, got = _run(*shape, dtype)
    _check(inputs, ref, got, dtype)


def test_n256_bf16():
    inputs, ref, got = _run(1, 1, 256, 64, torch.bfloat16, seed=3)
    _check(inputs, ref, got, torch.bfloat16)


def test_n1024_unmasked_tiles():
    # N = 1024 with 128 x 128 tiles (EVEN_M / EVEN_N: the unmasked path), fp32.
    inputs, ref, got = _run(1, 1, 1024, 32, torch.float32, seed=4, config=(128, 128, 4, 1))
    _check(inputs, ref, got, torch.float32)


@pytest.mark.parametrize("config", [(16, 64, 4, 1), (64, 16, 4, 1)])
def test_other_tile_shapes(config):
    # Rectangular tiles: 100 rows over 16- and 64-row blocks, masked tails on both axes.
    inputs, ref, got = _run(1, 1, 100, 64, torch.float32, seed=5, config=config)
    _check(inputs, ref, got, torch.float32)


@pytest.mark.parametrize("d", [40, 8])
def test_head_dim_not_power_of_two(d):
    # D = 40 is padded to BLOCK_D = 64 and D = 8 to 32 (masked head-dim columns).
    inputs, ref, got = _run(1, 1, 49, d, torch.float32, seed=6)
    _check(inputs, ref, got, torch.float32)


def test_cross_attention_lengths():
    # Nq = 49 queries over Nk = 100 keys (dK/dV rows and dQ rows differ in count).
    inputs, ref, got = _run(1, 1, 49, 64, torch.float32, n_kv=100, seed=7)
    _check(inputs, ref, got, torch.float32)


def test_large_scores_are_stable():
    # Scores with std ~100 (q, k scaled by 10): exp would overflow without the running max.
    inputs, ref, got = _run(1, 1, 100, 64, torch.float32, seed=8, spread=10.0)
    o, lse = got[0], got[1]
    assert ref[1].abs().max() > 200  # the test really has huge scores
    # lse ~ 1e2..1e3: relative fp32 tolerance; o and grads absolute (P is nearly one-hot).
    assert (lse.double() - ref[1]).abs().max() <= 1e-6 * ref[1].abs().max() * 10
    assert (o.double() - ref[0]).abs().max() <= 1e-4
    for a, r in zip(got[2:], ref[2:]):
        assert (a.double() - r).abs().max() <= 1e-4 * max(1.0, r.abs().max().item())


def test_non_contiguous_inputs():
    b, h, n, d = 2, 2, 49, 32
    g = torch.Generator().manual_seed(9)
    # [B, N, H, D] storage viewed as [B, H, N, D]: strides in B/H/N are arbitrary, last dim 1.
    qs, ks, vs, dos = (torch.randn(b, n, h, d, generator=g) for _ in range(4))
    q, k, v, do = (t.permute(0, 2, 1, 3) for t in (qs, ks, vs, dos))
    # v with last-dim stride != 1: read in place through its head_dim stride.
    v = v.contiguous().transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not q.is_contiguous() and v.stride(-1) != 1
    scale = 0.3
    ref = attention_float64(q, k, v, do, scale)
    o, lse = attention_forward(q, k, v, scale)
    got = (o, lse, *attention_backward(do, q, k, v, o, lse, scale))
    _check((q, k, v, do, scale), ref, got, torch.float32)


def test_batch_heads_are_independent():
    # Each (b, h) slice equals a separate single-head call (no cross-talk through the flat grid).
    q, k, v, do = (t.float() for t in _inputs(2, 3, 33, 32, seed=10))
    o, lse = attention_forward(q, k, v, 0.2)
    o1, lse1 = attention_forward(q[1:2, 2:3].contiguous(), k[1:2, 2:3].contiguous(), v[1:2, 2:3].contiguous(), 0.2)
    torch.testing.assert_close(o[1:2, 2:3], o1, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse[1:2, 2:3], lse1, rtol=0, atol=1e-6)


def test_bad_inputs_raise():
    q = torch.randn(1, 1, 8, 32)
    with pytest.raises(ValueError, match="dtype"):
        attention_forward(q.double(), q.double(), q.double(), 0.1)
    with pytest.raises(ValueError, match="4-D"):
        attention_forward(q[0], q[0], q[0], 0.1)
    with pytest.raises(ValueError, match="head_dim"):
        big = torch.randn(1, 1, 8, 512)
        attention_forward(big, big, big, 0.1)
    with pytest.raises(ValueError, match="k and v"):
        attention_forward(q, q, torch.randn(1, 1, 9, 32), 0.1)
    with pytest.raises(ValueError, match="same dtype"):
        attention_forward(q, q.half(), q, 0.1)
    with pytest.raises(ValueError, match="sm_scale"):
        attention_forward(q, q, q, float("nan"))
    with pytest.raises(ValueError, match="config"):
        attention_forward(q, q, q, 0.1, config=(24, 32, 4, 1))
    o, lse = attention_forward(q, q, q, 0.1)
    with pytest.raises(ValueError, match="lse"):
        attention_backward(q, q, q, q, o, lse.double(), 0.1)
    with pytest.raises(ValueError, match="do"):
        attention_backward(q[:, :, :4], q, q, q, o, lse, 0.1)


def _named(spec):
    """constexprs by argument name (aot_specs keys them by argument-index tuples, as ASTSource does)."""
    names = spec["fn"].arg_names
    return {names[k[0]] if isinstance(k, tuple) else k: v for k, v in spec["constexprs"].items()}


def test_aot_specs_cover_every_config():
    specs = aot_specs()
    required = {"kernel", "config", "fn", "signature", "constexprs", "attrs", "num_warps", "num_stages",
                "hbm_bytes_fused", "hbm_bytes_unfused"}
    assert all(required <= set(s) for s in specs)
    seen = set()
    for s in specs:
        # Every argument of the kernel has a type, every constexpr a value (Triton's launcher rules).
        names = s["fn"].arg_names
        assert list(s["signature"]) == names, (s["kernel"], s["config"])
        c = _named(s)
        assert {n for n, t in s["signature"].items() if t == "constexpr"} == set(c)
        prec = "bf16" if s["signature"]["Q" if "Q" in names else "O"] == "*bf16" else c.get("PREC", "ieee")
        assert len(s["archs"]) == 1
        seen.add((s["archs"][0], s["kernel"].split("[")[0], c["HEAD_DIM"], c.get("BLOCK_M"), c.get("BLOCK_N"),
                  s["num_warps"], s["num_stages"], prec))
    for arch, tables in CONFIGS.items():
        for prec, variants in (("bf16", AOT_VARIANTS), ("tf32", AOT_VARIANTS_FP32), ("ieee", AOT_VARIANTS_FP32)):
            for d in sorted({shape[3] for shape, _ in variants}):
                for kind, name in (("fwd", "attn_fwd"), ("bwd_dkdv", "attn_bwd_dkdv"), ("bwd_dq", "attn_bwd_dq")):
                    want = prec
                    for bm, bn, w, st in tables[prec][kind][d]:
                        assert (arch, name, d, bm, bn, w, st, want) in seen, (arch, name, d, prec)
    # The runtime's specialisation is applied: unit strides and H = 1 are constants, the rest of the
    # strides carry tt.divisibility 16 at these shapes; the U-Net's pixel-major views have stride(N) = 1.
    fwd = [s for s in specs if s["kernel"] == "attn_fwd" and "128x1x256x256 pixel" in s["config"]]
    assert fwd
    for s in fwd:
        c = _named(s)
        assert c["stride_qn"] == 1 and c["H"] == 1 and "stride_qd" not in c
        idx = s["fn"].arg_names.index("stride_qd")
        assert s["attrs"][(idx,)] == [["tt.divisibility", 16]]
    assert any("masked," in s["config"] and "unmasked" not in s["config"] for s in specs)


@pytest.fixture
def matmul_precision():
    before = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)
    yield
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cuda.matmul.allow_tf32 = before[1]


def test_fp32_precision_follows_torch_switch(matmul_precision):
    torch.set_float32_matmul_precision("highest")
    assert fp32_precision() == "ieee"
    for mode in ("high", "medium"):
        torch.set_float32_matmul_precision(mode)
        assert fp32_precision() == "tf32"
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = True
    assert fp32_precision() == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = False
    # The TF32 path (tensor-core tiles, other configs) computes the same function: within TF32_TOL
    # (exact in the interpreter, whose dots are fp32).
    torch.set_float32_matmul_precision("high")
    inputs, ref, got = _run(1, 2, 49, 64, torch.float32, seed=14)
    _check(inputs, ref, got, torch.float32, TF32_TOL)
    with pytest.raises(ValueError, match="precision"):
        attention_forward(*inputs[:3], 0.1, precision="tf32x3")


def test_dkdv_split_at_head_dim_256():
    assert dkdv_parts(256, torch.bfloat16, 90) == (1, 2) and dkdv_parts(128, torch.bfloat16, 90) == (0,)
    assert dkdv_parts(256, torch.float32, 90) == (0,) and dkdv_parts(256, torch.float16, 80) == (0,)
    # the 64-row tensor-core archs split; the mma.sync archs (99 KiB ones included) run one launch
    assert dkdv_parts(256, torch.bfloat16, 100) == (1, 2)
    for arch in (86, 89, 120):
        assert dkdv_parts(256, torch.bfloat16, arch) == (0,)


def test_every_device_gets_its_own_config_table():
    """Compute capabilities map to the table of their shared-memory class (CUDA C++ Programming Guide,
    maximum shared memory per block): A10 / RTX 30xx (8.6) and L4 / RTX 40xx (8.9) are not A100 (8.0)."""
    want = {(8, 0): 80, (8, 7): 80, (8, 6): 86, (8, 9): 89, (9, 0): 90, (10, 0): 100, (10, 3): 100,
            (12, 0): 120, (7, 5): 86}
    assert {cap: arch_of(cap) for cap in want} == want
    assert SHARED_LIMIT_BYTES[86] == SHARED_LIMIT_BYTES[89] == SHARED_LIMIT_BYTES[120] == 101_376
    assert SHARED_LIMIT_BYTES[80] == 166_912 and SHARED_LIMIT_BYTES[90] == SHARED_LIMIT_BYTES[100] == 232_448
    assert set(CONFIGS) == set(SHARED_LIMIT_BYTES)
    # the sm_80 tiles that need more than 99 KiB (D = 256 bf16 forward 106,496 B, dQ 102,400 B) are not
    # in the 99 KiB tables
    for arch in (86, 89, 120):
        assert (64, 64, 8, 2) not in CONFIGS[arch]["bf16"]["fwd"][256]
        assert (64, 32, 8, 2) not in CONFIGS[arch]["bf16"]["bwd_dq"][256]


def test_autotuners_are_kept_per_batch_bucket(monkeypatch):
    """On a GPU each (kernel, head dim, dtype, arch) gets one autotuner per power-of-two bucket of
    batch * heads: Triton's key (Nq, Nk, head dim) alone would reuse a config tuned at batch 256 at 16."""
    import fastddpm.kernels.attention as K

    made = []

    class Tuned:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None  # nothing launches: only the dispatch is under test

    monkeypatch.setattr(K, "_interpret", lambda: False)
    monkeypatch.setattr(K.triton, "autotune", lambda configs, key: (lambda fn: made.append(key) or Tuned()))
    monkeypatch.setattr(K.triton, "heuristics", lambda values: (lambda fn: fn))
    monkeypatch.setattr(K, "_TUNED", {})
    for batch in (2, 2, 3, 4, 16):
        q = torch.zeros(batch, 1, 8, 32)
        attention_forward(q, q, q, 0.1)
    assert len(made) == 3  # buckets 2, 4 (batch 3 and 4), 16
    assert sorted(k[-1] for k in K._TUNED) == [2, 4, 16]


def test_hbm_model_counts():
    # Independent count at B=1, H=1, N=2, D=4, 2-byte elements: T = 16 bytes per [B,H,N,D] tensor,
    # A = 8 bytes per N x N matrix, R = 8 bytes per fp32 row vector.
    m = modelled_hbm_bytes(1, 1, 2, 4, 2)
    assert m["fwd_fused"] == 4 * 16 + 8            # q, k, v, o + lse
    assert m["bwd_fused"] == 13 * 16 + 5 * 8
    assert m["fwd_unfused"] == 8 * 16 + 4 * 8
    assert m["bwd_unfused"] == 12 * 16 + 7 * 8
    big = modelled_hbm_bytes(128, 1, 256, 256, 2)
    assert big["fused"] < 0.6 * big["unfused"]
    assert modelled_hbm_bytes(128, 1, 1024, 64, 2)["fused"] < 0.1 * modelled_hbm_bytes(128, 1, 1024, 64, 2)["unfused"]


# ---------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("shape", [(8, 1, 256, 256), (4, 4, 1024, 64), (16, 2, 64, 128), (2, 8, 1000, 32)])
def test_gpu_bf16_parity_real_shapes(shape):
    inputs, ref, got = _run(*shape, torch.bfloat16, seed=11)
    inputs = tuple(t.to(DEV) if torch.is_tensor(t) else t for t in inputs)
    ref = tuple(t.to(DEV) for t in ref)
    _check(inputs, ref, got, torch.bfloat16)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("precision,tol", [("ieee", FP32_TOL), ("tf32", TF32_TOL)])
def test_gpu_fp32_precisions(precision, tol):
    inputs, ref, got = _run(2, 2, 256, 64, torch.float32, seed=12, precision=precision)
    _check(tuple(t.to(DEV) if torch.is_tensor(t) else t for t in inputs),
           tuple(t.to(DEV) for t in ref), got, torch.float32, tol)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_backward_is_bitwise_deterministic():
    q, k, v, do = (t.to(DEV, torch.bfloat16) for t in _inputs(4, 2, 256, 64, seed=13))
    o, lse = attention_forward(q, k, v, 0.125)
    first = attention_backward(do, q, k, v, o, lse, 0.125)
    for _ in range(3):
        again = attention_backward(do, q, k, v, o, lse, 0.125)
        for a, b in zip(first, again):
            assert torch.equal(a, b)

"""kernels/sampler_step.py (interpreter on CPU) against a float64 re-implementation of the contract:

    x0 = A x + B m;  x0c = clamp(x0, -1, 1) if clip;  mean = P x0c + Q x + R m (+ P2 x0_prev)
    sigma = SIGMA (or SIGMA exp(0.5 (f LOG_MAX + (1-f) LOG_MIN)), f = (v+1)/2);  x_prev = mean + sigma z

Tolerances: fp32 outputs rtol = atol = 1e-5 against float64 (same z). bf16 / fp16 outputs: the kernel
rounds an fp32 result once, so |err| <= half an ulp of the output dtype (2**-8 resp. 2**-11 relative)
plus the fp32 evaluation error (8 fp32 ulps of the sum of the terms' magnitudes: at t = 999 A ~ -B ~ 157
and x0 = A x + B m cancels), and its max error is at most twice that of the same-precision eager PyTorch sequence.
Exception: Triton's interpreter converts fp32 -> bf16 by truncation (triton/runtime/interpreter.py,
_convert_float without a rounding mode) where the GPU rounds to nearest even, so under the interpreter
the bf16 bound is one full ulp (2**-7 relative) and the twice-eager comparison, which a truncating
store cannot meet where eager bf16 is exact (x0 ~ x), is made for fp16 only (and for bf16 on a GPU).
"""
import math
import os
import zlib

import pytest
import torch

from fastddpm.ops.philox import philox_normal
from fastddpm.schedule import NoiseSchedule
from references import sampler_step_float64

pytest.importorskip("triton")
import fastddpm.kernels.sampler_step as ks  # noqa: E402
from fastddpm.kernels.sampler_step import sampler_step_forward, sampler_step_inplace  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HALF_ULP = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# bound on |kernel - float64| relative to |float64| from the final rounding to the output dtype
OUT_ROUNDING = {**HALF_ULP, **({torch.bfloat16: 2.0**-7} if INTERPRETED else {})}


# ----------------------------------------------------------------------------- coefficient tables
def _ddpm_rows(learned: bool, steps=(999, 500, 10, 1, 0)) -> torch.Tensor:
    """DDPM rows (eps prediction) from the linear schedule, float64 -> float32 once."""
    s = NoiseSchedule.linear(1000)
    rows = []
    for t in steps:
        ab = s.alphas_cumprod[t].item()
        a, b = math.sqrt(1.0 / ab), -math.sqrt(1.0 / ab - 1.0)
        p, q = s.posterior_mean_coef1[t].item(), s.posterior_mean_coef2[t].item()
        log_min = s.posterior_log_variance_clipped[t].item()
        log_max = math.log(s.betas[t].item())
        if learned:
            sigma = 1.0 if t > 0 else 0.0
        else:
            sigma = math.exp(0.5 * log_min) if t > 0 else 0.0
        rows.append([a, b, p, q, 0.0, 0.0, sigma, log_min, log_max])
    return torch.tensor(rows, dtype=torch.float64).to(torch.float32)


def _ddim_rows(eta: float = 0.5) -> torch.Tensor:
    s = NoiseSchedule.linear(1000)
    rows = []
    for t, tp in [(999, 899), (499, 399), (99, 0)]:
        ab, abp = s.alphas_cumprod[t].item(), s.alphas_cumprod[tp].item()
        sigma = eta * math.sqrt((1 - abp) / (1 - ab) * (1 - ab / abp))
        a, b = math.sqrt(1 / ab), -math.sqrt(1 / ab - 1)
        # eps_hat = (x - sqrt(ab) x0)/sqrt(1-ab) with x0 = A x + B m is linear in x and m: here we keep
        # the x0-independent form eps_hat = m (eps prediction): direction d = sqrt(1-abp-sigma^2) * m.
        d = math.sqrt(max(1 - abp - sigma**2, 0.0))
        rows.append([a, b, math.sqrt(abp), 0.0, d, 0.0, sigma, 0.0, 0.0])
    return torch.tensor(rows, dtype=torch.float64).to(torch.float32)


def _dpmpp_rows() -> torch.Tensor:
    # x0-prediction (A=0, B=1), mean = Q x + P x0 + P2 x0_prev, no noise.
    return torch.tensor([[0.0, 1.0, 0.7, 0.45, 0.0, -0.2, 0.0, 0.0, 0.0],
                         [0.0, 1.0, 1.1, 0.10, 0.0, -0.35, 0.0, 0.0, 0.0]], dtype=torch.float64).float()


def _random_rows(n: int = 4, gen=None) -> torch.Tensor:
    r = torch.rand(n, 9, generator=gen, dtype=torch.float64) * 2 - 1
    r[:, 6] = r[:, 6].abs()
    r[:, 7] = -4 - r[:, 7].abs()
    r[:, 8] = -2 - r[:, 8].abs()
    return r.float()


# ----------------------------------------------------------------------------- float64 reference
def _reference(x, mo, coefs, step, x0_prev, z, clip, learned):
    """The contract formula in float64 (z given explicitly). Returns float64 (x_prev, x0c)."""
    return sampler_step_float64(x, mo, coefs, int(step.item()), z, clip, learned, history=(x0_prev,))


def _eager_same_precision(x, mo, coefs, step, x0_prev, z, clip, learned):
    """The eager PyTorch sequence computed in the inputs' dtype (the baseline of the low-precision bound)."""
    dt = x.dtype
    c = x.shape[1]
    row = coefs[int(step.item())].to(dt)
    m = mo[:, :c]
    x0 = row[0] * x + row[1] * m
    if clip:
        x0 = x0.clamp(-1, 1)
    mean = row[2] * x0 + row[3] * x + row[4] * m
    if x0_prev is not None:
        mean = mean + row[5] * x0_prev
    if learned:
        f = (mo[:, c:] + 1) / 2
        sigma = row[6] * torch.exp(0.5 * (f * row[8] + (1 - f) * row[7]))
    else:
        sigma = row[6]
    return mean + sigma * z.to(dt), x0


def _inputs(shape, dtype, learned, with_x0p, gen):
    n, c = shape[0], shape[1]
    x = torch.randn(shape, generator=gen).to(dtype)
    mo_shape = (n, 2 * c) + tuple(shape[2:]) if learned else shape
    mo = torch.randn(mo_shape, generator=gen)
    if learned:
        mo[:, c:] = torch.rand((n, c) + tuple(shape[2:]), generator=gen) * 2 - 1
    mo = mo.to(dtype)
    x0p = (torch.rand(shape, generator=gen) * 2 - 1).to(dtype) if with_x0p else None
    return x.to(DEVICE), mo.to(DEVICE), (x0p.to(DEVICE) if x0p is not None else None)


def _fp32_scales(x, mo, coefs, step, x0_prev, z, learned):
    """Magnitudes of the terms summed for x0 and x_prev (float64): the kernel's fp32 evaluation errs by
    a few fp32 ulps of these, which matters where the terms cancel (e.g. A ~ -B ~ 157 at t = 999)."""
    c = x.shape[1]
    a, b, p, q, r, p2, sig, log_min, log_max = coefs.double()[int(step.item())].abs().tolist()
    xa, ma = x.double().abs().cpu(), mo[:, :c].double().abs().cpu()
    s0 = a * xa + b * ma
    sp = p * s0 + q * xa + r * ma + (p2 * x0_prev.double().abs().cpu() if x0_prev is not None else 0)
    sigma = sig * (torch.exp(0.5 * torch.maximum(torch.tensor(log_min), torch.tensor(log_max))) if learned else 1.0)
    return s0, sp + sigma * z.double().abs().cpu()


def _assert_close(out, ref, dtype, eager=None, fp32_scale=None):
    out64 = out.double().cpu()
    ref = ref.cpu()
    assert out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out64, ref, rtol=1e-5, atol=1e-5)
        return
    err = (out64 - ref).abs()
    # one rounding to the output dtype, plus (when given) 8 fp32 ulps of the summed terms' magnitude
    bound = OUT_ROUNDING[dtype] * ref.abs() * (1 + 1e-5) + 1e-6
    if fp32_scale is not None:
        bound = bound + 8 * 2.0**-24 * fp32_scale
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"
    if eager is not None and not (INTERPRETED and dtype == torch.bfloat16):
        eager_err = (eager.double().cpu() - ref).abs().max().item()
        assert err.max().item() <= 2 * eager_err + 1e-6, (err.max().item(), eager_err)


CASES = [
    # name, coefs builder, step, clip, learned, x0_prev
    ("ddpm_fixed_clip", lambda: _ddpm_rows(False), 2, True, False, False),
    ("ddpm_fixed_noclip", lambda: _ddpm_rows(False), 1, False, False, False),
    ("ddpm_fixed_t0", lambda: _ddpm_rows(False), 4, True, False, False),
    ("ddpm_learned", lambda: _ddpm_rows(True), 2, True, True, False),
    ("ddpm_learned_noclip", lambda: _ddpm_rows(True), 0, False, True, False),
    ("ddim", lambda: _ddim_rows(0.5), 1, True, False, False),
    ("dpmpp", _dpmpp_rows, 1, False, False, True),
    ("random_all_terms", lambda: _random_rows(4, torch.Generator().manual_seed(9)), 3, True, True, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("noise_given", [True, False], ids=["noise", "philox"])
@pytest.mark.parametrize("name,rows,step_i,clip,learned,with_x0p", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_float64_reference(name, rows, step_i, clip, learned, with_x0p, noise_given, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) % 1000 + 7 * noise_given)  # not hash(): salted
    shape = (2, 3, 7, 9)  # 189 elements per image: masked tail in the one block
    coefs = rows().to(DEVICE)
    step = torch.tensor([step_i], dtype=torch.int64, device=DEVICE)
    seed = torch.tensor([1234], dtype=torch.int64, device=DEVICE)
    x, mo, x0p = _inputs(shape, dtype, learned, with_x0p, gen)
    image_offset = 5
    if noise_given:
        noise = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
        z = noise
    else:
        noise = None
        z = philox_normal(seed, shape, step, stream=0, image_offset=image_offset, device=DEVICE)
    x_prev, x0 = sampler_step_forward(x, mo, coefs, step, x0p, noise, seed, image_offset, clip, learned)
    ref_prev, ref_x0 = _reference(x, mo, coefs, step, x0p, z, clip, learned)
    eager_prev, eager_x0 = _eager_same_precision(x, mo, coefs, step, x0p, z, clip, learned)
    assert x_prev.shape == shape and x0.shape == shape
    scale_x0, scale_prev = _fp32_scales(x, mo, coefs, step, x0p, z, learned)
    _assert_close(x0, ref_x0, dtype, eager_x0 if dtype != torch.float32 else None, scale_x0)
    _assert_close(x_prev, ref_prev, dtype, eager_prev if dtype != torch.float32 else None, scale_prev)
    if clip:
        assert float(x0.abs().max()) <= 1.0


def test_in_kernel_noise_is_the_philox_stream_and_batch_independent():
    # A = B = P = Q = R = 0, SIGMA = 1: x_prev = z exactly (the kernel's noise).
    coefs = torch.zeros(3, 9, device=DEVICE)
    coefs[:, 6] = 1.0
    step = torch.tensor([2], dtype=torch.int64, device=DEVICE)
    seed = torch.tensor([-99], dtype=torch.int64, device=DEVICE)
    shape = (4, 3, 33, 35)  # 3465 elements: 4 blocks of 1024 with a tail
    x = torch.zeros(shape, device=DEVICE)
    z_full, _ = sampler_step_forward(x, x, coefs, step, None, None, seed, 0, False, False)
    ref = philox_normal(seed, shape, step, image_offset=0, device=DEVICE)
    tol = dict(rtol=1e-5, atol=2e-6) if DEVICE == "cuda" else dict(rtol=2e-6, atol=2e-6)  # GPU sqrt.approx
    torch.testing.assert_close(z_full.cpu(), ref.cpu(), **tol)
    # images 2..3 drawn as their own batch (offset 2) are the same numbers, bit for bit
    z_part, _ = sampler_step_forward(x[:2], x[:2], coefs, step, None, None, seed, 2, False, False)
    assert torch.equal(z_part, z_full[2:])
    # a different step row index gives different noise
    z_other, _ = sampler_step_forward(x, x, coefs, torch.tensor([1], device=DEVICE), None, None, seed, 0,
                                      False, False)
    assert not torch.equal(z_other, z_full)
    assert abs(z_full.double().mean().item()) < 5 / math.sqrt(z_full.numel())
    assert abs(z_full.double().std().item() - 1) < 0.05


def test_step_is_read_from_the_device_tensor():
    # Changing the step tensor in place (as a CUDA graph replay would) selects another row.
    coefs = _random_rows(3, torch.Generator().manual_seed(1)).to(DEVICE)
    step = torch.tensor([0], dtype=torch.int64, device=DEVICE)
    gen = torch.Generator().manual_seed(3)
    x, mo, _ = _inputs((1, 2, 5, 5), torch.float32, False, False, gen)
    noise = torch.randn(x.shape, generator=gen).to(DEVICE)
    outs = []
    for k in range(3):
        step.fill_(k)
        xp, x0 = sampler_step_forward(x, mo, coefs, step, None, noise, None, 0, True, False)
        ref_prev, ref_x0 = _reference(x, mo, coefs, step, None, noise, True, False)
        _assert_close(xp, ref_prev, torch.float32)
        outs.append(xp)
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


def test_no_noise_and_zero_sigma_give_the_mean():
    gen = torch.Generator().manual_seed(5)
    coefs = _ddpm_rows(False).to(DEVICE)
    x, mo, _ = _inputs((2, 3, 4, 4), torch.float32, False, False, gen)
    zero = torch.zeros(x.shape, device=DEVICE)
    step = torch.tensor([2], device=DEVICE)
    seed = torch.tensor([8], device=DEVICE)
    mean, _ = sampler_step_forward(x, mo, coefs, step, None, zero, None, 0, True, False)
    # noise=None, seed=None: z = 0
    no_noise, _ = sampler_step_forward(x, mo, coefs, step, None, None, None, 0, True, False)
    assert torch.equal(no_noise, mean)
    # t = 0 row has SIGMA = 0: Philox noise drawn but multiplied by zero
    step0 = torch.tensor([4], device=DEVICE)
    m0, _ = sampler_step_forward(x, mo, coefs, step0, None, zero, None, 0, True, False)
    p0, _ = sampler_step_forward(x, mo, coefs, step0, None, None, seed, 0, True, False)
    assert torch.equal(p0, m0)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 17), (2, 4, 32, 33)], ids=str)
def test_odd_shapes_and_non_contiguous_inputs(shape):
    gen = torch.Generator().manual_seed(11)
    coefs = _random_rows(2, gen).to(DEVICE)
    step = torch.tensor([1], device=DEVICE)
    big = torch.randn((shape[0], shape[1] * 2) + tuple(shape[2:]), generator=gen).to(DEVICE)
    x = big[:, ::2]  # non-contiguous view
    mo = torch.randn(shape, generator=gen).to(DEVICE)
    x0p = torch.randn(shape, generator=gen).to(DEVICE)
    seed = torch.tensor([3], device=DEVICE)
    xp, x0 = sampler_step_forward(x, mo, coefs, step, x0p, None, seed, 1, True, False)
    z = philox_normal(seed, shape, step, image_offset=1, device=DEVICE)
    ref_prev, ref_x0 = _reference(x, mo, coefs, step, x0p, z, True, False)
    _assert_close(xp, ref_prev, torch.float32)
    _assert_close(x0, ref_x0, torch.float32)


def test_empty_batch():
    x = torch.zeros((0, 3, 4, 4), device=DEVICE)
    coefs = torch.zeros(1, 9, device=DEVICE)
    xp, x0 = sampler_step_forward(x, x, coefs, torch.tensor([0], device=DEVICE), None, None, None, 0, True, False)
    assert xp.shape == x.shape and x0.shape == x.shape


def test_bad_arguments_raise_value_error():
    x = torch.zeros((2, 3, 4, 4), device=DEVICE)
    coefs = torch.zeros(2, 9, device=DEVICE)
    step = torch.tensor([0], device=DEVICE)
    with pytest.raises(ValueError, match="model_output"):
        sampler_step_forward(x, x, coefs, step, None, None, None, 0, True, True)  # needs 2C channels
    with pytest.raises(ValueError, match="coefs"):
        sampler_step_forward(x, x, coefs[:, :8].contiguous(), step, None, None, None, 0, True, False)
    with pytest.raises(ValueError, match="coefs"):
        sampler_step_forward(x, x, coefs.double(), step, None, None, None, 0, True, False)
    with pytest.raises(ValueError, match="step"):
        sampler_step_forward(x, x, coefs, step.int(), None, None, None, 0, True, False)
    with pytest.raises(ValueError, match="seed"):
        sampler_step_forward(x, x, coefs, step, None, None, torch.tensor([1.0]), 0, True, False)
    with pytest.raises(ValueError, match="noise"):
        sampler_step_forward(x, x, coefs, step, None, x[:1], None, 0, True, False)
    with pytest.raises(ValueError, match="x0_prev"):
        sampler_step_forward(x, x, coefs, step, x[:, :2], None, None, 0, True, False)
    with pytest.raises(ValueError, match="image_offset"):
        sampler_step_forward(x, x, coefs, step, None, None, None, -1, True, False)


# ----------------------------------------------------------------------------- through the op
def _op_or_skip():
    import fastddpm.ops as ops

    try:
        from fastddpm.ops.sampler_step import sampler_step
    except ImportError as exc:  # pragma: no cover
        pytest.skip(f"fastddpm.ops.sampler_step not importable: {exc}")
    x = torch.zeros(1, 1, 1, 1)
    try:
        with ops.use_backend("reference"):
            sampler_step(x, x, torch.zeros(1, 9), torch.zeros(1, dtype=torch.int64))
    except NotImplementedError:
        pytest.skip("fastddpm.ops.sampler_step is still a placeholder")
    return ops, sampler_step


@pytest.mark.parametrize("learned,with_x0p,noise_given,dtype", [
    (False, False, False, torch.float32),
    (True, False, True, torch.float32),
    (False, True, False, torch.float32),
    (True, False, False, torch.bfloat16),
])
def test_op_triton_backend_equals_reference(learned, with_x0p, noise_given, dtype):
    ops, sampler_step = _op_or_skip()
    gen = torch.Generator().manual_seed(21)
    shape = (3, 3, 6, 5)
    coefs = _random_rows(4, gen).to(DEVICE)
    step = torch.tensor([2], dtype=torch.int64, device=DEVICE)
    seed = torch.tensor([2024], dtype=torch.int64, device=DEVICE)
    x, mo, x0p = _inputs(shape, dtype, learned, with_x0p, gen)
    noise = torch.randn(shape, generator=gen).to(dtype).to(DEVICE) if noise_given else None
    kw = dict(x0_prev=x0p, noise=noise, seed=None if noise_given else seed, image_offset=4, clip=True,
              learned_range=learned)
    with ops.use_backend("reference"):
        ref_prev, ref_x0 = sampler_step(x, mo, coefs, step, **kw)
    with ops.use_backend("triton"):
        tri_prev, tri_x0 = sampler_step(x, mo, coefs, step, **kw)
    assert tri_prev.dtype == dtype and tri_x0.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(tri_prev.float(), ref_prev.float(), **tol)
    torch.testing.assert_close(tri_x0.float(), ref_x0.float(), **tol)


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bitwise_deterministic_and_bf16_at_real_shape():
    gen = torch.Generator().manual_seed(0)
    shape = (256, 3, 32, 32)
    coefs = _ddpm_rows(True).cuda()
    step = torch.tensor([1], device="cuda")
    seed = torch.tensor([77], device="cuda")
    x, mo, _ = _inputs(shape, torch.bfloat16, True, False, gen)
    a = sampler_step_forward(x, mo, coefs, step, None, None, seed, 0, True, True)
    b = sampler_step_forward(x, mo, coefs, step, None, None, seed, 0, True, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    z = philox_normal(seed, shape, step, device="cuda")
    ref_prev, ref_x0 = _reference(x, mo, coefs, step, None, z, True, True)
    eager_prev, eager_x0 = _eager_same_precision(x, mo, coefs, step, None, z, True, True)
    # GPU log/cos/exp differ from torch's by a few ulp: allow 2 bf16 half-ulps.
    err = (a[0].double() - ref_prev).abs()
    assert bool((err <= 2 * HALF_ULP[torch.bfloat16] * ref_prev.abs() + 1e-5).all())
    assert err.max().item() <= 2 * (eager_prev.double() - ref_prev).abs().max().item() + 1e-6


# ----------------------------------------------------------------------------- AOT specs
def test_aot_specs_cover_every_config_with_the_modelled_traffic():
    from fastddpm.kernels import sampler_step_specs as specs_module

    specs = specs_module.aot_specs()
    numel = 256 * 3 * 32 * 32  # the stated report shape, fp32
    by_kernel = {}
    for s in specs:
        by_kernel.setdefault(s["kernel"], []).append(s)
        fn = ks._sampler_step_inplace_kernel if s["kernel"].startswith("sampler_step_inplace[") else ks._sampler_step_kernel
        assert s["fn"] is fn
        assert set(s["signature"]) == set(fn.arg_names)
        assert s["constexprs"]["BLOCK"] & (s["constexprs"]["BLOCK"] - 1) == 0  # power of two
        assert s["options"] == {"enable_fp_fusion": False}
    for kernel, group in by_kernel.items():
        # the functional kernel is autotuned over CONFIGS; the in-place one launches INPLACE_CONFIG only
        want = [ks.INPLACE_CONFIG] if kernel.startswith("sampler_step_inplace[") else sorted(ks.CONFIGS)
        assert sorted((s["constexprs"]["BLOCK"], s["num_warps"]) for s in group) == want
    ddpm = by_kernel["sampler_step[ddpm_learned_philox]"][0]
    # reads x and the 2C-channel model output once, writes x_prev and x0 once; no noise tensor
    assert ddpm["hbm_bytes_fused"] == (1 + 2 + 2) * numel * 4
    dpm = by_kernel["sampler_step[dpmpp_2m]"][0]
    assert dpm["hbm_bytes_fused"] == (1 + 1 + 1 + 2) * numel * 4  # x, m, x0_prev; x_prev, x0
    # in place: DDPM reads x and the 2C output and writes x; DPM-Solver++ also reads and rewrites x0_prev
    assert by_kernel["sampler_step_inplace[ddpm_learned_philox]"][0]["hbm_bytes_fused"] == (1 + 2 + 1) * numel * 4
    dpm_in = by_kernel["sampler_step_inplace[dpmpp_2m]"][0]
    assert dpm_in["hbm_bytes_fused"] == (1 + 1 + 1 + 2) * numel * 4
    assert dpm_in["hbm_bytes_unfused"] == dpm["hbm_bytes_unfused"] + 4 * numel * 4  # + copy into x, x0_prev
    for s in specs:
        assert s["hbm_bytes_unfused"] >= 4 * s["hbm_bytes_fused"]
    # the eager model counts each op's tensor reads + writes: A*x, B*m, add = 2 + 2 + 3 passes, ...
    assert specs_module.hbm_bytes_unfused(10, 4, False, False, False, False, False) == (7 + 12) * 10 * 4


def test_gpu_launch_plan_inplace_is_never_autotuned(monkeypatch):
    """On a GPU the in-place kernel runs INPLACE_CONFIG directly (autotuning it would time triton's
    restore_value clones, not the kernel); the functional kernel goes through one autotuner per
    power-of-two batch bucket. The interpreter's kernels stand in for compiled ones."""
    coefs = _ddpm_rows(False).to(DEVICE)
    x = torch.randn(INPLACE_SHAPE, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    want, _ = sampler_step_forward(x, x, coefs, torch.tensor([1], device=DEVICE), None, None, None, 0, True, False)
    buckets, launched = [], []

    class Tuned:  # what triton.autotune returns, launching CONFIGS[0]
        def __getitem__(self, grid):
            block, warps = ks.CONFIGS[0]
            return lambda *a, **kw: ks._sampler_step_kernel[grid({"BLOCK": block})](*a, BLOCK=block,
                                                                                    num_warps=warps, **kw)

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launched.append((kwargs["BLOCK"], kwargs["num_warps"]))
                return self.kernel[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(ks, "_interpreting", lambda: False)
    monkeypatch.setattr(ks, "_autotuned", lambda bucket: buckets.append(bucket) or Tuned())
    monkeypatch.setattr(ks, "_sampler_step_inplace_kernel", Spy(ks._sampler_step_inplace_kernel))
    step = torch.tensor([1], device=DEVICE)
    t_out = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    done = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    xi = x.clone()
    sampler_step_inplace(xi, x.clone(), coefs, step, t_out, MODEL_T.to(DEVICE), done, None, None, 0, True, False)
    assert buckets == [] and launched == [ks.INPLACE_CONFIG]
    assert torch.equal(xi, want) and step.item() == 2
    got, _ = sampler_step_forward(x, x, coefs, torch.tensor([1], device=DEVICE), None, None, None, 0, True, False)
    assert buckets == [4] and torch.equal(got, want)  # batch 3 -> bucket 4


# ----------------------------------------------------------------------------- the in-place launcher
# Several programs per launch so that "the last program to finish does the bookkeeping" is exercised:
# BLOCK = 16 with 70 elements per image gives 5 programs per image, 3 images -> 15 programs. (The
# interpreter runs programs one after another: races cannot show here; the logic can.)
SMALL_BLOCK = (16, 1)
INPLACE_SHAPE = (3, 2, 5, 7)
MODEL_T = torch.tensor([999, 500, 10, 1, 0], dtype=torch.int64)


@pytest.fixture
def small_block(monkeypatch):
    if not INTERPRETED:
        return  # a GPU autotunes; the bookkeeping must hold whatever the grid
    monkeypatch.setattr(ks, "INTERPRET_CONFIG", SMALL_BLOCK)
    e = math.prod(INPLACE_SHAPE[1:])
    assert math.ceil(e / SMALL_BLOCK[0]) * INPLACE_SHAPE[0] == 15


def _rows_for(kind):
    if kind.startswith("ddpm"):
        return _ddpm_rows(kind == "ddpm_learned")
    if kind.startswith("ddim"):
        return _ddim_rows(0.0 if kind == "ddim_eta0" else 0.5)
    return torch.cat([_dpmpp_rows(), _dpmpp_rows()[:1]])  # 3 rows


INPLACE_CASES = [
    # kind, step row, clip, learned, x0_prev, seed, model-output channels (x C)
    ("ddpm_fixed", 1, True, False, False, True, 1),
    ("ddpm_fixed", 3, False, False, False, True, 2),  # 2C output without learned_range: first C read
    ("ddpm_learned", 2, True, True, False, True, 2),
    ("ddim", 0, True, False, False, True, 1),
    ("ddim_eta0", 1, True, False, False, False, 1),  # no seed: z = 0
    ("dpmpp", 1, False, False, True, False, 1),
]


@pytest.mark.parametrize("kind,step_i,clip,learned,with_x0p,with_seed,mult", INPLACE_CASES,
                         ids=[f"{c[0]}-row{c[1]}-{c[6]}C" for c in INPLACE_CASES])
def test_inplace_launcher_equals_functional_kernel_and_reference(small_block, kind, step_i, clip, learned,
                                                                 with_x0p, with_seed, mult):
    gen = torch.Generator().manual_seed(31 + step_i)
    coefs = _rows_for(kind).to(DEVICE)
    s_rows = coefs.shape[0]
    model_t = MODEL_T[:s_rows].to(DEVICE)
    x, mo, x0p = _inputs(INPLACE_SHAPE, torch.float32, learned or mult == 2, with_x0p, gen)
    step = torch.tensor([step_i], dtype=torch.int64, device=DEVICE)
    seed = torch.tensor([4321], dtype=torch.int64, device=DEVICE) if with_seed else None
    want_prev, want_x0 = sampler_step_forward(x, mo if (learned or mult == 1) else mo[:, :INPLACE_SHAPE[1]],
                                              coefs, step, x0p, None, seed, 2, clip, learned)
    z = (philox_normal(seed, INPLACE_SHAPE, step, stream=0, image_offset=2, device=DEVICE) if with_seed
         else torch.zeros(INPLACE_SHAPE, device=DEVICE))
    ref_prev, ref_x0 = _reference(x, mo, coefs, step, x0p, z, clip, learned)

    xb = x.clone()
    x0b = x0p.clone() if with_x0p else None
    t_out = torch.full((INPLACE_SHAPE[0],), -7, dtype=torch.int64, device=DEVICE)
    done = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    sampler_step_inplace(xb, mo, coefs, step, t_out, model_t, done, x0b, seed, 2, clip, learned)

    assert torch.equal(xb, want_prev)  # same body, same rounding: bit for bit
    _assert_close(xb, ref_prev, torch.float32)
    if with_x0p:
        assert torch.equal(x0b, want_x0)
        _assert_close(x0b, ref_x0, torch.float32)
    assert step.item() == step_i + 1  # incremented exactly once by the 15 programs
    assert t_out.tolist() == [MODEL_T[min(step_i + 1, s_rows - 1)].item()] * INPLACE_SHAPE[0]
    assert done.item() == 0
    assert torch.equal(mo, mo.clone()) and x.data_ptr() != xb.data_ptr()


def test_inplace_loop_walks_the_table_and_clamps_t_at_the_last_step(small_block):
    gen = torch.Generator().manual_seed(8)
    coefs = _ddpm_rows(False).to(DEVICE)  # 5 rows
    model_t = MODEL_T.to(DEVICE)
    x, mo, _ = _inputs(INPLACE_SHAPE, torch.float32, False, False, gen)
    seed = torch.tensor([77], dtype=torch.int64, device=DEVICE)
    step = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    t_out = torch.full((5,), model_t[0].item(), dtype=torch.int64, device=DEVICE)  # N' = 5 != N: any length
    done = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    x_ref = x.clone()
    seen_t = [t_out.tolist()]
    for k in range(5):
        want, _ = sampler_step_forward(x_ref, mo, coefs, torch.tensor([k], device=DEVICE), None, None, seed, 0,
                                       True, False)
        sampler_step_inplace(x, mo, coefs, step, t_out, model_t, done, None, seed, 0, True, False)
        x_ref = want
        assert torch.equal(x, want)
        assert step.item() == k + 1 and done.item() == 0
        seen_t.append(t_out.tolist())
    # t_out after step k is the model timestep of row k + 1, held at the last row after the last step
    assert [row[0] for row in seen_t] == [999, 500, 10, 1, 0, 0]
    assert all(len(set(row)) == 1 for row in seen_t)


def test_inplace_t_out_longer_than_one_block(small_block):
    # the last program writes t_out in a loop over blocks: 40 entries with BLOCK = 16 is 3 blocks
    coefs = _ddpm_rows(False).to(DEVICE)
    x = torch.zeros(INPLACE_SHAPE, device=DEVICE)
    step = torch.tensor([0], device=DEVICE)
    t_out = torch.zeros(40, dtype=torch.int64, device=DEVICE)
    done = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    sampler_step_inplace(x, x.clone(), coefs, step, t_out, MODEL_T.to(DEVICE), done, None, None, 0, True, False)
    assert t_out.tolist() == [500] * 40 and step.item() == 1 and done.item() == 0


def test_inplace_bad_arguments_raise_value_error():
    x = torch.zeros(INPLACE_SHAPE, device=DEVICE)
    coefs = torch.zeros(5, 9, device=DEVICE)
    step = torch.tensor([0], device=DEVICE)
    t_out = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    done = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    mt = MODEL_T.to(DEVICE)
    args = lambda **kw: {**dict(x=x, model_output=x, coefs=coefs, step=step, t_out=t_out, model_timesteps=mt,  # noqa: E731
                                done_counter=done, x0_prev=None, seed=None, image_offset=0, clip=True,
                                learned_range=False), **kw}
    big = torch.zeros((3, 4, 5, 7), device=DEVICE)
    with pytest.raises(ValueError, match="x must be contiguous"):
        sampler_step_inplace(**args(x=big[:, ::2], model_output=big[:, ::2].contiguous()))
    with pytest.raises(ValueError, match="model_timesteps"):
        sampler_step_inplace(**args(model_timesteps=mt[:4]))
    with pytest.raises(ValueError, match="t_out"):
        sampler_step_inplace(**args(t_out=t_out.int()))
    with pytest.raises(ValueError, match="done_counter"):
        sampler_step_inplace(**args(done_counter=done.long()))
    with pytest.raises(ValueError, match="done_counter"):
        sampler_step_inplace(**args(done_counter=None))  # the launcher needs the caller's buffer
    with pytest.raises(ValueError, match="t_out must be contiguous"):
        sampler_step_inplace(**args(t_out=torch.zeros(6, dtype=torch.int64, device=DEVICE)[::2]))
    with pytest.raises(ValueError, match="model_output"):
        sampler_step_inplace(**args(model_output=torch.zeros((3, 3, 5, 7), device=DEVICE)))
    with pytest.raises(ValueError, match="model_output"):
        sampler_step_inplace(**args(learned_range=True))  # needs 2C channels
    assert step.item() == 0 and done.item() == 0


@pytest.mark.parametrize("learned,with_x0p,mult", [(False, False, 1), (True, False, 2), (False, True, 2)])
def test_inplace_op_triton_equals_reference(small_block, learned, with_x0p, mult):
    ops, _ = _op_or_skip()
    from fastddpm.ops.sampler_step import sampler_step_

    gen = torch.Generator().manual_seed(5 + mult)
    coefs = _random_rows(5, gen).to(DEVICE)
    x, mo, x0p = _inputs(INPLACE_SHAPE, torch.float32, learned or mult == 2, with_x0p, gen)
    seed = torch.tensor([99], dtype=torch.int64, device=DEVICE)
    results = {}
    for backend in ("reference", "triton"):
        bufs = dict(x=x.clone(), step=torch.tensor([3], device=DEVICE),
                    t_out=torch.zeros(3, dtype=torch.int64, device=DEVICE),
                    x0_prev=x0p.clone() if with_x0p else None)
        with ops.use_backend(backend):
            ret = sampler_step_(bufs["x"], mo, coefs, bufs["step"], bufs["t_out"], MODEL_T.to(DEVICE),
                                bufs["x0_prev"], seed, 1, True, learned)  # done_counter None: allocated
        assert ret is None
        results[backend] = bufs
    ref, tri = results["reference"], results["triton"]
    torch.testing.assert_close(tri["x"], ref["x"], rtol=1e-5, atol=1e-5)
    if with_x0p:
        torch.testing.assert_close(tri["x0_prev"], ref["x0_prev"], rtol=1e-5, atol=1e-5)
    assert tri["step"].item() == ref["step"].item() == 4
    assert tri["t_out"].tolist() == ref["t_out"].tolist() == [0, 0, 0]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_inplace_op_opcheck_schema_and_fake(backend):
    ops, _ = _op_or_skip()
    import fastddpm.ops.sampler_step  # noqa: F401  (registers fastddpm::sampler_step_)

    gen = torch.Generator().manual_seed(2)
    x, mo, x0p = _inputs((2, 2, 3, 3), torch.float32, True, True, gen)
    args = (x, mo, _random_rows(5, gen).to(DEVICE), torch.tensor([1], device=DEVICE),
            torch.zeros(2, dtype=torch.int64, device=DEVICE), MODEL_T.to(DEVICE), x0p,
            torch.tensor([3], device=DEVICE), 0, True, True, torch.zeros(1, dtype=torch.int32, device=DEVICE))
    with ops.use_backend(backend):
        torch.library.opcheck(torch.ops.fastddpm.sampler_step_.default, args,
                              test_utils=("test_schema", "test_faketensor"))

"""GPU-only checks of what the interpreter cannot show (every test skips without CUDA).

Run on a GPU machine with `python -m pytest -q tests/gpu` (or `python benchmarks/gpu_check.py`, which
runs every test marked `gpu`). Tolerances (rel_err = max |a - ref| / max(1, max |ref|), ref float64):

* FastSampler (capture "step" / "loop") against `sampler.sample()` of the same model and seed:
  fp32, 1e-4 absolute/relative (the same kernels on both paths; only the fused in-place step and its
  functional twin differ, and they share one body).
* in-place step graph replayed 1000 times against 1000 functional launches: bit for bit.
* GroupNorm+SiLU and attention: fp32 max(2 x torch's own fp32 error, 1e-5 forward / 1e-4 gradients);
  bf16 / fp16 2 x torch's same-dtype error + one ulp (2**-7, 2**-10), as in tests/test_ops_*.py.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import fastddpm as fd
from fastddpm.graphs import FastSampler
from fastddpm.ops import attention, group_norm_silu, use_backend
from references import attention_reference, group_norm_silu_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rel_err(a, ref):
    a, ref = a.detach().double(), ref.detach().double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def bound(name, dtype, torch_err):
    if dtype == torch.float32:
        return max(2 * torch_err, 1e-5 if name in ("y", "o") else 1e-4)
    return 2 * torch_err + ULP[dtype]


def _unet(device, learn_sigma=False, seed=0):
    torch.manual_seed(seed)
    net = fd.UNet(image_size=16, base_channels=32, channel_mults=(1, 2), attention_resolutions=(8,),
                  num_heads=1, dropout=0.1, learn_sigma=learn_sigma)
    with torch.no_grad():  # leave no zero-initialised layer hiding the rest
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return net.to(device).eval()


# ------------------------------------------------------------------------------- FastSampler vs sample()
def _cases():
    linear = fd.NoiseSchedule.linear(1000)
    return {
        "ddpm_learned_philox": (fd.DDPMSampler(fd.GaussianDiffusion(linear, variance="learned_range"), steps=20), True),
        "ddim_eta0.5": (fd.DDIMSampler(fd.GaussianDiffusion(linear), steps=20, eta=0.5), False),
        "dpm++": (fd.DPMSolverSampler(fd.GaussianDiffusion(linear), steps=15), False),
    }


@pytest.mark.parametrize("capture", ["step", "loop"])
@pytest.mark.parametrize("case", ["ddpm_learned_philox", "ddim_eta0.5", "dpm++"])
def test_fast_sampler_capture_equals_sample(cuda_device, case, capture):
    sampler, learned = _cases()[case]
    net = _unet(cuda_device, learn_sigma=learned)
    fast = FastSampler(net, sampler, batch_size=4, capture=capture)
    got = fast(seed=3)
    want = sampler.sample(net, (4, 3, 16, 16), seed=3)  # the plain loop: functional kernel, Philox noise
    assert fast.graph is not None
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    again = fast(seed=3)  # a second call replays the same graph from a reset state
    assert torch.equal(again, got)
    assert not torch.equal(fast(seed=4), got)


# ------------------------------------------------------------------------------- in-place step under load
@pytest.mark.parametrize("config_index", [0, 1, 2])
def test_inplace_step_graph_1000_replays_bitwise_equal_functional(cuda_device, config_index, monkeypatch):
    K = importlib.import_module("fastddpm.kernels.sampler_step")
    if config_index >= len(K.CONFIGS):
        pytest.skip(f"fastddpm.kernels.sampler_step has {len(K.CONFIGS)} configs")
    monkeypatch.setattr(K, "CONFIGS", [K.CONFIGS[config_index]])  # the autotuner then has one choice
    K._autotuned.cache_clear()
    try:
        sampler = fd.DDPMSampler(fd.GaussianDiffusion(fd.NoiseSchedule.linear(1000)))
        coefs, steps, model_t = sampler.device_tables(cuda_device)
        S = coefs.shape[0]
        assert S == 1000
        g = torch.Generator(device=cuda_device).manual_seed(0)
        shape = (256, 3, 32, 32)
        x_start = torch.randn(shape, generator=g, device=cuda_device)
        mo = torch.tanh(torch.randn(shape, generator=g, device=cuda_device))
        seed = torch.tensor([1234], dtype=torch.int64, device=cuda_device)

        x_f = x_start.clone()
        for s in range(S):  # 1000 functional launches, step index from the table
            x_f, _ = K.sampler_step_forward(x_f, mo, coefs, steps[s:s + 1], None, None, seed, 0, True, False)

        def buffers():
            return (x_start.clone(), torch.zeros(1, dtype=torch.int64, device=cuda_device),
                    torch.zeros(shape[0], dtype=torch.int64, device=cuda_device),
                    torch.zeros(1, dtype=torch.int32, device=cuda_device))

        side = torch.cuda.Stream(cuda_device)
        side.wait_stream(torch.cuda.current_stream(cuda_device))
        with torch.cuda.stream(side):  # compile before capture, on throw-away buffers
            wx, ws, wt, wd = buffers()
            K.sampler_step_inplace(wx, mo, coefs, ws, wt, model_t, wd, None, seed, 0, True, False)
        torch.cuda.current_stream(cuda_device).wait_stream(side)
        x, step, t_out, done = buffers()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            K.sampler_step_inplace(x, mo, coefs, step, t_out, model_t, done, None, seed, 0, True, False)
        for _ in range(S):
            graph.replay()
        torch.cuda.synchronize(cuda_device)
        assert torch.equal(x, x_f), f"max diff {(x - x_f).abs().max().item()}"
        assert int(step) == S and int(done) == 0
        assert t_out.tolist() == [int(model_t[S - 1])] * shape[0]
    finally:
        K._autotuned.cache_clear()


# ------------------------------------------------------------------------------- GroupNorm + SiLU
# (C, H*W) of the DDPM CIFAR-10 U-Net's GroupNorms at 32x32 input (groups 32); the test keeps those the
# launcher runs as one tile, which is the path only a GPU compiles.
CIFAR_GN = [(128, 32 * 32), (256, 16 * 16), (256, 8 * 8), (256, 4 * 4), (384, 16 * 16), (512, 16 * 16),
            (512, 8 * 8), (512, 4 * 4), (384, 32 * 32), (256, 32 * 32)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_silu_single_tile_cifar_shapes(cuda_device, dtype):
    K = importlib.import_module("fastddpm.kernels.group_norm")
    shapes = [(c, hw) for c, hw in CIFAR_GN if K._single_tile(c // 32, hw) is not None]
    assert shapes, "no CIFAR-10 GroupNorm runs as a single tile: the list above is stale"
    for c, hw in shapes:
        side = int(math.isqrt(hw))
        g = torch.Generator(device=cuda_device).manual_seed(c + hw)
        x = torch.randn(8, c, side, side, generator=g, device=cuda_device, dtype=torch.float64) * 2 + 0.5
        w = torch.randn(c, generator=g, device=cuda_device, dtype=torch.float64)
        b = torch.randn(c, generator=g, device=cuda_device, dtype=torch.float64)
        add = torch.randn(8, c, generator=g, device=cuda_device, dtype=torch.float64)
        dy = torch.randn(x.shape, generator=g, device=cuda_device, dtype=torch.float64)
        leaves = {k: [t.to(dt).requires_grad_(True) for t in (x, w, b, add)]
                  for k, dt in (("ours", dtype), ("torch", dtype), ("ref", torch.float64))}
        y = group_norm_silu(leaves["ours"][0], *leaves["ours"][1:3], 32, 1e-6, add=leaves["ours"][3])
        y_t = group_norm_silu_reference(*leaves["torch"][:3], 32, 1e-6, add=leaves["torch"][3])
        y_r = group_norm_silu_reference(*leaves["ref"][:3], 32, 1e-6, add=leaves["ref"][3])
        g_o = torch.autograd.grad(y, leaves["ours"], dy.to(dtype))
        g_t = torch.autograd.grad(y_t, leaves["torch"], dy.to(dtype))
        g_r = torch.autograd.grad(y_r, leaves["ref"], dy)
        assert y.dtype == dtype
        for name, a, t, r in zip(("y", "dx", "dweight", "dbias", "dadd"), (y, *g_o), (y_t, *g_t), (y_r, *g_r)):
            lim = bound(name, dtype, rel_err(t, r))
            assert rel_err(a, r) <= lim, f"C={c} HW={hw} {name}: {rel_err(a, r):.3g} > {lim:.3g}"


# ------------------------------------------------------------------------------- attention
ATTN_SHAPES = [(8, 1, 256, 256), (4, 4, 1024, 64), (16, 2, 64, 128), (4, 1, 256, 512), (2, 1, 64, 512)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ATTN_SHAPES)
def test_attention_unet_shapes_and_head_dim_512(cuda_device, shape, dtype, monkeypatch):
    """Head dims <= 256 run the Triton kernels (the launcher is called); head_dim 512 is the fallback test:
    the launcher is never called and the output is SDPA's own, bit for bit. Both within the bounds."""
    K = importlib.import_module("fastddpm.kernels.attention")
    launches = []
    launcher = K.attention_forward
    monkeypatch.setattr(K, "attention_forward", lambda *a, **kw: launches.append(1) or launcher(*a, **kw))
    g = torch.Generator(device=cuda_device).manual_seed(sum(shape))
    base = [torch.randn(shape, generator=g, device=cuda_device, dtype=torch.float64) * 1.5 for _ in range(3)]
    do = torch.randn(shape, generator=g, device=cuda_device, dtype=torch.float64)
    ours = [t.to(dtype).requires_grad_(True) for t in base]
    theirs = [t.to(dtype).requires_grad_(True) for t in base]
    ref = [t.clone().requires_grad_(True) for t in base]
    with use_backend("triton"):  # forced: head_dim 512 must still take a correct path
        o = attention(*ours)
        g_o = torch.autograd.grad(o, ours, do.to(dtype))
    o_t = F.scaled_dot_product_attention(*theirs)
    g_t = torch.autograd.grad(o_t, theirs, do.to(dtype))
    o_r = attention_reference(*ref)
    g_r = torch.autograd.grad(o_r, ref, do)
    assert o.dtype == dtype and o.shape == shape
    if shape[-1] <= K._MAX_HEAD_DIM:
        assert launches, "the Triton kernel did not run"
    else:
        assert not launches and torch.equal(o, o_t), "head_dim 512 must fall back to SDPA"
    for name, a, t, r in zip(("o", "dq", "dk", "dv"), (o, *g_o), (o_t, *g_t), (o_r, *g_r)):
        lim = bound(name, dtype, rel_err(t, r))
        assert rel_err(a, r) <= lim, f"{shape} {dtype} {name}: {rel_err(a, r):.3g} > {lim:.3g}"


def test_attention_head_dim_512_compiles_without_graph_break(cuda_device):
    q, k, v = (torch.randn(2, 1, 64, 512, device=cuda_device, dtype=torch.bfloat16) for _ in range(3))
    explanation = torch._dynamo.explain(attention)(q, k, v)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(attention, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), attention(q, k, v), rtol=2**-7, atol=2**-7)


def test_unet_256_heads_512_forward_runs(cuda_device):
    """A 256x256-style U-Net with a 512-wide head at 16x16 (downscaled: 32x32 input, 2 levels)."""
    net = fd.UNet(image_size=32, base_channels=256, channel_mults=(1, 2), num_res_blocks=1,
                  attention_resolutions=(16,), num_heads=1).to(cuda_device).eval()
    x = torch.randn(2, 3, 32, 32, device=cuda_device)
    t = torch.tensor([10, 500], device=cuda_device)
    with torch.no_grad():
        y = net(x, t)
        with use_backend("reference"):
            y_ref = net(x, t)
    torch.testing.assert_close(y, y_ref, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------- non-default device
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_a_non_current_device(cuda_device):
    other = torch.device("cuda", 1 - cuda_device.index if cuda_device.index < 2 else 0)
    assert torch.cuda.current_device() != other.index
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 100, 64, generator=g) for _ in range(3))
    x = torch.randn(2, 64, 8, 8, generator=g)
    w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    here = (attention(q.to(cuda_device), k.to(cuda_device), v.to(cuda_device)),
            group_norm_silu(x.to(cuda_device), w.to(cuda_device), b.to(cuda_device), 32))
    there = (attention(q.to(other), k.to(other), v.to(other)),
             group_norm_silu(x.to(other), w.to(other), b.to(other), 32))
    for a, b_ in zip(here, there):
        assert b_.device == other
        torch.testing.assert_close(b_.cpu(), a.cpu(), rtol=1e-5, atol=1e-5)
    sampler = fd.DDIMSampler(fd.GaussianDiffusion(fd.NoiseSchedule.linear(1000)), steps=10, eta=0.5)
    ref = FastSampler(_unet(cuda_device), sampler, batch_size=2)(seed=1)
    got = FastSampler(_unet(other), sampler, batch_size=2)(seed=1)  # captured on `other`'s stream
    assert got.device == other and torch.cuda.current_device() == cuda_device.index
    torch.testing.assert_close(got.cpu(), ref.cpu(), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------- memory flat in steps
def test_sample_peak_memory_flat_in_step_count(cuda_device):
    net = _unet(cuda_device)
    assert all(p.requires_grad for p in net.parameters())
    diff = fd.GaussianDiffusion(fd.NoiseSchedule.linear(1000))

    def peak(steps):
        sampler = fd.DDIMSampler(diff, steps=steps)
        sampler.sample(net, (16, 3, 16, 16), seed=0)  # warm-up: kernels, tables, allocator
        torch.cuda.synchronize(cuda_device)
        torch.cuda.reset_peak_memory_stats(cuda_device)
        base = torch.cuda.memory_allocated(cuda_device)
        out = sampler.sample(net, (16, 3, 16, 16), seed=0)
        torch.cuda.synchronize(cuda_device)
        assert out.grad_fn is None
        return torch.cuda.max_memory_allocated(cuda_device) - base

    few, many = peak(5), peak(50)
    # one step's activations at this size are several MB: a recorded graph would add 45 of them
    assert many <= few + 2**20, f"peak grew from {few} to {many} bytes with 10x the steps"

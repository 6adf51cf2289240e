"""The U-Net's memory-lean training mode (`recompute_norm`) and its stacked time projection.

With recompute_norm=True (the default) the GroupNorm(+SiLU) outputs that feed a convolution (or the
attention's qkv projection) are recomputed in backward instead of saved. These tests check that the
gradients equal the plain path's (float64: to 1e-12 relative, the recompute runs the same backward ops
on bitwise the same recomputed values), that the saved bytes drop by exactly the norm outputs (closed
form on one ResBlock), that the mode only applies in training with autograd on, that it survives
torch.compile(fullgraph=True), and that configs without the key still build.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import fastddpm as fd
from fastddpm.profiling import saved_bytes
from fastddpm.unet import ResBlock

torch.set_num_threads(1)

TINY = dict(image_size=8, in_channels=3, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
            attention_resolutions=(4,), dropout=0.0, groups=4)
COMPILE_BACKEND = os.environ.get("FASTDDPM_TEST_COMPILE_BACKEND", "aot_eager")


def _perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Noise on every parameter so the zero-initialised layers do not hide the rest."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def _set_recompute(model: torch.nn.Module, on: bool) -> None:
    for m in model.modules():
        if hasattr(m, "recompute_norm"):
            m.recompute_norm = on


def _head(out: torch.Tensor) -> str:
    """The autograd node that produced the U-Net's output, looking past the final copy to a contiguous
    tensor (the activations run channels-last on the CPU)."""
    fn = out.grad_fn
    if type(fn).__name__ == "CloneBackward0":
        fn = fn.next_functions[0][0]
    return type(fn).__name__


def _grads(model, x, t, seed=0, call=None):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks on both paths
    out = (model if call is None else call)(x, t)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * w).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode,heads,dropout", [("add", 1, 0.0), ("scale_shift", 2, 0.0), ("add", 2, 0.3)])
def test_recompute_gradients_equal_plain_float64(mode, heads, dropout):
    torch.manual_seed(0)
    model = _perturb(fd.UNet(**{**TINY, "dropout": dropout}, time_embedding=mode, num_heads=heads)).double().train()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([3, 700])
    _set_recompute(model, False)
    out_plain, g_plain = _grads(model, x, t)
    _set_recompute(model, True)
    out_lean, g_lean = _grads(model, x, t)
    assert _head(model(x, t)) == "NormConvBackward"  # the lean path did run
    torch.testing.assert_close(out_lean, out_plain, atol=0, rtol=0)
    for n, g in g_plain.items():
        assert g.abs().sum() > 0, n
        torch.testing.assert_close(g_lean[n], g, atol=1e-13, rtol=1e-12, msg=n)


def test_recompute_gradients_equal_plain_float32_input_grad():
    torch.manual_seed(1)
    model = _perturb(fd.UNet(**TINY, time_embedding="scale_shift")).train()
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([10, 500])
    grads = []
    for on in (False, True):
        _set_recompute(model, on)
        xi = x.clone().requires_grad_(True)
        model(xi, t).square().sum().backward()
        grads.append(xi.grad)
    # fp32, same ops on the same values: equal up to summation-order effects (none expected on CPU)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_resblock_saved_bytes_closed_form():
    """One ResBlock (16 -> 24 channels, 1x1 skip), float64: the plain path saves x, the first norm's output,
    h = conv1's output, the second norm's output, the time projection, emb and the per-group stats; the lean
    path keeps x, h, the projection and emb only."""
    n, cin, cout, temb, hw, groups = 2, 16, 24, 40, 5 * 7, 4
    block = _perturb(ResBlock(cin, cout, temb, dropout=0.0, time_embedding="add", groups=groups, eps=1e-6))
    block = block.double().train()
    x = torch.randn(n, cin, 5, 7, dtype=torch.float64, requires_grad=True)
    emb = torch.randn(n, temb, dtype=torch.float64, requires_grad=True)
    params = list(block.parameters())
    block.recompute_norm = False
    plain = saved_bytes(lambda: block(x, emb), exclude=params)
    block.recompute_norm = True
    lean = saved_bytes(lambda: block(x, emb), exclude=params)
    acts = n * cin * hw + n * cout * hw  # x and h
    small = n * cout + n * temb  # the projection (added before norm2) and emb (saved by time_proj)
    stats = 2 * 2 * n * groups  # mean and rstd of both norms
    assert lean == 8 * (acts + small)
    assert plain == 8 * (2 * acts + small + stats)


def test_unet_saved_bytes_lower_with_recompute():
    torch.manual_seed(0)
    model = _perturb(fd.UNet(**TINY)).train()
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([1, 2])
    params = list(model.parameters())
    sizes = {}
    for on in (False, True):
        _set_recompute(model, on)
        sizes[on] = saved_bytes(lambda: model(x, t).sum(), exclude=params)
    # the lean path drops, at each of the 21 norm -> conv sites, the norm's output and its mean/rstd
    # (2 x [N, groups]); per sample, the norm outputs (channels x pixels) are:
    # down 8x8: 16*64 + 16*64; down 4x4: 16*16 + 32*16, attention 32*16; middle: 5 x 32*16;
    # up 4x4: 64*16 + 32*16 + 32*16 (attention) + 48*16 + 32*16 + 32*16 (attention);
    # up 8x8: 48*64 + 16*64 + 32*64 + 16*64; output norm: 16*64
    per_sample = 2 * 1024 + (256 + 512 + 512) + 5 * 512 + (1024 + 512 + 512 + 768 + 512 + 512) \
        + (3072 + 1024 + 2048 + 1024) + 1024
    assert sizes[False] - sizes[True] == 4 * (2 * per_sample + 21 * 2 * 2 * 4)


def test_recompute_only_when_training_with_grad():
    torch.manual_seed(0)
    model = _perturb(fd.UNet(**TINY)).train()
    x = torch.randn(1, 3, 8, 8)
    t = torch.tensor([5])
    assert _head(model(x, t)) == "NormConvBackward"
    model.eval()
    assert _head(model(x, t)) == "ConvolutionBackward0"
    model.train()
    with torch.no_grad():
        assert model(x, t).grad_fn is None
    _set_recompute(model, False)
    assert _head(model(x, t)) == "ConvolutionBackward0"


@pytest.mark.slow  # torch.compile of a training step
def test_compile_fullgraph_training_with_recompute():
    torch._dynamo.reset()
    torch.manual_seed(0)
    # aot_eager runs the traced graph's RNG ops in eager order: the same dropout masks as eager for the same
    # seed (Inductor draws its own random numbers, so dropout is off there)
    dropout = 0.3 if COMPILE_BACKEND == "aot_eager" else 0.0
    model = _perturb(fd.UNet(**{**TINY, "dropout": dropout}, num_heads=2, time_embedding="scale_shift")).train()
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([1, 900])
    eager_out, eager = _grads(model, x, t)
    compiled = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)  # a graph break raises
    out, got = _grads(model, x, t, call=compiled)
    torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
    for n, g in eager.items():
        scale = 1.0 + g.abs().max().item()
        torch.testing.assert_close(got[n], g, atol=1e-5 * scale, rtol=0, msg=n)


def test_stacked_time_projection_is_one_parameter_with_per_block_keys():
    """One stacked parameter (each block's time_proj a row view), one matmul per forward with no
    concatenation of weights, only emb saved for it, and diffusers' per-block state-dict keys."""
    torch.manual_seed(0)
    model = fd.UNet(image_size=8, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                    attention_resolutions=(), dropout=0.0, time_embedding="scale_shift")
    blocks = model._resblocks
    w = model.time_proj_stack.weight
    assert all(b.time_proj.weight.data_ptr() == w[b.time_proj.start].data_ptr() for b in blocks)
    assert not any(".time_proj." in n for n, _ in model.named_parameters())
    sd = model.state_dict()
    assert "time_proj_stack.weight" not in sd
    for key, b in zip(model._time_proj_keys, blocks):
        torch.testing.assert_close(sd[f"{key}.weight"], b.time_proj.weight, rtol=0, atol=0)
    # a per-block state dict (what diffusers' mapping and older checkpoints hold) loads into the rows
    other = fd.UNet(image_size=8, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                    attention_resolutions=(), dropout=0.0, time_embedding="scale_shift")
    other.load_state_dict(sd)
    torch.testing.assert_close(other.time_proj_stack.weight, w, rtol=0, atol=0)
    # per-block math: each block's projection equals F.linear with its own rows (independent reference)
    emb = torch.randn(3, w.shape[1], dtype=torch.float64)
    model.double()
    projs = model._time_projections(emb)
    for b, p in zip(blocks, projs):
        ref = F.linear(emb, b.time_proj.weight, b.time_proj.bias)
        torch.testing.assert_close(torch.cat(p, dim=1), ref, rtol=1e-12, atol=1e-12)
    x, t = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([3, 7])
    cats = [shape for name, shape in _ops_with_shapes(lambda: model(x, t)) if name == "aten.cat.default"]
    assert tuple(w.shape) not in cats and (w.shape[0],) not in cats, cats
    emb = emb.requires_grad_()
    assert saved_bytes(lambda: model._time_projections(emb), exclude=list(model.parameters())) == emb.numel() * 8


def _ops_with_shapes(fn):
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class _Rec(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                seen.append((str(func), tuple(out.shape)))
            return out

    with torch.no_grad(), _Rec():
        fn()
    return seen

def test_config_key_default_and_round_trip():
    model = fd.UNet(**TINY)
    assert model.config["recompute_norm"] is True
    old = {k: v for k, v in model.config.items() if k != "recompute_norm"}  # a config saved before the key
    rebuilt = fd.UNet(**old)
    assert rebuilt.recompute_norm is True and rebuilt.state_dict().keys() == model.state_dict().keys()
    off = fd.UNet(**{**TINY, "recompute_norm": False})
    assert off.config["recompute_norm"] is False
    assert all(not m.recompute_norm for m in off.modules() if hasattr(m, "recompute_norm"))
    assert fd.UNet(**off.config).config == off.config
    assert off.state_dict().keys() == model.state_dict().keys()
    with pytest.raises(ValueError, match="recompute_norm"):
        fd.UNet(**TINY, recompute_norm="yes")


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_recompute_under_autocast_bfloat16(compiled):
    """Under autocast the lean path runs the convolutions in bf16 like the plain path: the same forward (both
    paths eager, or both compiled: Dynamo places autocast's casts differently from eager, by a bf16 ulp),
    gradients in the parameters' dtype (float32) and close to the plain path's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _perturb(fd.UNet(**TINY)).train()
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([4, 321])
    results = {}
    for on in (False, True):
        _set_recompute(model, on)
        model.zero_grad(set_to_none=True)
        torch._dynamo.reset()
        call = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND) if compiled else model
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = call(x, t)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        results[on] = (out.float(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(results[True][0], results[False][0], atol=0, rtol=0)
    for n, g in results[False][1].items():
        assert results[True][1][n].dtype == torch.float32, n
        # the same bf16 ops in the same order: equal up to fp32 accumulation order (none expected)
        scale = 1.0 + g.abs().max().item()
        torch.testing.assert_close(results[True][1][n], g, atol=1e-3 * scale, rtol=0, msg=n)


def test_recompute_norm_setter_updates_blocks_and_config():
    model = fd.UNet(**TINY)
    model.recompute_norm = False
    assert model.config["recompute_norm"] is False
    assert all(m.recompute_norm is False for m in model.modules() if isinstance(m, (ResBlock,)))
    model.train()
    assert _head(model(torch.randn(1, 3, 8, 8), torch.tensor([3]))) == "ConvolutionBackward0"
    model.recompute_norm = True
    assert all(m.recompute_norm for m in model.modules() if hasattr(m, "recompute_norm"))
    with pytest.raises(ValueError, match="recompute_norm"):
        model.recompute_norm = 1

"""Tests of fastddpm.UNet: structure (parameter count against diffusers), numerics of its blocks
against plain-PyTorch recomputations, time/class conditioning, gradients, torch.compile, validation.

Tolerances: fp32 on CPU; block-level comparisons against torch's own group_norm / SDPA: 1e-5 abs.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import fastddpm as fd
from fastddpm import ops
from fastddpm.unet import AttentionBlock, ResBlock, timestep_embedding

torch.set_num_threads(1)


TINY = dict(image_size=8, in_channels=3, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
            attention_resolutions=(4,), dropout=0.0, groups=8)


def _perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter, so the zero-initialised layers no longer hide the rest."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def _ddpm_cifar10_diffusers():
    diffusers = pytest.importorskip("diffusers")
    # the config of google/ddpm-cifar10-32
    return diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
        attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
        norm_num_groups=32, act_fn="silu")


# ---------------------------------------------------------------------------------------------------
def _num_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_parameter_count_ddpm_cifar10():
    unet = fd.UNet(image_size=32, in_channels=3, base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                   attention_resolutions=(16,), dropout=0.1, num_heads=1, time_embedding="add", learn_sigma=False)
    n = _num_params(unet)
    assert abs(n - 35.7e6) / 35.7e6 < 0.005, n
    diffusers_unet = _ddpm_cifar10_diffusers().eval()
    ref = _num_params(diffusers_unet)
    assert abs(n - ref) / ref < 0.005, (n, ref)
    assert n == ref  # the layers map one to one
    # and the full-size model converts to the same function
    converted = fd.unet_from_diffusers(diffusers_unet)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = diffusers_unet(x, torch.tensor([517])).sample
        torch.testing.assert_close(converted(x, torch.tensor([517])), expected, atol=1e-4, rtol=1e-4)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0, 1, 17, 999])
    dim = 10
    emb = timestep_embedding(t, dim, flip_sin_to_cos=False, freq_shift=1)
    half = dim // 2
    expected = torch.zeros(4, dim, dtype=torch.float64)
    for i, ti in enumerate(t.tolist()):
        for j in range(half):
            f = math.exp(-math.log(10000.0) * j / (half - 1))
            expected[i, j] = math.sin(ti * f)
            expected[i, half + j] = math.cos(ti * f)
    torch.testing.assert_close(emb.double(), expected, atol=2e-4, rtol=0)
    flipped = timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=1)
    torch.testing.assert_close(flipped, torch.cat([emb[:, half:], emb[:, :half]], 1))
    odd = timestep_embedding(t, 7, freq_shift=0)
    assert odd.shape == (4, 7) and torch.all(odd[:, -1] == 0)


def test_timestep_embedding_matches_diffusers():
    emb_mod = pytest.importorskip("diffusers.models.embeddings")
    t = torch.tensor([0, 3, 250, 999])
    for flip, shift in [(False, 1), (True, 0)]:
        ours = timestep_embedding(t, 128, flip_sin_to_cos=flip, freq_shift=shift)
        ref = emb_mod.get_timestep_embedding(t, 128, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["add", "scale_shift"])
def test_resblock_matches_manual(mode):
    torch.manual_seed(0)
    block = _perturb(ResBlock(16, 24, 40, dropout=0.0, time_embedding=mode, groups=4, eps=1e-6)).eval()
    x = torch.randn(2, 16, 5, 7)
    emb = torch.randn(2, 40)
    h = F.silu(F.group_norm(x, 4, block.norm1.weight, block.norm1.bias, 1e-6))
    h = F.conv2d(h, block.conv1.weight, block.conv1.bias, padding=1)
    proj = F.linear(emb, block.time_proj.weight, block.time_proj.bias)
    if mode == "add":
        h = F.group_norm(h + proj[:, :, None, None], 4, block.norm2.weight, block.norm2.bias, 1e-6)
    else:
        scale, shift = proj[:, :24], proj[:, 24:]
        h = F.group_norm(h, 4, block.norm2.weight, block.norm2.bias, 1e-6)
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    h = F.conv2d(F.silu(h), block.conv2.weight, block.conv2.bias, padding=1)
    expected = F.conv2d(x, block.skip.weight, block.skip.bias) + h
    torch.testing.assert_close(block(x, emb), expected, atol=1e-5, rtol=1e-5)
    assert block.time_proj.out_features == (48 if mode == "scale_shift" else 24)


@pytest.mark.parametrize("heads", [1, 2])
def test_attention_block_matches_manual(heads):
    torch.manual_seed(1)
    block = _perturb(AttentionBlock(16, heads, groups=4, eps=1e-6))
    x = torch.randn(2, 16, 3, 5)
    h = F.group_norm(x, 4, block.norm.weight, block.norm.bias, 1e-6).flatten(2).transpose(1, 2)  # [B, N, C]
    wq, wk, wv = block.qkv.weight.chunk(3, 0)
    bq, bk, bv = block.qkv.bias.chunk(3, 0)
    q, k, v = (F.linear(h, w, b) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
    d = 16 // heads
    outs = []
    for i in range(heads):  # explicit softmax per head
        qi, ki, vi = (z[..., i * d:(i + 1) * d] for z in (q, k, v))
        p = torch.softmax(qi @ ki.transpose(1, 2) / math.sqrt(d), dim=-1)
        outs.append(p @ vi)
    o = F.linear(torch.cat(outs, -1), block.proj.weight, block.proj.bias)
    expected = x + o.transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
    # the CPU layout: a channels-last input stays channels-last, with the same values
    out_cl = block(x.contiguous(memory_format=torch.channels_last))
    assert out_cl.is_contiguous(memory_format=torch.channels_last) and not out_cl.is_contiguous()
    torch.testing.assert_close(out_cl, expected, atol=1e-5, rtol=1e-5)


def test_preferred_memory_format():
    """channels-last for the CPU reference path, NCHW where the Triton kernels would run."""
    assert ops.preferred_memory_format(torch.zeros(1)) == torch.channels_last
    with ops.use_backend("reference"):
        assert ops.preferred_memory_format(torch.zeros(1)) == torch.channels_last
    if ops.triton_available():
        with ops.use_backend("triton"):
            assert ops.preferred_memory_format(torch.zeros(1)) == torch.contiguous_format


def test_use_memory_format_overrides_the_default():
    """use_memory_format forces the layout (gpu_check times both), restores it on exit, checks its argument."""
    t = torch.zeros(1)
    with ops.use_memory_format("contiguous"):
        assert ops.preferred_memory_format(t) == torch.contiguous_format
        with ops.use_memory_format("channels_last"):
            assert ops.preferred_memory_format(t) == torch.channels_last
        assert ops.preferred_memory_format(t) == torch.contiguous_format
        with ops.use_memory_format("auto"):
            assert ops.preferred_memory_format(t) == torch.channels_last  # the CPU default
    assert ops.preferred_memory_format(t) == torch.channels_last
    with pytest.raises(ValueError, match="memory format must be one of"):
        with ops.use_memory_format("nhwc"):
            pass


def test_channels_last_on_the_triton_path_equals_nchw(triton_on_cpu):
    """The U-Net with channels-last activations where the Triton kernels run (the GroupNorm kernels'
    channels-last path, attention on channels-last views; interpreter here): same output and gradients as
    the CUDA default, NCHW."""
    torch.manual_seed(4)
    # one level at 4x4 with attention: every fused op (GroupNorm kernels, norm_conv, attention) at least
    # once, few interpreted launches
    model = _perturb(fd.UNet(**dict(TINY, image_size=4, base_channels=8, channel_mults=(1,), groups=2),
                             num_heads=1)).train()
    x = torch.randn(1, 3, 4, 4)
    t = torch.tensor([300])

    def run(fmt):
        model.zero_grad(set_to_none=True)
        with ops.use_backend("triton"), ops.use_memory_format(fmt):
            out = model(x, t)
            out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out_cl, g_cl = run("channels_last")
    out_nchw, g_nchw = run("contiguous")
    torch.testing.assert_close(out_cl, out_nchw, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_cl, g_nchw):
        torch.testing.assert_close(a, b, atol=1e-4 * (1 + b.abs().max().item()), rtol=1e-4)


@pytest.mark.parametrize("mode", ["add", "scale_shift"])
def test_channels_last_forward_backward_equal_nchw(mode, monkeypatch):
    """The U-Net on the CPU runs channels-last; forcing NCHW gives the same output and gradients, and the
    output is contiguous either way."""
    torch.manual_seed(2)
    model = _perturb(fd.UNet(**TINY, time_embedding=mode, num_heads=2)).train()
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([5, 600])

    def run():
        model.zero_grad(set_to_none=True)
        out = model(x, t)
        assert out.is_contiguous()
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    seen = []
    real = ops.preferred_memory_format
    monkeypatch.setattr(ops, "preferred_memory_format", lambda t: seen.append(real(t)) or real(t))
    out_cl, g_cl = run()
    assert seen == [torch.channels_last]
    monkeypatch.setattr(ops, "preferred_memory_format", lambda t: torch.contiguous_format)
    out_nchw, g_nchw = run()
    torch.testing.assert_close(out_cl, out_nchw, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_cl, g_nchw):
        torch.testing.assert_close(a, b, atol=1e-4 * (1 + b.abs().max().item()), rtol=1e-4)


@pytest.mark.parametrize("learn_sigma,out_channels,expected", [(False, None, 3), (True, None, 6), (False, 5, 5)])
def test_output_shape(learn_sigma, out_channels, expected):
    unet = fd.UNet(**TINY, learn_sigma=learn_sigma, out_channels=out_channels)
    y = unet(torch.randn(2, 3, 8, 8), torch.tensor([1, 500]))
    assert y.shape == (2, expected, 8, 8)


def test_zero_output_at_init():
    torch.manual_seed(0)
    unet = fd.UNet(**TINY, time_embedding="scale_shift")
    y = unet(torch.randn(3, 3, 8, 8), torch.tensor([0, 10, 999]))
    assert torch.count_nonzero(y) == 0
    # zero-initialised: every ResBlock's last conv, every attention output projection, the output conv
    zero = [n for n, p in unet.named_parameters() if torch.count_nonzero(p) == 0]
    assert "conv_out.weight" in zero and "mid.attention.proj.weight" in zero and "mid.resnet1.conv2.weight" in zero


@pytest.mark.parametrize("mode", ["add", "scale_shift"])
def test_gradients_reach_every_parameter(mode):
    torch.manual_seed(0)
    unet = _perturb(fd.UNet(**{**TINY, "dropout": 0.1}, time_embedding=mode, num_heads=2))
    unet.train()
    x = torch.randn(2, 3, 8, 8)
    out = unet(x, torch.tensor([3, 700]))
    (out * torch.randn_like(out)).sum().backward()
    missing = [n for n, p in unet.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert not missing, missing
    assert len(unet.down[1].attentions) == 1 and len(unet.up[0].attentions) == 2  # attention at 4x4


def test_bfloat16_model_close_to_float32():
    torch.manual_seed(0)
    unet = _perturb(fd.UNet(**TINY, num_classes=2)).eval()
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([4, 400])
    with torch.no_grad():
        ref = unet(x, t)
        low = unet.to(torch.bfloat16)(x.bfloat16(), t)
    assert low.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: errors of a few 1e-2 of the output's scale after ~20 layers
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_time_changes_output_and_scalar_t_broadcasts():
    torch.manual_seed(0)
    unet = _perturb(fd.UNet(**TINY)).eval()
    x = torch.randn(2, 3, 8, 8)
    a = unet(x, torch.tensor([5, 5]))
    torch.testing.assert_close(unet(x, torch.tensor(5)), a, atol=0, rtol=0)
    torch.testing.assert_close(unet(x, 5), a, atol=0, rtol=0)
    assert (unet(x, torch.tensor([6, 6])) - a).abs().max() > 1e-4
    # batch elements are independent
    torch.testing.assert_close(unet(x[1:], torch.tensor([5])), a[1:], atol=1e-5, rtol=1e-5)


def test_class_conditioning():
    torch.manual_seed(0)
    unet = _perturb(fd.UNet(**TINY, num_classes=3)).eval()
    assert unet.class_embedding.num_embeddings == 4  # 3 classes + the null class
    x = torch.randn(2, 3, 8, 8).repeat(2, 1, 1, 1)
    t = torch.tensor([10, 20, 10, 20])
    out = unet(x, t, torch.tensor([0, 1, 2, 2]))
    assert (out[0] - unet(x[:1], t[:1], torch.tensor([1]))[0]).abs().max() > 1e-4
    assert (out[2] - out[0]).abs().max() > 1e-4
    null = unet(x, t)
    torch.testing.assert_close(null, unet(x, t, torch.full((4,), 3)), atol=0, rtol=0)
    assert (null - out).abs().max() > 1e-4
    with pytest.raises(ValueError, match="y"):
        fd.UNet(**TINY)(x, t, torch.tensor([0, 1, 2, 2]))
    with pytest.raises(ValueError, match="y"):
        unet(x, t, torch.tensor([0.0, 1.0, 2.0, 2.0]))


# Inductor's C++ compile of even the tiny U-Net costs minutes of CPU on the CI box, so the default
# backend is "aot_eager": Dynamo must capture the whole forward (fullgraph=True raises on any graph
# break) and AOTAutograd traces forward + backward through the ops' fake/autograd registrations.
# FASTDDPM_TEST_COMPILE_BACKEND=inductor runs the same test through Inductor.
COMPILE_BACKEND = os.environ.get("FASTDDPM_TEST_COMPILE_BACKEND", "aot_eager")


@pytest.mark.slow  # torch.compile of the U-Net
def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    unet = _perturb(fd.UNet(**TINY, num_heads=2, time_embedding="scale_shift", num_classes=2)).eval()
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([1, 900])
    y = torch.tensor([0, 2])
    eager = unet(x, t, y)
    (eager * eager).sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in unet.named_parameters()}
    unet.zero_grad(set_to_none=True)
    compiled = torch.compile(unet, fullgraph=True, backend=COMPILE_BACKEND)(x, t, y)  # a graph break raises
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    (compiled * compiled).sum().backward()
    for n, p in unet.named_parameters():
        # fp32; Inductor reorders reductions: |diff| <= 1e-5 * (1 + max|grad|) (seen: 4.5e-6 * max|grad|)
        scale = 1.0 + eager_grads[n].abs().max().item()
        torch.testing.assert_close(p.grad, eager_grads[n], atol=1e-5 * scale, rtol=0, msg=n)


def test_validation():
    ok = dict(TINY)
    bad = [
        dict(image_size=6, channel_mults=(1, 2, 2)),  # 6 not divisible by 4
        dict(channel_mults=()),
        dict(channel_mults=(1, 0)),
        dict(attention_resolutions=(3,)),
        dict(attention_resolutions=4),
        dict(num_heads=3),
        dict(num_heads=2, head_channels=16),
        dict(head_channels=24),
        dict(groups=5),
        dict(time_embedding="film"),
        dict(dropout=1.5),
        dict(num_res_blocks=0),
        dict(learn_sigma=True, out_channels=3),
        dict(num_classes=0),
        dict(downsample_padding=2),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            fd.UNet(**{**ok, **kw})
    unet = fd.UNet(**ok)
    with pytest.raises(ValueError, match="image_size"):
        unet(torch.randn(1, 3, 16, 16), torch.tensor([0]))
    with pytest.raises(ValueError, match="in_channels"):
        unet(torch.randn(1, 1, 8, 8), torch.tensor([0]))
    with pytest.raises(ValueError, match="t must"):
        unet(torch.randn(2, 3, 8, 8), torch.tensor([0, 1, 2]))
    assert fd.UNet(**ok, head_channels=16).mid.attention.num_heads == 4
    # .config holds every constructor argument (checkpoints rebuild the model from it)
    rebuilt = fd.UNet(**unet.config)
    assert rebuilt.config == unet.config and rebuilt.state_dict().keys() == unet.state_dict().keys()


@pytest.mark.parametrize("kw,name", [
    (dict(norm_eps=float("nan")), "norm_eps"), (dict(norm_eps=float("inf")), "norm_eps"),
    (dict(learn_sigma="yes"), "learn_sigma"), (dict(flip_sin_to_cos=1), "flip_sin_to_cos"),
    (dict(dropout=float("nan")), "dropout"), (dict(freq_shift="1"), "freq_shift"),
    (dict(num_res_blocks=[1]), "num_res_blocks"), (dict(channel_mults="12"), "channel_mults"),
    (dict(recompute_norm="no"), "recompute_norm"), (dict(downsample_padding=True), "downsample_padding"),
])
def test_bad_config_value_names_the_argument(kw, name):
    with pytest.raises(ValueError, match=f"^{name} must be .*got "):
        fd.UNet(**{**TINY, **kw})


def test_config_is_one_object():
    unet = fd.UNet(**TINY, learn_sigma=True)
    cfg = unet.cfg
    assert isinstance(cfg, fd.UNetConfig) and cfg.out_channels == 2 * TINY.get("in_channels", 3)
    # the attributes a caller reads are the config's fields, held once
    assert (unet.image_size, unet.in_channels, unet.out_channels, unet.num_classes) == \
        (cfg.image_size, cfg.in_channels, cfg.out_channels, cfg.num_classes)
    assert unet.conv_out.out_channels == cfg.out_channels and unet.temb_channels == 4 * cfg.base_channels
    assert fd.UNetConfig(**unet.config) == cfg
    unet.recompute_norm = False
    assert unet.config["recompute_norm"] is False
    assert all(not m.recompute_norm for m in unet.modules() if hasattr(m, "recompute_norm") and m is not unet)
    with pytest.raises(AttributeError):
        unet.no_such_attribute


# ---------------------------------------------------------------------------------------------------
# diffusers interop: fd.unet_from_diffusers on small randomly initialised UNet2DModels of DDPM-like configs
DDPM_LIKE = {
    # google/ddpm-cifar10-32, scaled down: attention at the second level, TF-style padding, eps 1e-6
    "cifar10": dict(sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=2,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
                    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=8),
    # google/ddpm-celebahq-256 / -church-256 (6 levels, attention at the 16x16 level), scaled down
    "celebahq": dict(sample_size=32, block_out_channels=(16, 16, 32, 32, 64, 64), layers_per_block=1,
                     down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4, attention_head_dim=None,
                     downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=8),
    # diffusers' defaults: multi-head attention, symmetric padding, [cos, sin]; scale-shift; classes
    "improved": dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                     down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
                     up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"), attention_head_dim=8,
                     resnet_time_scale_shift="scale_shift", attn_norm_num_groups=4, norm_num_groups=4,
                     num_class_embeds=3, out_channels=6),
}


@pytest.mark.parametrize("name", sorted(DDPM_LIKE))
def test_from_diffusers_matches_diffusers(name):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(**DDPM_LIKE[name]).eval()
    with torch.no_grad():  # diffusers' init is not zero anywhere, but make every weight count
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    unet = fd.unet_from_diffusers(ref)
    assert isinstance(unet, fd.UNet) and not unet.training
    assert _num_params(unet) == _num_params(ref) + (unet.temb_channels if unet.num_classes else 0)
    size = ref.config.sample_size
    x = torch.randn(2, ref.config.in_channels, size, size)
    t = torch.tensor([3, 871])
    y = torch.tensor([0, 2]) if unet.num_classes else None
    with torch.no_grad():
        expected = ref(x, t, class_labels=y).sample
        got = unet(x, t, y)
    assert expected.abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    if name == "cifar10":  # a pipeline holding the UNet2DModel converts the same way
        pipe = diffusers.DDPMPipeline(unet=ref, scheduler=diffusers.DDPMScheduler())
        from_pipe = fd.unet_from_diffusers(pipe).state_dict()
        assert all(torch.equal(v, from_pipe[k]) for k, v in unet.state_dict().items())


@pytest.mark.parametrize("option,value", [("time_embedding_type", "fourier"), ("downsample_type", "resnet"),
                                          ("mid_block_scale_factor", 2.0), ("resnet_time_scale_shift", "scale_shift"),
                                          ("up_block_types", ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))])
def test_from_diffusers_rejects_unmappable_config(option, value):
    diffusers = pytest.importorskip("diffusers")
    cfg = {**DDPM_LIKE["cifar10"], option: value}
    ref = diffusers.UNet2DModel(**cfg)
    expected = "attn_norm_num_groups" if option == "resnet_time_scale_shift" else option
    with pytest.raises(ValueError, match=expected):
        fd.unet_from_diffusers(ref)
    with pytest.raises(ValueError, match="UNet2DModel"):
        fd.unet_from_diffusers(torch.nn.Linear(2, 2))


def test_cost_figures_against_diffusers_ddpm_cifar10():
    """The device-independent targets on the DDPM CIFAR-10 config, same weights as diffusers: ops dispatched
    per forward (views included) and bytes saved for backward per training sample (fp32, parameters
    excluded, dropout off as in benchmarks/figures.py) at most half of diffusers' UNet2DModel's."""
    from fastddpm.profiling import count_ops, saved_bytes

    ref = _perturb(_ddpm_cifar10_diffusers(), std=0.01)
    ours = fd.unet_from_diffusers(ref)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([321])
    ops_count, saved = {}, {}
    for name, model in (("diffusers", ref), ("fastddpm", ours)):
        model.eval()
        with torch.no_grad():
            ops_count[name] = sum(count_ops(lambda: model(x, t)).values())
        model.train()
        saved[name] = saved_bytes(lambda: model(x, t), exclude=model.parameters())
    assert ops_count["fastddpm"] <= 0.5 * ops_count["diffusers"], ops_count
    assert saved["fastddpm"] <= 0.5 * saved["diffusers"], saved
    ours.recompute_norm = False  # without the lean mode the GroupNorm+SiLU outputs are kept
    assert saved_bytes(lambda: ours(x, t), exclude=ours.parameters()) > saved["fastddpm"]

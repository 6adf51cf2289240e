"""GPU-only: inpainting's known-region replacement in FastSampler's captured graph (skips without CUDA).

The captured in-place masked step (capture "step" / "loop") against the functional masked kernel run
step by step (`fastddpm.editing.run_sampler`), same model, seed and inputs: fp32, 1e-4 (one kernel body,
as tests/gpu/test_gpu_first_contact.py's FastSampler check). The kept region is the image exactly.
"""
from __future__ import annotations

import pytest
import torch

import fastddpm as fd
from fastddpm.editing import run_sampler
from fastddpm.ops.philox import philox_normal

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("capture", ["step", "loop"])
@pytest.mark.parametrize("name,steps", [("unipc", 8), ("ddpm", 10)])
def test_captured_inpainting_equals_functional_steps(cuda_device, capture, name, steps):
    torch.manual_seed(0)
    net = fd.UNet(image_size=16, base_channels=32, channel_mults=(1, 2), attention_resolutions=(8,), dropout=0.0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    net = net.to(cuda_device).eval()
    smp = fd.make_sampler(name, fd.GaussianDiffusion(fd.NoiseSchedule.linear(1000)), steps)
    image = torch.rand(4, 3, 16, 16, device=cuda_device) * 2 - 1
    mask = torch.ones(1, 1, 16, 16, device=cuda_device)
    mask[..., 8:, :] = 0
    fast = fd.FastSampler(net, smp, 4, capture=capture, known=image, mask=mask)
    got = fast(seed=3)
    assert fast.graph is not None
    seed = torch.tensor([3], device=cuda_device)
    x = philox_normal(seed, (4, 3, 16, 16), torch.zeros(1, dtype=torch.int64, device=cuda_device), stream=1)
    want = run_sampler(smp, net, x, seed, None, True, known=image, mask=mask.expand_as(image))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[..., :8, :], image[..., :8, :], rtol=0, atol=1e-6)
    assert torch.equal(fast(seed=3), got)

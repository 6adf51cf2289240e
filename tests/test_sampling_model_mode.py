"""How sampling runs the model, checked on the CPU (tests/gpu has the device side).

* sampling records no autograd graph (Sampler.sample and FastSampler).
* FastSampler samples a train-mode model in eval mode and restores every submodule's mode.
* FastSampler refuses warmup=0 and models compiled with CUDA graphs of their own before capturing.
"""
from __future__ import annotations

import pytest
import torch

import fastddpm as fd
from fastddpm.graphs import FastSampler


# ------------------------------------------------------------------------------- no autograd graph
class _GradModel(torch.nn.Module):
    """A conv model whose parameters require grad (as a freshly trained model's do), with dropout."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.drop = torch.nn.Dropout(p)
        self.in_channels, self.image_size = 3, 4

    def forward(self, x, t):
        return torch.tanh(self.drop(self.conv(x)) * torch.cos(t.float() / 300)[:, None, None, None])


def _diffusion():
    return fd.GaussianDiffusion(fd.NoiseSchedule.linear(50))


@pytest.mark.parametrize("kind", ["ddpm", "ddim", "dpm++"])
def test_sample_records_no_autograd_graph(kind):
    diff = _diffusion()
    sampler = {"ddpm": fd.DDPMSampler(diff, steps=5), "ddim": fd.DDIMSampler(diff, steps=5, eta=0.5),
               "dpm++": fd.DPMSolverSampler(diff, steps=5)}[kind]
    model = _GradModel()
    assert all(p.requires_grad for p in model.parameters())
    x = sampler.sample(model, (2, 3, 4, 4), seed=0)
    assert x.grad_fn is None and not x.requires_grad
    y = FastSampler(model, sampler, batch_size=2)(seed=0)
    assert y.grad_fn is None and not y.requires_grad
    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- FastSampler checks
def test_train_mode_model_samples_as_in_eval_mode_and_modes_are_restored():
    sampler = fd.DDIMSampler(_diffusion(), steps=5, eta=0.5)
    model = _GradModel(p=0.5)
    model.train()  # dropout active
    model.conv.eval()  # a mixed tree: each submodule's own mode must come back
    fast = FastSampler(model, sampler, batch_size=2)
    got = fast(seed=2)
    assert model.training and model.drop.training and not model.conv.training
    model.eval()
    want = sampler.sample(model, (2, 3, 4, 4), seed=2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_capture_sees_the_model_in_eval_mode():
    from test_graphs import RecordingGraphAPI

    class ModeRecorder(_GradModel):
        def forward(self, x, t):
            modes.append(self.training)
            return super().forward(x, t)

    modes = []
    model = ModeRecorder(p=0.5).train()
    fast = FastSampler(model, fd.DDIMSampler(_diffusion(), steps=3), batch_size=2, capture="step",
                       graph_api=RecordingGraphAPI())
    fast(seed=0)
    assert modes and not any(modes) and model.training


def test_capture_refuses_warmup_zero_and_nested_cuda_graphs():
    from test_graphs import RecordingGraphAPI

    sampler = fd.DDIMSampler(_diffusion(), steps=3)
    model = _GradModel().eval()
    with pytest.raises(ValueError, match="warmup"):
        FastSampler(model, sampler, batch_size=1, capture="step", warmup=0, graph_api=RecordingGraphAPI())
    with pytest.raises(ValueError, match="warmup"):
        FastSampler(model, sampler, batch_size=1, warmup=-1)
    FastSampler(model, sampler, batch_size=1, warmup=0)  # eager: nothing is captured, 0 is fine
    for mode in ("reduce-overhead", "max-autotune"):
        compiled = torch.compile(model, mode=mode)
        with pytest.raises(ValueError, match="reduce-overhead"):
            FastSampler(compiled, sampler, batch_size=1, capture="loop", graph_api=RecordingGraphAPI())
        # inside a wrapper module too
        wrapper = torch.nn.Sequential()
        wrapper.add_module("inner", compiled)
        with pytest.raises(ValueError, match="CUDA graphs"):
            FastSampler(wrapper, sampler, batch_size=1, image_shape=(3, 4, 4), capture="step",
                        graph_api=RecordingGraphAPI())
    in_place = _GradModel().eval()
    in_place.compile(mode="reduce-overhead")  # nn.Module.compile: the module itself is not wrapped
    with pytest.raises(ValueError, match="CUDA graphs"):
        FastSampler(in_place, sampler, batch_size=1, capture="step", graph_api=RecordingGraphAPI())
    with pytest.raises(ValueError, match="CUDA graphs"):  # a compiled function as the model
        FastSampler(torch.compile(lambda x, t: x, mode="reduce-overhead"), sampler, batch_size=1,
                    image_shape=(3, 4, 4), capture="step", graph_api=RecordingGraphAPI())
    ok = torch.compile(model, mode="max-autotune-no-cudagraphs")
    FastSampler(ok, sampler, batch_size=1, image_shape=(3, 4, 4), capture="step", graph_api=RecordingGraphAPI())

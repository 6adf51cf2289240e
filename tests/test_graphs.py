"""FastSampler on the CPU: equality with the plain samplers, batch independence, the capture logic."""
import contextlib

import pytest
import torch

import fastddpm as fd
from fastddpm.graphs import FastSampler


class TinyEps(torch.nn.Module):
    """A small deterministic model whose output depends on x and t (and y when conditional)."""

    def __init__(self, channels=3, out_mult=1, num_classes=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(channels * out_mult, channels, generator=g) * 0.3)
        self.in_channels, self.image_size, self.num_classes = channels, 4, num_classes
        self.calls = 0
        self.batch_sizes = []

    def forward(self, x, t, y=None):
        self.calls += 1
        self.batch_sizes.append(x.shape[0])
        h = torch.einsum("oc,nchw->nohw", self.w, x.float()) * torch.cos(t.float() / 300)[:, None, None, None]
        if y is not None:
            h = h + (y.float()[:, None, None, None] - 1.5) * 0.2
        return torch.tanh(h).to(x.dtype)


def _samplers(variance="fixed_small"):
    diff = fd.GaussianDiffusion(fd.NoiseSchedule.linear(100), prediction="eps", variance=variance)
    return {
        "ddpm": fd.DDPMSampler(diff),
        "ddpm_respaced": fd.DDPMSampler(diff, steps=10),
        "ddim": fd.DDIMSampler(diff, steps=10, eta=0.5),
        "dpm++": fd.DPMSolverSampler(diff, steps=8),
        "dpm++sde": fd.DPMSolverSampler(diff, steps=8, stochastic=True),
    }


@pytest.mark.parametrize("name", ["ddpm", "ddpm_respaced", "ddim", "dpm++", "dpm++sde"])
def test_fast_sampler_equals_plain_sampler(name):
    sampler = _samplers()[name]
    model = TinyEps()
    fast = FastSampler(model, sampler, batch_size=3)
    got = fast(seed=7)
    want = sampler.sample(model, (3, 3, 4, 4), seed=7)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, fast(seed=8))


def test_learned_range_fast_equals_plain():
    sampler = _samplers("learned_range")["ddpm_respaced"]
    model = TinyEps(out_mult=2)
    torch.testing.assert_close(FastSampler(model, sampler, 2)(seed=1), sampler.sample(model, (2, 3, 4, 4), seed=1),
                               rtol=1e-5, atol=1e-5)


def test_image_i_independent_of_batch_size():
    sampler = _samplers()["ddim"]
    model = TinyEps()
    small = FastSampler(model, sampler, batch_size=2)(seed=3)
    large = FastSampler(model, sampler, batch_size=5)(seed=3)
    torch.testing.assert_close(small, large[:2], rtol=1e-6, atol=1e-6)


def test_guided_sampling_one_batched_call_and_matches_manual_guidance():
    sampler = _samplers()["ddim"]
    model = TinyEps(num_classes=4)
    labels = torch.tensor([0, 3])
    fast = FastSampler(model, sampler, batch_size=2, labels=labels, guidance_scale=2.5)
    model.calls, model.batch_sizes = 0, []
    got = fast(seed=0)
    assert model.calls == sampler.num_steps and set(model.batch_sizes) == {4}

    def manual(x, t):
        cond, uncond = model(x, t, y=labels), model(x, t, y=torch.full_like(labels, 4))
        return uncond + 2.5 * (cond - uncond)

    torch.testing.assert_close(got, sampler.sample(manual, (2, 3, 4, 4), seed=0), rtol=1e-5, atol=1e-5)


class RecordingGraphAPI:
    """Stand-in for the CUDA calls: records warm-up, capture and replay; replay re-runs the body."""

    def __init__(self):
        self.events = []

    def side_stream(self, device):
        self.events.append("stream")
        return object()

    @contextlib.contextmanager
    def on_stream(self, stream):
        self.events.append("enter_stream")
        yield
        self.events.append("exit_stream")

    def fork(self, stream, device):
        self.events.append("fork")

    def join(self, stream, device):
        self.events.append("join")

    def capture(self, fn, device):
        self.events.append("capture")
        api = self

        class Graph:
            def replay(self):
                api.events.append("replay")
                fn()

        return Graph()


@pytest.mark.parametrize("mode", ["step", "loop"])
def test_capture_path_with_recording_api(mode):
    sampler = _samplers()["dpm++"]
    model = TinyEps()
    api = RecordingGraphAPI()
    fast = FastSampler(model, sampler, batch_size=2, capture=mode, warmup=3, graph_api=api)
    model.calls = 0
    out = fast(seed=5)
    # warm-up ran 3 eager steps on the side stream before the one capture
    assert api.events[:4] == ["stream", "fork", "enter_stream", "exit_stream"]
    assert api.events.count("capture") == 1 and api.events.index("capture") > api.events.index("join")
    replays = api.events.count("replay")
    assert replays == (sampler.num_steps if mode == "step" else 1)
    assert model.calls == 3 + sampler.num_steps
    # the counter and the seed live in device tensors that the captured body reads
    assert fast.step.dtype == torch.int64 and int(fast.step) == sampler.num_steps
    assert int(fast.seed) == 5
    torch.testing.assert_close(out, sampler.sample(model, (2, 3, 4, 4), seed=5), rtol=1e-5, atol=1e-5)
    fast(seed=6)
    assert api.events.count("capture") == 1  # captured once, replayed for every call


def test_buffers_are_static_across_calls():
    sampler = _samplers()["ddim"]
    fast = FastSampler(TinyEps(), sampler, batch_size=2)
    bufs = lambda: (fast.x.data_ptr(), fast.step.data_ptr(), fast.seed.data_ptr(), fast.coefs.data_ptr(),  # noqa: E731
                    fast.t.data_ptr(), fast.done.data_ptr())
    ptrs = bufs()
    fast(seed=1)
    fast(seed=2)
    assert ptrs == bufs()
    assert fast.t.dtype == torch.int64 and fast.t.shape == (2,) and fast.done.dtype == torch.int32


def test_fast_sampler_bad_arguments():
    sampler = _samplers()["ddim"]
    with pytest.raises(ValueError, match="batch_size"):
        FastSampler(TinyEps(), sampler, batch_size=0)
    with pytest.raises(ValueError, match="capture"):
        FastSampler(TinyEps(), sampler, batch_size=1, capture="sometimes")
    with pytest.raises(ValueError, match="CUDA"):
        FastSampler(TinyEps(), sampler, batch_size=1, capture="step")
    with pytest.raises(ValueError, match="guidance_scale"):
        FastSampler(TinyEps(num_classes=2), sampler, batch_size=1, labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="seed"):
        FastSampler(TinyEps(), sampler, batch_size=1)(seed=-1)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_graph_replay_equals_eager_and_allocations_do_not_grow_with_steps():
    diff = fd.GaussianDiffusion(fd.NoiseSchedule.linear(1000))
    unet = fd.UNet(image_size=16, base_channels=32, channel_mults=(1, 2), attention_resolutions=(8,)).cuda().eval()
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.02)
    sampler = fd.DDIMSampler(diff, steps=20)
    graphed = FastSampler(unet, sampler, batch_size=4)
    eager = FastSampler(unet, sampler, batch_size=4, capture="none")
    a = graphed(seed=0)
    torch.testing.assert_close(a, eager(seed=0), rtol=1e-4, atol=1e-4)
    assert not torch.equal(a, graphed(seed=1))

    def allocations_per_call(steps):
        fast = FastSampler(unet, fd.DDIMSampler(diff, steps=steps), batch_size=4)
        fast(seed=0)  # capture
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats()["allocation.all.allocated"]
        fast(seed=1)
        torch.cuda.synchronize()
        return torch.cuda.memory_stats()["allocation.all.allocated"] - before

    assert allocations_per_call(10) == allocations_per_call(40)


# ----------------------------------------------------------------------------- ops per step
def _ops_outside_model(fast, model):
    from fastddpm.profiling import count_ops

    fast._reset(0)
    model_ops = count_ops(lambda: model(fast.x, fast.t))
    step_ops = count_ops(fast._step)
    outside = step_ops - model_ops  # Counter difference: what the step dispatched besides the model
    return sum(step_ops.values()) - sum(model_ops.values()), outside


@pytest.mark.parametrize("name", ["ddpm_respaced", "ddim", "dpm++", "dpm++sde"])
def test_one_op_per_step_outside_the_model(name):
    sampler = _samplers()[name]
    model = TinyEps()
    fast = FastSampler(model, sampler, batch_size=2)
    n, outside = _ops_outside_model(fast, model)
    assert n == 1 and dict(outside) == {"fastddpm.sampler_step_": 1}
    assert int(fast.step) == 1 and fast.t.tolist() == [int(sampler.timesteps[1])] * 2


def test_one_op_per_step_with_2c_output_and_guidance():
    # 2C-channel output without learned_range (no slice op) and a guided model (its ops are the model's)
    sampler = _samplers()["ddim"]
    model = TinyEps(out_mult=2, num_classes=3)
    fast = FastSampler(model, sampler, batch_size=2, labels=torch.tensor([0, 2]), guidance_scale=1.5)
    n, outside = _ops_outside_model(fast, fast.model)
    assert n == 1 and dict(outside) == {"fastddpm.sampler_step_": 1}
    learned = _samplers("learned_range")["ddpm_respaced"]
    model = TinyEps(out_mult=2)
    n, _ = _ops_outside_model(FastSampler(model, learned, batch_size=2), model)
    assert n == 1


def test_triton_backend_one_op_per_step_and_same_images(triton_on_cpu):
    pytest.importorskip("triton")
    from fastddpm.ops import use_backend

    sampler = _samplers()["ddpm_respaced"]
    model = TinyEps()
    with use_backend("triton"):  # interpreter on CPU: a tiny shape
        fast = FastSampler(model, sampler, batch_size=2)
        n, outside = _ops_outside_model(fast, model)
        assert n == 1 and dict(outside) == {"fastddpm.sampler_step_": 1}
        assert int(fast.step) == 1 and int(fast.done) == 0
        got = fast(seed=4)
    want = sampler.sample(model, (2, 3, 4, 4), seed=4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    dpm = _samplers()["dpm++"]
    with use_backend("triton"):
        got = FastSampler(model, dpm, batch_size=2)(seed=4)
    torch.testing.assert_close(got, dpm.sample(model, (2, 3, 4, 4), seed=4), rtol=1e-5, atol=1e-5)

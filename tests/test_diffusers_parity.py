"""Drop-in parity: our samplers' step() against diffusers' DDPMScheduler.step / DDIMScheduler.step.

Whole sampling loops at 2x3x4x4 with a fixed deterministic "model" (a function of x and t), the
same noise fed to both, each implementation following its own trajectory. The contract (issue 2):
max abs difference <= 3e-4 over the whole loop, for every variance type, prediction type, clip
setting, full and respaced timesteps, and DDIM eta 0 and > 0.
"""
import math
from types import SimpleNamespace

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastddpm.samplers import DDIMSampler, DDPMSampler  # noqa: E402
from fastddpm.schedule import NoiseSchedule  # noqa: E402

TOL = 3e-4
SHAPE = (2, 3, 4, 4)
T = 1000
PRED = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def make_diffusion(schedule, prediction, variance):
    try:
        from fastddpm.diffusion import GaussianDiffusion
    except ImportError:  # stand-in until fastddpm.diffusion lands: the samplers read only these
        return SimpleNamespace(schedule=schedule, prediction=prediction, variance=variance,
                               num_timesteps=schedule.num_timesteps)
    return GaussianDiffusion(schedule, prediction=prediction, variance=variance)


class FixedModel:
    """A deterministic model of (x, t): the exact prediction for Gaussian data N(0, 0.5^2) (so whole
    loops stay O(1) without clipping) plus a fixed nonlinear perturbation mixing channels; with
    learned_range, C more channels tanh(...) in [-1, 1]."""

    def __init__(self, schedule, prediction, channels, learned_range):
        g = torch.Generator().manual_seed(1234)
        self.w = torch.randn(channels, channels, generator=g) / math.sqrt(channels)
        self.b = torch.randn(channels, generator=g)
        self.ab = schedule.alphas_cumprod
        self.prediction = prediction
        self.learned_range = learned_range

    def __call__(self, x, t):
        ab = float(self.ab[t])
        var = ab * 0.25 + 1 - ab
        eps = math.sqrt(1 - ab) / var * x
        x0 = math.sqrt(ab) * 0.25 / var * x
        target = {"eps": eps, "x0": x0, "v": math.sqrt(ab) * eps - math.sqrt(1 - ab) * x0}[self.prediction]
        h = torch.tanh(torch.einsum("oc,nchw->nohw", self.w, x) + (self.b * math.sin(t / 150.0))[None, :, None, None])
        out = target + 0.3 * h
        return torch.cat([out, h.flip(1)], 1) if self.learned_range else out


def run_ddpm_loop(variance, prediction, clip, n_steps):
    schedule = NoiseSchedule.linear(T)
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=T, trained_betas=schedule.betas.numpy(), variance_type=variance,
        prediction_type=PRED[prediction], clip_sample=clip,
    )
    if n_steps is not None:
        scheduler.set_timesteps(n_steps)
    timesteps = scheduler.timesteps.tolist()
    ours = DDPMSampler(make_diffusion(schedule, prediction, variance), steps=timesteps)
    assert ours.timesteps.tolist() == timesteps
    model = FixedModel(schedule, prediction, SHAPE[1], variance == "learned_range")
    x_ref = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    x = x_ref.clone()
    worst = worst_x0 = 0.0
    for k, t in enumerate(timesteps):
        m_ref, m = model(x_ref, t), model(x, t)
        # diffusers draws its noise with randn_tensor(shape, generator) only for t > 0
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(10_000 + k))
        out = scheduler.step(m_ref, t, x_ref, generator=torch.Generator().manual_seed(10_000 + k))
        x_ref = out.prev_sample
        x, x0 = ours.step(m, t, x, noise=noise, clip_denoised=clip, return_x0=True)
        worst = max(worst, (x - x_ref).abs().max().item())
        worst_x0 = max(worst_x0, (x0 - out.pred_original_sample).abs().max().item())
    return worst, worst_x0, x_ref


@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_step_matches_diffusers_respaced(variance, prediction, clip):
    """Every combination on diffusers' 50 respaced timesteps (set_timesteps(50))."""
    worst, worst_x0, x_ref = run_ddpm_loop(variance, prediction, clip, 50)
    assert torch.isfinite(x_ref).all()
    assert worst <= TOL, f"max abs diff {worst:.3g}"
    assert worst_x0 <= TOL, f"max abs diff of pred_original_sample {worst_x0:.3g}"


# all 1000 timesteps: every variance, every prediction and both clip settings appear (a 1000-step
# loop costs ~2 s of CPU, so not the full product)
FULL_CASES = [
    ("fixed_small", "eps", True), ("fixed_small", "x0", False), ("fixed_small", "v", False),
    ("fixed_large", "eps", False), ("fixed_large", "v", True),
    ("learned_range", "eps", True), ("learned_range", "x0", False),
]


@pytest.mark.parametrize("variance,prediction,clip", FULL_CASES)
def test_ddpm_step_matches_diffusers_full(variance, prediction, clip):
    worst, worst_x0, x_ref = run_ddpm_loop(variance, prediction, clip, None)
    assert torch.isfinite(x_ref).all()
    assert worst <= TOL, f"max abs diff {worst:.3g}"
    assert worst_x0 <= TOL, f"max abs diff of pred_original_sample {worst_x0:.3g}"


def test_ddpm_parity_is_sensitive():
    """The loop comparison fails when our coefficients are off (guards against a vacuous test)."""
    schedule = NoiseSchedule.linear(T)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=T, trained_betas=schedule.betas.numpy(),
                                        variance_type="fixed_large", clip_sample=False)
    scheduler.set_timesteps(20)
    ts = scheduler.timesteps.tolist()
    ours = DDPMSampler(make_diffusion(schedule, "eps", "fixed_small"), steps=ts)  # the wrong variance
    model = FixedModel(schedule, "eps", 3, False)
    x_ref = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    x = x_ref.clone()
    for k, t in enumerate(ts):
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(k))
        x_ref = scheduler.step(model(x_ref, t), t, x_ref, generator=torch.Generator().manual_seed(k)).prev_sample
        x = ours.step(model(x, t), t, x, noise=noise, clip_denoised=False)
    assert (x - x_ref).abs().max().item() > 1e-2


@pytest.mark.parametrize("n_steps", [10, 50])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddim_step_matches_diffusers(prediction, clip, eta, n_steps):
    schedule = NoiseSchedule.linear(T)
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=T, trained_betas=schedule.betas.numpy(), prediction_type=PRED[prediction],
        clip_sample=clip, set_alpha_to_one=True,
    )
    scheduler.set_timesteps(n_steps)
    timesteps = scheduler.timesteps.tolist()
    ours = DDIMSampler(make_diffusion(schedule, prediction, "fixed_small"), steps=timesteps, eta=eta)
    model = FixedModel(schedule, prediction, SHAPE[1], False)
    x_ref = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    x = x_ref.clone()
    worst = 0.0
    for k, t in enumerate(timesteps):
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(20_000 + k))
        out = scheduler.step(model(x_ref, t), t, x_ref, eta=eta, variance_noise=noise if eta > 0 else None)
        x_ref = out.prev_sample
        x = ours.step(model(x, t), t, x, noise=noise, clip_denoised=clip)
        worst = max(worst, (x - x_ref).abs().max().item())
    assert torch.isfinite(x_ref).all()
    assert worst <= TOL, f"max abs diff {worst:.3g}"


def test_ddim_full_schedule_matches_diffusers():
    """DDIM over all 1000 timesteps with eta = 1 (diffusers' DDPM-like limit)."""
    schedule = NoiseSchedule.linear(T)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=T, trained_betas=schedule.betas.numpy(), clip_sample=True)
    scheduler.set_timesteps(T)
    timesteps = scheduler.timesteps.tolist()
    ours = DDIMSampler(make_diffusion(schedule, "eps", "fixed_small"), steps=None, eta=1.0)
    assert ours.timesteps.tolist() == timesteps
    model = FixedModel(schedule, "eps", SHAPE[1], False)
    x_ref = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    x = x_ref.clone()
    worst = 0.0
    for k, t in enumerate(timesteps):
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(k))
        x_ref = scheduler.step(model(x_ref, t), t, x_ref, eta=1.0, variance_noise=noise).prev_sample
        x = ours.step(model(x, t), t, x, noise=noise)
        worst = max(worst, (x - x_ref).abs().max().item())
    assert worst <= TOL, f"max abs diff {worst:.3g}"

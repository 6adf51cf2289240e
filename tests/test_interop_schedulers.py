"""diffusers schedulers -> fastddpm: tables, timesteps, and FastSampler.from_diffusers vs diffusers' loop."""
import pytest
import torch

import fastddpm as fd
from fastddpm.interop.schedulers import diffusion_from_scheduler, sampler_from_scheduler
from fastddpm.ops.philox import philox_normal

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_match_diffusers(kind):
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=kind)
    diff = diffusion_from_scheduler(sched)
    torch.testing.assert_close(diff.schedule.alphas_cumprod.float(), sched.alphas_cumprod, rtol=2e-5, atol=1e-6)


def test_prediction_variance_and_clip_are_read():
    sched = diffusers.DDPMScheduler(prediction_type="v_prediction", variance_type="learned_range", clip_sample=False)
    sampler, clip = sampler_from_scheduler(sched, "ddpm", steps=25)
    assert (sampler.prediction, sampler.variance, clip) == ("v", "learned_range", False)
    probe = diffusers.DDPMScheduler.from_config(sched.config)
    probe.set_timesteps(25)
    assert sampler.timesteps.tolist() == probe.timesteps.tolist()


def test_unsupported_scheduler_options_name_the_option():
    with pytest.raises(ValueError, match="variance_type"):
        diffusion_from_scheduler(diffusers.DDPMScheduler(variance_type="fixed_large_log"))
    with pytest.raises(ValueError, match="variance_type"):
        diffusion_from_scheduler(diffusers.DDPMScheduler(variance_type="learned"))
    with pytest.raises(ValueError, match="sampler"):
        sampler_from_scheduler(diffusers.DDPMScheduler(), "euler", steps=10)


def _tiny_unet2d():
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                 norm_num_groups=8).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing, but make the output clearly non-trivial
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return unet


def _philox_loop(model, scheduler, seed, steps, shape):
    """diffusers' loop from fastddpm's Philox x_T of `seed` (what FastSampler starts from); no noise drawn."""
    x = philox_normal(torch.tensor([seed]), shape, torch.zeros(1, dtype=torch.int64), stream=1)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model(x, t)
            x = scheduler.step(getattr(out, "sample", out), t, x).prev_sample
    return x


@pytest.mark.parametrize("convert", [True, False])
def test_fast_sampler_from_diffusers_equals_diffusers_ddim_loop(convert):
    unet = _tiny_unet2d()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=True)
    fast = fd.FastSampler.from_diffusers(unet, scheduler, steps=10, batch_size=2, convert=convert)
    got = fast(seed=4)
    torch.testing.assert_close(got, _philox_loop(unet, scheduler, 4, 10, (2, 3, 8, 8)), rtol=2e-4, atol=2e-4)


# ----------------------------------------------------------------------------- every config, whole loops
# A deterministic stand-in model (large enough outputs that clipping and thresholding bite); whole loops of
# the fastddpm sampler built from a config against the diffusers scheduler with the same config, the same
# x_T and the same generator stream (fastddpm draws noise exactly on the steps where diffusers does).
def _model(x, t):
    out = torch.tanh(0.7 * x + t.float().view(-1, 1, 1, 1) / 700.0) * 1.3 + 0.2 * x.roll(1, -1)
    return out


def _model_learned(x, t):
    return torch.cat([_model(x, t), torch.tanh(0.5 * x)], dim=1)


_SHAPE = (2, 3, 4, 4)
_X0_MODES = {
    "clip": dict(clip_sample=True),
    "noclip": dict(clip_sample=False),
    "range": dict(clip_sample=True, clip_sample_range=1.5),
    "thresh": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5),
}


def _diffusers_loop(scheduler, model, steps, eta=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(_SHAPE, generator=g)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        out = model(x, torch.full((_SHAPE[0],), int(t)))
        kw = {} if eta is None else {"eta": eta}
        x = scheduler.step(out, t, x, generator=g, **kw).prev_sample
    return x


def _fastddpm_loop(scheduler, model, steps, sampler, eta=0.0):
    smp, clip = sampler_from_scheduler(scheduler, sampler, steps=steps, eta=eta)
    return smp.sample(model, _SHAPE, generator=torch.Generator().manual_seed(0), clip_denoised=clip)


@pytest.mark.parametrize("x0_mode", sorted(_X0_MODES))
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("kind", ["eps/fixed_small", "eps/fixed_large", "v/learned_range/zero_snr", "x0/fixed_small_log"])
def test_ddpm_config_loops_equal_diffusers(kind, spacing, offset, x0_mode):
    pred, variance, *zero = kind.split("/")
    prediction = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[pred]
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    prediction_type=prediction, variance_type=variance, timestep_spacing=spacing,
                                    steps_offset=offset, rescale_betas_zero_snr=bool(zero), **_X0_MODES[x0_mode])
    model = _model_learned if variance == "learned_range" else _model
    want = _diffusers_loop(sched, model, 7)
    got = _fastddpm_loop(sched, model, 7, "ddpm")
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("x0_mode", sorted(_X0_MODES))
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("alpha_to_one", [True, False])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("kind", ["eps", "v/zero_snr"])
def test_ddim_config_loops_equal_diffusers(kind, spacing, offset, alpha_to_one, eta, x0_mode):
    pred, *zero = kind.split("/")
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    prediction_type="epsilon" if pred == "eps" else "v_prediction",
                                    timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=alpha_to_one,
                                    rescale_betas_zero_snr=bool(zero), **_X0_MODES[x0_mode])
    want = _diffusers_loop(sched, _model, 7, eta=eta)
    got = _fastddpm_loop(sched, _model, 7, "ddim", eta=eta)
    if zero and eta > 0 and spacing != "leading":
        # diffusers' own NaN: at the zero-SNR step sigma^2 = 1 - ab_prev, and its float32
        # sqrt(1 - ab_prev - sigma^2) takes the root of a rounding-negative number; fastddpm clamps it at 0
        assert torch.isnan(want).all() and torch.isfinite(got).all()
        return
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_ddim_config_loop_check_is_sensitive():
    # the plain DDIMSampler on the same timesteps is what ran before: a different loop for these configs
    for kw in (dict(set_alpha_to_one=False), dict(timestep_spacing="linspace")):
        sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, **kw)
        want = _diffusers_loop(sched, _model, 7, eta=0.0)
        smp, _ = sampler_from_scheduler(sched, "ddim", steps=7)
        plain = fd.DDIMSampler(smp.diffusion, steps=smp.timesteps.tolist())
        old = plain.sample(_model, _SHAPE, generator=torch.Generator().manual_seed(0), clip_denoised=False)
        assert (old - want).abs().max() > 1e-3


def test_clip_range_step_returns_the_true_x0():
    sched = diffusers.DDPMScheduler(clip_sample=True, clip_sample_range=1.5)
    smp, clip = sampler_from_scheduler(sched, "ddpm", steps=5)
    x = torch.randn(_SHAPE, generator=torch.Generator().manual_seed(1)) * 3
    t = int(smp.timesteps[1])
    _, x0 = smp.step(_model(x, torch.full((2,), t)), t, x, noise=torch.zeros(_SHAPE), clip_denoised=clip,
                     return_x0=True)
    sched.set_timesteps(5)
    ref = sched.step(_model(x, torch.full((2,), t)), t, x).pred_original_sample
    torch.testing.assert_close(x0, ref, rtol=1e-4, atol=1e-5)
    assert x0.abs().max() > 1.0 and x0.abs().max() <= 1.5


def test_dynamic_threshold_formula():
    from fastddpm.interop.schedulers import dynamic_threshold

    x0 = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(2)) * 2
    got = dynamic_threshold(x0, 0.8, 1.7)
    flat = x0.reshape(3, -1).double().numpy()
    import numpy as np

    s = np.clip(np.quantile(np.abs(flat), 0.8, axis=1), 1.0, 1.7)[:, None]
    want = torch.from_numpy(np.clip(flat, -s, s) / s).reshape(x0.shape).float()
    torch.testing.assert_close(got, want)


def test_config_refusals_name_the_setting():
    with pytest.raises(ValueError, match="steps"):
        sampler_from_scheduler(diffusers.DDIMScheduler(), "ddim", steps=0)
    with pytest.raises(ValueError, match="steps"):
        fd.FastSampler.from_diffusers(_model, diffusers.DDIMScheduler(), steps=0, image_shape=(3, 4, 4))
    with pytest.raises(ValueError, match="steps_offset"):  # timesteps 1..1000 of 1000: diffusers indexes past the end
        sampler_from_scheduler(diffusers.DDPMScheduler(steps_offset=1), "ddpm", steps=1000)
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):  # eps at the zero-SNR timestep
        sampler_from_scheduler(diffusers.DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing"),
                               "ddim", steps=10)
    with pytest.raises(ValueError, match="thresholding"):
        sampler_from_scheduler(diffusers.DDPMScheduler(thresholding=True), "dpm++", steps=10)
    with pytest.raises(ValueError, match="clip_sample_range"):
        sampler_from_scheduler(diffusers.DDPMScheduler(clip_sample_range=2.0), "dpm++", steps=10)
    with pytest.raises(ValueError, match="EulerDiscreteScheduler"):
        sampler_from_scheduler(diffusers.EulerDiscreteScheduler(), steps=10)
    with pytest.raises(ValueError, match="thresholding"):
        fd.FastSampler.from_diffusers(_model, diffusers.DDPMScheduler(thresholding=True), steps=5,
                                      image_shape=(3, 4, 4))


def test_fast_sampler_runs_a_stable_diffusion_style_ddim_config():
    # set_alpha_to_one=False + linspace + clip range: the static-buffer loop (the CUDA-graph path's logic)
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    set_alpha_to_one=False, timestep_spacing="linspace", clip_sample=True,
                                    clip_sample_range=1.5)
    fast = fd.FastSampler.from_diffusers(_model, sched, steps=7, batch_size=2, image_shape=(3, 4, 4))
    got = fast(seed=3)
    torch.testing.assert_close(got, _philox_loop(_model, sched, 3, 7, (2, 3, 4, 4)), rtol=1e-4, atol=1e-4)


def test_from_diffusers_accepts_a_pipeline_folder(tmp_path):
    unet = _tiny_unet2d()
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(set_alpha_to_one=False))
    pipe.save_pretrained(tmp_path / "pipe")
    from_dir = fd.FastSampler.from_diffusers(str(tmp_path / "pipe"), steps=4, batch_size=2)
    from_obj = fd.FastSampler.from_diffusers(pipe, steps=4, batch_size=2)
    assert isinstance(from_dir.sampler, type(from_obj.sampler)) and not from_dir.sampler.set_alpha_to_one
    torch.testing.assert_close(from_dir(seed=1), from_obj(seed=1))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        fd.FastSampler.from_diffusers(str(tmp_path / "empty"))


def test_load_diffusers_folder_reproduces_its_scheduler(tmp_path):
    unet = _tiny_unet2d()
    sched = diffusers.DDIMScheduler(set_alpha_to_one=False, timestep_spacing="trailing", clip_sample=False)
    diffusers.DDIMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path / "pipe")
    pipe = fd.load(str(tmp_path / "pipe"), device="cpu")
    assert isinstance(pipe.unet, fd.UNet) and pipe.config["scheduler"]["set_alpha_to_one"] is False
    got = pipe(2, seed=3, num_inference_steps=5, output_type="pt").images
    torch.testing.assert_close(got, _philox_loop(unet, sched, 3, 5, (2, 3, 8, 8)), rtol=2e-4, atol=2e-4)

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
    with pytest.raises(ValueError, match="thresholding"):
        diffusion_from_scheduler(diffusers.DDPMScheduler(thresholding=True))
    with pytest.raises(ValueError, match="variance_type"):
        diffusion_from_scheduler(diffusers.DDPMScheduler(variance_type="fixed_small_log"))
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


@pytest.mark.parametrize("convert", [True, False])
def test_fast_sampler_from_diffusers_equals_diffusers_ddim_loop(convert):
    unet = _tiny_unet2d()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=True)
    fast = fd.FastSampler.from_diffusers(unet, scheduler, steps=10, batch_size=2, convert=convert)
    got = fast(seed=4)

    x = philox_normal(torch.tensor([4]), (2, 3, 8, 8), torch.zeros(1, dtype=torch.int64), stream=1)
    scheduler.set_timesteps(10)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    torch.testing.assert_close(got, x, rtol=2e-4, atol=2e-4)

"""fastddpm: denoising diffusion probabilistic models with fused Triton kernels.

    import fastddpm as fd
    diff = fd.GaussianDiffusion(fd.NoiseSchedule.cosine(1000), prediction="eps")
    x = fd.DDIMSampler(diff, steps=50).sample(model, (16, 3, 32, 32), seed=0)
"""
from .schedule import NoiseSchedule, space_timesteps

__version__ = "0.1.0"

__all__ = ["NoiseSchedule", "space_timesteps"]

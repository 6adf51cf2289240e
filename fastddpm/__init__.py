"""fastddpm: denoising diffusion probabilistic models with fused Triton kernels.

    import fastddpm as fd
    diff = fd.GaussianDiffusion(fd.NoiseSchedule.cosine(1000), prediction="eps")
    x = fd.DDIMSampler(diff, steps=50).sample(model, (16, 3, 32, 32), seed=0)

Public names are imported on first use, so `import fastddpm` stays cheap and never imports triton.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "NoiseSchedule": "schedule",
    "space_timesteps": "schedule",
    "GaussianDiffusion": "diffusion",
    "DDPMSampler": "samplers",
    "DDIMSampler": "samplers",
    "DPMSolverSampler": "samplers",
    "DPMSolver3MSampler": "samplers",
    "UniPCSampler": "samplers",
    "make_sampler": "samplers",
    "make_timesteps": "spacing",
    "tune_timesteps": "tune",
    "UNet": "unet",
    "UNetConfig": "unet_config",
    "unet_from_diffusers": "interop.diffusers",
    "export_diffusers": "interop.export",
    "inpaint": "editing",
    "img2img": "editing",
    "FastSampler": "graphs",
    "to_pil": "images",
    "to_uint8": "images",
    "save_grid": "images",
    "fid": "evaluate",
    "load": "pretrained",
    "Pipeline": "pretrained",
    "distill": "distillation",  # the function (the module is fastddpm.distillation)
    "DistillConfig": "distillation",
}
# submodules reachable as attributes without an explicit import (fd.metrics.frechet_distance, ...)
_SUBMODULES = ("metrics", "evaluate", "features", "inception", "images", "interop")

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastddpm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

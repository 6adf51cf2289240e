"""diffusers schedulers -> fastddpm diffusion and samplers.

`diffusion_from_scheduler` rebuilds the betas from the scheduler's config in float64 (diffusers keeps
them in float32), with its prediction and variance types; `sampler_from_scheduler` gives the fastddpm
sampler whose timesteps are exactly those the diffusers scheduler walks after `set_timesteps(steps)`,
so that a diffusers pipeline and fastddpm can be compared step for step.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch

from ..diffusion import GaussianDiffusion
from ..samplers import make_sampler
from ..schedule import NoiseSchedule

_PREDICTION = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_VARIANCE = {"fixed_small": "fixed_small", "fixed_large": "fixed_large", "learned_range": "learned_range"}


def _cfg(scheduler: Any, key: str, default: Any = None) -> Any:
    config = getattr(scheduler, "config", scheduler)
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def betas_from_scheduler(scheduler: Any) -> torch.Tensor:
    """float64 betas from a diffusers scheduler config (linear, scaled_linear, squaredcos_cap_v2, trained)."""
    T = int(_cfg(scheduler, "num_train_timesteps", 1000))
    trained = _cfg(scheduler, "trained_betas")
    if trained is not None:
        return torch.as_tensor(trained, dtype=torch.float64)
    kind = _cfg(scheduler, "beta_schedule", "linear")
    start, end = float(_cfg(scheduler, "beta_start", 1e-4)), float(_cfg(scheduler, "beta_end", 0.02))
    if kind == "linear":
        return torch.linspace(start, end, T, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(math.sqrt(start), math.sqrt(end), T, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":
        return NoiseSchedule.cosine(T).betas
    raise ValueError(f"unsupported scheduler beta_schedule={kind!r} (supported: 'linear', 'scaled_linear', "
                     f"'squaredcos_cap_v2', or trained_betas)")


def diffusion_from_scheduler(scheduler: Any) -> GaussianDiffusion:
    """The GaussianDiffusion (schedule, prediction, variance) a diffusers scheduler samples from."""
    if _cfg(scheduler, "rescale_betas_zero_snr", False):
        raise ValueError("unsupported scheduler option rescale_betas_zero_snr=True")
    if _cfg(scheduler, "thresholding", False):
        raise ValueError("unsupported scheduler option thresholding=True (dynamic thresholding)")
    prediction = _cfg(scheduler, "prediction_type", "epsilon")
    if prediction not in _PREDICTION:
        raise ValueError(f"unsupported scheduler prediction_type={prediction!r} (supported: {sorted(_PREDICTION)})")
    variance = _cfg(scheduler, "variance_type", "fixed_small") or "fixed_small"
    if variance not in _VARIANCE:
        raise ValueError(f"unsupported scheduler variance_type={variance!r} (supported: {sorted(_VARIANCE)})")
    return GaussianDiffusion(NoiseSchedule(betas_from_scheduler(scheduler)), prediction=_PREDICTION[prediction],
                             variance=_VARIANCE[variance])


def sampler_from_scheduler(scheduler: Any, sampler: Optional[str] = None, steps: Optional[int] = None,
                           eta: float = 0.0) -> Tuple[Any, bool]:
    """(fastddpm sampler, clip_denoised) matching a diffusers scheduler.

    `sampler` defaults to "ddim" for a DDIMScheduler and "ddpm" otherwise. For "ddpm"/"ddim" the
    timesteps are the scheduler's own after `set_timesteps(steps)` (its spacing and offset included);
    the multistep solvers ("dpm++", "dpm++sde", "dpm++3m", "dpm++3m-sde", "unipc") use fastddpm's spacing.
    """
    diffusion = diffusion_from_scheduler(scheduler)
    if sampler is None:
        sampler = "ddim" if type(scheduler).__name__.startswith("DDIM") else "ddpm"
    clip = bool(_cfg(scheduler, "clip_sample", False))
    if sampler not in ("ddpm", "ddim") or steps is None and sampler == "ddpm":
        return make_sampler(sampler, diffusion, steps, eta), clip
    probe = type(scheduler).from_config(scheduler.config)
    probe.set_timesteps(50 if steps is None else steps)
    timesteps = [int(t) for t in probe.timesteps.tolist()]
    return make_sampler(sampler, diffusion, timesteps, eta), clip

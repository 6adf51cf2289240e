"""diffusers schedulers -> fastddpm diffusion and samplers, reproducing the scheduler's config or refusing it.

`diffusion_from_scheduler` rebuilds the betas from the scheduler's config in float64 (diffusers keeps
them in float32), with its prediction and variance types; `sampler_from_scheduler` gives the fastddpm
sampler that walks exactly the loop a diffusers `DDPMScheduler` / `DDIMScheduler` with that config
walks after `set_timesteps(steps)`. Every config option is either reproduced or refused with a
ValueError that names it; nothing runs a different sampler than the config describes:

- ``timestep_spacing`` ("leading", "trailing", "linspace") and ``steps_offset``: the timesteps are the
  scheduler's own. DDPM steps to the next listed timestep (as fastddpm's respacing does) and, as
  diffusers, adds noise at the final step when that step's timestep is > 0 (leading spacing with
  ``steps_offset``, trailing spacing). DDIM steps from t to ``t - T // steps`` whatever the spacing
  (so linspace / trailing lists with T % steps != 0 do not step to the next listed timestep) and
  ends at ``final_alpha_cumprod``: 1 with ``set_alpha_to_one=True``, else alpha_bar[0] (Stable
  Diffusion configs), in which case the last step keeps some noise and, with eta > 0, adds some.
  Those are :class:`DiffusersDDPMSampler` / :class:`DiffusersDDIMSampler`: coefficient tables, so the
  fused op and `FastSampler` (its CUDA graph included) run them unchanged.
- ``clip_sample_range`` r: clamp(x0, -r, r) = r clamp(x0 / r, -1, 1), so the table holds A / r,
  B / r and r P and the op's [-1, 1] clamp gives the exact result (``clip_denoised`` switches it).
- ``thresholding`` (Imagen's dynamic thresholding, with ``dynamic_thresholding_ratio`` and
  ``sample_max_value``): per image s = clamp(quantile(|x0|, ratio), 1, max), x0c = clamp(x0, -s, s) / s.
  The per-image quantile cannot live in the elementwise op, so the step runs the op with the x0c
  column zeroed (it gives the rest of the update, noise included, and the raw x0) and adds
  P x0c in plain torch. `sampler.sample` / `sampler.step` do this; `FastSampler` refuses such a
  sampler (a quantile inside a replayed graph is not worth the risk; the step costs a sort anyway).
- ``rescale_betas_zero_snr``: diffusers' Algorithm 1 of Lin et al. 2023 in float64. Its terminal
  alpha_bar is exactly 0, which `NoiseSchedule` (betas in the open interval (0, 1)) cannot hold, so
  the terminal alpha_bar is set to ``ZERO_SNR_ALPHA_BAR`` = 1e-12 (the smallest power of ten for which
  every respaced beta 1 - alpha_bar_T / alpha_bar_prev stays below 1 in float64): sqrt(alpha_bar_T) =
  1e-6, so a v- or x0-model's x0-hat at that one timestep differs from diffusers' by at most 1e-6 |x_T|. An "epsilon" model at that timestep has no x0 (x0 = x_t /
  sqrt(alpha_bar) = inf, NaN or a clamp in diffusers): a loop that visits it is refused.
- ``variance_type``: fixed_small, fixed_small_log (the same sigma), fixed_large, learned_range; the
  others are refused. ``prediction_type``: epsilon, sample, v_prediction.

"dpm++" / "dpm++sde" use fastddpm's own spacing with the config's betas and prediction type; options
they cannot honour (thresholding, clip_sample_range != 1) are refused.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..diffusion import GaussianDiffusion
from ..ops.sampler_step import COLUMNS, sampler_step
from ..samplers import DDIMSampler, DDPMSampler, ddim_coefs, make_sampler
from ..schedule import NoiseSchedule

__all__ = ["betas_from_scheduler", "diffusion_from_scheduler", "sampler_from_scheduler", "dynamic_threshold",
           "DiffusersDDPMSampler", "DiffusersDDIMSampler", "ZERO_SNR_ALPHA_BAR", "SCHEDULER_CLASSES"]

_PREDICTION = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# fixed_small_log draws sigma = exp(0.5 log var) = sqrt(var): fixed_small's sigma
_VARIANCE = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
             "learned_range": "learned_range"}
_SPACINGS = ("leading", "trailing", "linspace")
SCHEDULER_CLASSES = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim"}
ZERO_SNR_ALPHA_BAR = 1e-12
_A, _B, _P = COLUMNS.index("A"), COLUMNS.index("B"), COLUMNS.index("P")
_SIGMA, _LOG_MIN, _LOG_MAX = COLUMNS.index("SIGMA"), COLUMNS.index("LOG_MIN"), COLUMNS.index("LOG_MAX")


def _cfg(scheduler: Any, key: str, default: Any = None) -> Any:
    config = getattr(scheduler, "config", scheduler)
    value = config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)
    return default if value is None and default is not None else value


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1 (diffusers' rescale_zero_terminal_snr), float64; terminal alpha_bar
    ZERO_SNR_ALPHA_BAR instead of 0 (see the module docstring)."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    ab[-1] = ZERO_SNR_ALPHA_BAR
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def betas_from_scheduler(scheduler: Any) -> torch.Tensor:
    """float64 betas from a diffusers scheduler config (linear, scaled_linear, squaredcos_cap_v2, trained),
    rescaled to zero terminal SNR when the config says so."""
    T = int(_cfg(scheduler, "num_train_timesteps", 1000))
    trained = _cfg(scheduler, "trained_betas")
    kind = _cfg(scheduler, "beta_schedule", "linear")
    start, end = float(_cfg(scheduler, "beta_start", 1e-4)), float(_cfg(scheduler, "beta_end", 0.02))
    if trained is not None:
        betas = torch.as_tensor(trained, dtype=torch.float64)
    elif kind == "linear":
        betas = torch.linspace(start, end, T, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(math.sqrt(start), math.sqrt(end), T, dtype=torch.float64) ** 2
    elif kind == "squaredcos_cap_v2":
        betas = NoiseSchedule.cosine(T).betas
    else:
        raise ValueError(f"unsupported scheduler beta_schedule={kind!r} (supported: 'linear', 'scaled_linear', "
                         f"'squaredcos_cap_v2', or trained_betas)")
    if _cfg(scheduler, "rescale_betas_zero_snr", False):
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def diffusion_from_scheduler(scheduler: Any) -> GaussianDiffusion:
    """The GaussianDiffusion (schedule, prediction, variance) a diffusers scheduler samples from."""
    prediction = _cfg(scheduler, "prediction_type", "epsilon")
    if prediction not in _PREDICTION:
        raise ValueError(f"unsupported scheduler prediction_type={prediction!r} (supported: {sorted(_PREDICTION)})")
    variance = _cfg(scheduler, "variance_type", "fixed_small")
    if variance not in _VARIANCE:
        raise ValueError(f"unsupported scheduler variance_type={variance!r} (supported: {sorted(_VARIANCE)})")
    return GaussianDiffusion(NoiseSchedule(betas_from_scheduler(scheduler)), prediction=_PREDICTION[prediction],
                             variance=_VARIANCE[variance])


# ----------------------------------------------------------------------------- x0 processing
def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding per image: s = clamp(quantile(|x0|, ratio), 1, max_value),
    x0 -> clamp(x0, -s, s) / s (s = 1 is the plain [-1, 1] clip). Quantile in fp32 for half inputs."""
    work = x0 if x0.dtype in (torch.float32, torch.float64) else x0.float()
    flat = work.reshape(work.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value).unsqueeze(1)
    return (flat.clamp(-s, s) / s).reshape(x0.shape).to(x0.dtype)


class _ConfigX0:
    """x0 processing of a diffusers config (clip range, dynamic thresholding) on top of a table sampler.

    `_scale_table` folds the clip range into the table (A / r, B / r, r P); `_fused_step` returns the
    true x0-hat (times r) and, with thresholding, runs the op with P = 0 and adds P x0c itself.
    """

    clip_range: float = 1.0
    thresholding: Optional[Tuple[float, float]] = None  # (ratio, max_value)

    def _scale_table(self, c: torch.Tensor) -> torch.Tensor:
        if self.clip_range != 1.0 and self.thresholding is None:
            c[:, _A] /= self.clip_range
            c[:, _B] /= self.clip_range
            c[:, _P] *= self.clip_range
        return c

    def _fused_step(self, x, model_output, coefs, step, x0_prev, noise, seed, image_offset, clip):
        if self.thresholding is None:
            x_prev, x0 = sampler_step(x, model_output, coefs, step, x0_prev, noise, seed, image_offset, clip,
                                      self.learned_range)
            return x_prev, (x0 * self.clip_range if self.clip_range != 1.0 else x0)
        no_x0 = coefs.clone()
        no_x0[:, _P] = 0.0
        rest, x0 = sampler_step(x, model_output, no_x0, step, x0_prev, noise, seed, image_offset, False,
                                self.learned_range)
        if clip:
            x0 = dynamic_threshold(x0, *self.thresholding)
        p = coefs[:, _P].index_select(0, step.reshape(1))  # on the device: no host sync
        x_prev = torch.addcmul(rest.float(), p, x0.float()).to(x.dtype)
        return x_prev, x0


def _set_x0_options(sampler: Any, clip_range: float, thresholding: Optional[Tuple[float, float]]) -> None:
    if not (isinstance(clip_range, numbers.Real) and math.isfinite(clip_range) and clip_range > 0):
        raise ValueError(f"clip_sample_range must be a positive number, got {clip_range!r}")
    if thresholding is not None:
        ratio, max_value = (float(v) for v in thresholding)
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {ratio}")
        if not max_value >= 1.0:
            raise ValueError(f"sample_max_value must be >= 1 with thresholding, got {max_value}")
        thresholding = (ratio, max_value)
    sampler.clip_range = float(clip_range)
    sampler.thresholding = thresholding


class DiffusersDDPMSampler(_ConfigX0, DDPMSampler):
    """DDPMSampler with diffusers' DDPMScheduler rules: final-step noise when the last timestep is > 0,
    clip_sample_range, dynamic thresholding (see the module docstring).

    Args:
        diffusion: the GaussianDiffusion (e.g. `diffusion_from_scheduler`).
        timesteps: the scheduler's timesteps (descending), or None for all T.
        clip_range: clip_sample_range r (x0-hat clamped to [-r, r] when clip_denoised).
        thresholding: (dynamic_thresholding_ratio, sample_max_value), or None.
    """

    def __init__(self, diffusion: Any, timesteps: Any = None, *, clip_range: float = 1.0,
                 thresholding: Optional[Tuple[float, float]] = None):
        _set_x0_options(self, clip_range, thresholding)
        super().__init__(diffusion, steps=timesteps)

    def _build_coefs(self) -> torch.Tensor:
        c = super()._build_coefs()
        t_last = int(self.timesteps[-1])
        if t_last > 0:  # diffusers adds noise whenever t > 0; its variance at alpha_bar_prev = 1:
            beta = 1.0 - float(self.schedule.alphas_cumprod[t_last])
            if self.variance == "fixed_small":
                c[-1, _SIGMA] = math.sqrt(1e-20)  # beta_tilde = 0, clamped at 1e-20
            elif self.variance == "fixed_large":
                c[-1, _SIGMA] = math.sqrt(beta)
            else:
                c[-1, _SIGMA], c[-1, _LOG_MIN], c[-1, _LOG_MAX] = 1.0, math.log(1e-20), math.log(beta)
        return self._scale_table(c)


class DiffusersDDIMSampler(_ConfigX0, DDIMSampler):
    """DDIMSampler with diffusers' DDIMScheduler rules: from t to t - T // num_inference_steps, ending
    at `final_alpha_cumprod`; clip_sample_range; dynamic thresholding (see the module docstring).

    Args:
        diffusion: the GaussianDiffusion.
        timesteps: the scheduler's timesteps after set_timesteps(num_inference_steps) (descending).
        num_inference_steps: n, which sets the stride T // n of the previous timestep.
        eta: DDIM's eta in [0, 1].
        set_alpha_to_one: the final alpha_bar_prev is 1 (True) or alpha_bar[0] (False).
        clip_range, thresholding: as DiffusersDDPMSampler.
    """

    def __init__(self, diffusion: Any, timesteps: Any, num_inference_steps: int, eta: float = 0.0, *,
                 set_alpha_to_one: bool = True, clip_range: float = 1.0,
                 thresholding: Optional[Tuple[float, float]] = None):
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        self.stride = int(diffusion.schedule.num_timesteps) // num_inference_steps
        self.set_alpha_to_one = bool(set_alpha_to_one)
        _set_x0_options(self, clip_range, thresholding)
        super().__init__(diffusion, steps=timesteps, eta=eta)

    def _build_coefs(self) -> torch.Tensor:
        ab_all = self.schedule.alphas_cumprod
        final = torch.ones((), dtype=torch.float64) if self.set_alpha_to_one else ab_all[0]
        prev = self.timesteps - self.stride
        ab = ab_all[self.timesteps]
        ab_prev = torch.where(prev >= 0, ab_all[prev.clamp_min(0)], final)
        return self._scale_table(ddim_coefs(self.prediction, ab, ab_prev, self.eta))

    def __repr__(self) -> str:
        return (f"DiffusersDDIMSampler(steps={self.num_steps}, eta={self.eta}, stride={self.stride}, "
                f"set_alpha_to_one={self.set_alpha_to_one}, prediction={self.prediction!r})")


# ----------------------------------------------------------------------------- scheduler -> sampler
def _scheduler_timesteps(kind: str, config: Dict[str, Any], steps: int) -> List[int]:
    """The timesteps diffusers' DDPMScheduler / DDIMScheduler with `config` walks after set_timesteps(steps)."""
    import diffusers

    cls = diffusers.DDIMScheduler if kind == "ddim" else diffusers.DDPMScheduler
    probe = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    probe.set_timesteps(steps)
    return [int(t) for t in probe.timesteps.tolist()]


def _config_dict(scheduler: Any) -> Dict[str, Any]:
    config = getattr(scheduler, "config", scheduler)
    if isinstance(config, dict):
        return dict(config)
    raise ValueError(f"scheduler must be a diffusers scheduler or its config dict, got {type(scheduler).__name__}")


def _default_sampler(scheduler: Any, config: Dict[str, Any]) -> str:
    name = config.get("_class_name") or type(scheduler).__name__
    if name not in SCHEDULER_CLASSES:
        raise ValueError(f"scheduler {name!r} has no fastddpm equivalent (supported: "
                         f"{', '.join(SCHEDULER_CLASSES)}); pass sampler='ddpm', 'ddim', 'dpm++' or 'dpm++sde' "
                         "to choose one explicitly")
    return SCHEDULER_CLASSES[name]


def _check_steps(steps: Any, T: int) -> None:
    if steps is None:
        return
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= int(steps) <= T:
        raise ValueError(f"steps must be an int in [1, {T}] (num_train_timesteps) or None, got {steps!r}")


def sampler_from_scheduler(scheduler: Any, sampler: Optional[str] = None, steps: Optional[int] = None,
                           eta: float = 0.0) -> Tuple[Any, bool]:
    """(fastddpm sampler, clip_denoised) reproducing a diffusers scheduler config.

    `sampler` defaults to "ddim" for a DDIMScheduler, "ddpm" for a DDPMScheduler (other scheduler
    classes need an explicit choice). "ddpm" / "ddim" walk exactly what
    `DDPMScheduler.from_config(config)` / `DDIMScheduler.from_config(config)` walk after
    `set_timesteps(steps)` (steps=None: all T for "ddpm", 50 for "ddim"), every option of the config
    included (module docstring); the multistep solvers ("dpm++", "dpm++sde", "dpm++3m", "dpm++3m-sde",
    "unipc") use fastddpm's spacing. `clip_denoised` is the
    config's clip_sample (or True with thresholding: it switches the thresholding).
    """
    config = _config_dict(scheduler)
    T = int(config.get("num_train_timesteps") or 1000)
    _check_steps(steps, T)
    if sampler is None:
        sampler = _default_sampler(scheduler, config)
    diffusion = diffusion_from_scheduler(config)
    thresholding = None
    if config.get("thresholding"):
        thresholding = (float(_cfg(config, "dynamic_thresholding_ratio", 0.995)),
                        float(_cfg(config, "sample_max_value", 1.0)))
    clip = thresholding is not None or bool(config.get("clip_sample", True))  # diffusers' default: True
    clip_range = float(_cfg(config, "clip_sample_range", 1.0))
    spacing = _cfg(config, "timestep_spacing", "leading")
    if spacing not in _SPACINGS:
        raise ValueError(f"unsupported scheduler timestep_spacing={spacing!r} (supported: {_SPACINGS})")

    if sampler in ("dpm++", "dpm++sde", "dpm++3m", "dpm++3m-sde", "unipc"):
        if thresholding is not None:
            raise ValueError(f"thresholding=True is not supported by sampler={sampler!r} (use 'ddpm' or 'ddim')")
        if clip and clip_range != 1.0:
            raise ValueError(f"clip_sample_range={clip_range} is not supported by sampler={sampler!r} "
                             "(its x0-hat clip is [-1, 1]; use 'ddpm' or 'ddim')")
        smp = make_sampler(sampler, diffusion, steps, eta)
    elif sampler == "ddpm":
        timesteps = None if steps is None else _scheduler_timesteps("ddpm", config, int(steps))
        _check_timesteps(timesteps, T, spacing)
        smp = DiffusersDDPMSampler(diffusion, timesteps, clip_range=clip_range, thresholding=thresholding)
    elif sampler == "ddim":
        n = 50 if steps is None else int(steps)
        timesteps = _scheduler_timesteps("ddim", config, n)
        _check_timesteps(timesteps, T, spacing)
        smp = DiffusersDDIMSampler(diffusion, timesteps, n, eta, set_alpha_to_one=bool(config.get("set_alpha_to_one", True)),
                                   clip_range=clip_range, thresholding=thresholding)
    else:
        make_sampler(sampler, diffusion, steps, eta)  # raises the ValueError naming the accepted samplers
        raise ValueError(f"sampler={sampler!r} cannot reproduce a diffusers scheduler (use 'ddpm', 'ddim', "
                         "'dpm++', 'dpm++sde', 'dpm++3m', 'dpm++3m-sde' or 'unipc')")
    _check_zero_snr(smp, config)
    return smp, clip


def _check_timesteps(timesteps: Optional[List[int]], T: int, spacing: str) -> None:
    if timesteps is not None and any(not 0 <= t < T for t in timesteps):
        raise ValueError(f"the scheduler's timesteps {timesteps[:3]}... leave [0, {T}) (timestep_spacing={spacing!r}, "
                         "steps_offset): diffusers cannot run this config either")


def _check_zero_snr(smp: Any, config: Dict[str, Any]) -> None:
    if not config.get("rescale_betas_zero_snr") or smp.prediction != "eps":
        return
    if int(smp.timesteps[0]) == smp.num_timesteps - 1:
        raise ValueError("rescale_betas_zero_snr=True with prediction_type='epsilon' visits the zero-SNR timestep "
                         f"{smp.num_timesteps - 1}, where an epsilon model determines no x0 (diffusers returns "
                         "inf/NaN or a clamp there): use a v_prediction model, or a spacing that does not visit it")

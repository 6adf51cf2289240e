"""Gaussian diffusion: the forward process, its posterior, the model's reverse step, losses, bits/dim.

Conventions (see design.md): timesteps are int64 indices t in [0, T), t = 0 is the first noising
step, alpha_bar_t = prod_{s<=t} (1 - beta_s). Images live in [-1, 1] and are 8-bit data for the
decoder likelihood. The schedule's float64 tables are cast once per (device, dtype) and indexed with
t on the device, so nothing here synchronises the host with the device (except the range check of a
user-given CPU `t`; on CUDA that check is an asynchronous device assert).

A model is any callable ``model(x_t, t) -> Tensor`` with C output channels, or 2C for
``variance="learned_range"``. If it returns an object with a ``.sample`` attribute (diffusers'
``UNet2DOutput``) or a tuple, the tensor inside is used. If the schedule is respaced (it has a
``timestep_map``, see ``NoiseSchedule.respace``), ``t`` indexes the respaced schedule and the model
is called with the original timestep ``timestep_map[t]``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

from .schedule import NoiseSchedule

__all__ = ["GaussianDiffusion", "normal_kl", "discretized_gaussian_log_likelihood"]

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
LOSSES = ("simple", "vlb", "hybrid")
HYBRID_VB_WEIGHT = 0.001

Timesteps = Union[torch.Tensor, int]
Model = Callable[[torch.Tensor, torch.Tensor], Any]

_LN2 = math.log(2.0)

# Tables cast to each (device, dtype) of use.
_TABLE_NAMES = (
    "betas",
    "log_betas",
    "alphas_cumprod",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "fixed_large_variance",
    "fixed_large_log_variance",
)


# --------------------------------------------------------------------------------------------------
# Gaussian helpers
# --------------------------------------------------------------------------------------------------
def normal_kl(mean1: Any, logvar1: Any, mean2: Any, logvar2: Any) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats.

    Arguments broadcast against each other; at least one must be a tensor (Python floats are
    promoted to tensors of that tensor's dtype and device).
    """
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if ref is None:
        raise ValueError("normal_kl: at least one of mean1, logvar1, mean2, logvar2 must be a torch.Tensor")
    mean1, logvar1, mean2, logvar2 = (
        a if isinstance(a, torch.Tensor) else torch.as_tensor(a, dtype=ref.dtype, device=ref.device)
        for a in (mean1, logvar1, mean2, logvar2)
    )
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _log_diff_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(exp(a) - exp(b)) for a >= b, stable (log of a difference of probabilities)."""
    return a + torch.log((-torch.expm1(b - a)).clamp(min=1e-12))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-probability (nats) of 8-bit data x in [-1, 1] under a Gaussian discretized to its 256 bins.

    Bin k has centre -1 + 2k/255 and covers [centre - 1/255, centre + 1/255]; the two edge bins are
    open (the bin of -1 takes (-inf, -1 + 1/255], the bin of 1 takes [1 - 1/255, inf)), so the 256
    probabilities sum to 1. `log_scales` is the log standard deviation. Uses the exact normal CDF in
    log space (``torch.special.log_ndtr``) and picks the tail that keeps the difference of CDFs
    accurate, so far-off means and tiny scales give finite results. Computed in at least float32;
    the result has the promoted dtype of the inputs (float32 for half/bfloat16 inputs).
    """
    if not (x.shape == means.shape == log_scales.shape):
        if torch.broadcast_shapes(x.shape, means.shape, log_scales.shape) != x.shape:
            raise ValueError(
                f"x, means and log_scales must broadcast to x's shape {tuple(x.shape)}, got "
                f"{tuple(means.shape)} and {tuple(log_scales.shape)}"
            )
    dtype = torch.promote_types(torch.promote_types(x.dtype, means.dtype), log_scales.dtype)
    if dtype not in (torch.float32, torch.float64):
        dtype = torch.float32
    x, means, log_scales = x.to(dtype), means.to(dtype), log_scales.to(dtype)
    inv_stdv = torch.exp(-log_scales)
    centered = x - means
    plus_in = inv_stdv * (centered + 1.0 / 255.0)
    min_in = inv_stdv * (centered - 1.0 / 255.0)
    log_cdf_plus = torch.special.log_ndtr(plus_in)  # log P(X <= upper edge)
    log_sf_min = torch.special.log_ndtr(-min_in)  # log P(X >= lower edge)
    # Interior bin: P = Phi(plus) - Phi(min) = Phi(-min) - Phi(-plus). Take the form whose terms are
    # the smaller tail probabilities (no cancellation near 1).
    left = _log_diff_exp(log_cdf_plus, torch.special.log_ndtr(min_in))
    right = _log_diff_exp(log_sf_min, torch.special.log_ndtr(-plus_in))
    log_mid = torch.where(min_in > 0, right, left)
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_sf_min, log_mid))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


# --------------------------------------------------------------------------------------------------
# GaussianDiffusion
# --------------------------------------------------------------------------------------------------
class GaussianDiffusion:
    """DDPM's forward process q and the model's reverse process p over a `NoiseSchedule`.

    Args:
        schedule: the `NoiseSchedule` (respaced ones included: see the module docstring).
        prediction: what the model predicts: "eps" (the noise), "x0" (the clean image) or
            "v" (v = sqrt(ab) eps - sqrt(1 - ab) x0, Salimans & Ho).
        variance: "fixed_small" (posterior variance beta_tilde_t, its log clipped at t = 0 by
            beta_tilde_1), "fixed_large" (beta_t, with beta_tilde_1 at t = 0, as improved-diffusion),
            "learned_range" (the model outputs 2C channels; v = out[:, C:] in [-1, 1] gives
            log var = f log beta_t + (1 - f) log beta_tilde_t (clipped), f = (v + 1) / 2).
        loss: "simple" (MSE on the prediction target, first C channels), "vlb" (the variational
            bound in bits/dim) or "hybrid" (simple + 0.001 * vlb, the vlb term seeing a
            stop-gradient on the mean, so it trains only the learned variance).
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction: str = "eps",
        variance: str = "fixed_small",
        loss: str = "simple",
    ):
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"schedule must be a fastddpm.NoiseSchedule, got {type(schedule).__name__}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if variance not in VARIANCES:
            raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.schedule = schedule
        self.prediction = prediction
        self.variance = variance
        self.loss = loss
        self.num_timesteps = int(schedule.num_timesteps)
        tm = getattr(schedule, "timestep_map", None)
        self.timestep_map: Optional[torch.Tensor] = None if tm is None else torch.as_tensor(tm, dtype=torch.int64)

        s = schedule
        # float64 CPU tables; everything cast from these once per (device, dtype).
        fixed_large = torch.cat([s.posterior_variance[1:2] if self.num_timesteps > 1 else s.betas[:1], s.betas[1:]])
        self._tables64: Dict[str, torch.Tensor] = {
            "betas": s.betas,
            "log_betas": s.betas.log(),
            "alphas_cumprod": s.alphas_cumprod,
            "sqrt_alphas_cumprod": s.sqrt_alphas_cumprod,
            "sqrt_one_minus_alphas_cumprod": s.sqrt_one_minus_alphas_cumprod,
            "log_one_minus_alphas_cumprod": (1.0 - s.alphas_cumprod).log(),
            "sqrt_recip_alphas_cumprod": s.sqrt_recip_alphas_cumprod,
            "sqrt_recipm1_alphas_cumprod": s.sqrt_recipm1_alphas_cumprod,
            "posterior_variance": s.posterior_variance,
            "posterior_log_variance_clipped": s.posterior_log_variance_clipped,
            "posterior_mean_coef1": s.posterior_mean_coef1,
            "posterior_mean_coef2": s.posterior_mean_coef2,
            "fixed_large_variance": fixed_large,
            "fixed_large_log_variance": fixed_large.log(),
        }
        for name in _TABLE_NAMES:
            self._tables64[name] = self._tables64[name].to(torch.float64).contiguous()
        self._cache: Dict[Tuple[torch.device, torch.dtype], Dict[str, torch.Tensor]] = {}
        self._map_cache: Dict[torch.device, torch.Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(T={self.num_timesteps}, prediction={self.prediction!r}, "
            f"variance={self.variance!r}, loss={self.loss!r})"
        )

    # ------------------------------------------------------------------------------ tables
    def tables(self, device: Union[torch.device, str, None] = None, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
        """All coefficient tables ([T] each) cast to `device`/`dtype`; cached per (device, dtype)."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = (device, dtype)
        tabs = self._cache.get(key)
        if tabs is None:
            tabs = {k: v.to(device=device, dtype=dtype) for k, v in self._tables64.items()}
            self._cache[key] = tabs
        return tabs

    def _coef(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table `name` at t, shaped [N, 1, ..., 1] to broadcast against `like`."""
        tab = self.tables(like.device, like.dtype)[name]
        return tab[t].reshape((t.shape[0],) + (1,) * (like.ndim - 1))

    def _check_t(self, t: Timesteps, x: torch.Tensor, name: str = "t") -> torch.Tensor:
        """Validate t (int64 [N] with values in [0, T)) and return it as int64 on x's device."""
        n = x.shape[0]
        T = self.num_timesteps
        if isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)):
            raise ValueError(f"{name} must be an integer tensor of shape [{n}] or a Python int, got {type(t).__name__}")
        if isinstance(t, int):
            if not 0 <= t < T:
                raise ValueError(f"{name} must lie in [0, {T}), got {t}")
            return torch.full((n,), t, dtype=torch.int64, device=x.device)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must have an integer dtype (int64 preferred), got {t.dtype}")
        if t.ndim == 0:
            t = t.reshape(1).expand(n)
        if t.ndim != 1 or t.shape[0] != n:
            raise ValueError(f"{name} must have shape [{n}] (one timestep per sample), got {tuple(t.shape)}")
        t = t.to(device=x.device, dtype=torch.int64)
        if t.device.type == "cuda":
            torch._assert_async(((t >= 0) & (t < T)).all(), f"{name} must lie in [0, {T})")
        elif n > 0 and (bool((t < 0).any()) or bool((t >= T).any())):
            raise ValueError(f"{name} must lie in [0, {T}), got values in [{int(t.min())}, {int(t.max())}]")
        return t

    @staticmethod
    def _check_x(x: Any, name: str, min_ndim: int = 1) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {x.dtype}")
        if x.ndim < min_ndim:
            shape = "[N, C, *spatial]" if min_ndim >= 2 else "[N, ...]"
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
        return x

    @staticmethod
    def _check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
        if a.shape != b.shape:
            raise ValueError(f"{name_b} must have the shape of {name_a} {tuple(a.shape)}, got {tuple(b.shape)}")

    def _noise_like(self, x0: torch.Tensor, noise: Optional[torch.Tensor],
                    generator: Optional[torch.Generator]) -> torch.Tensor:
        """`noise` checked against x0's shape, or a standard normal like x0 drawn with `generator`."""
        if noise is None:
            return torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        self._check_x(noise, "noise")
        self._check_same_shape(x0, noise, "x0", "noise")
        return noise

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timesteps the model is called with: t itself, or timestep_map[t] for a respaced schedule."""
        if self.timestep_map is None:
            return t
        m = self._map_cache.get(t.device)
        if m is None:
            m = self._map_cache[t.device] = self.timestep_map.to(t.device)
        return m[t]

    def _run_model(self, model: Model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model(x, self.model_timesteps(t))
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)) and len(out) > 0:
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"model must return a torch.Tensor (or an object with .sample), got {type(out).__name__}")
        return out

    def _check_model_output(self, out: torch.Tensor, x: torch.Tensor) -> None:
        c = x.shape[1]
        want = 2 * c if self.variance == "learned_range" else c
        if out.ndim != x.ndim or out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"model output must have shape {(x.shape[0], want) + tuple(x.shape[2:])}, got {tuple(out.shape)}"
            )
        if out.shape[1] != want:
            if self.variance == "learned_range":
                raise ValueError(
                    f"model output must have 2*C = {want} channels for variance='learned_range' (C = {c} "
                    f"mean channels, then C variance channels in [-1, 1]), got {out.shape[1]}"
                )
            raise ValueError(
                f"model output must have C = {want} channels for variance={self.variance!r} "
                f"(2C only with variance='learned_range'), got {out.shape[1]}"
            )

    # ------------------------------------------------------------------------------ conversions
    # Public methods validate t; the underscored ones take an already validated int64 t.
    def _x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._coef("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def _eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return (self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0) / self._coef("sqrt_recipm1_alphas_cumprod", t, x_t)

    def _x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._coef("sqrt_alphas_cumprod", t, x_t) * x_t - self._coef("sqrt_one_minus_alphas_cumprod", t, x_t) * v

    def _eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._coef("sqrt_one_minus_alphas_cumprod", t, x_t) * x_t + self._coef("sqrt_alphas_cumprod", t, x_t) * v

    def _v(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self._coef("sqrt_alphas_cumprod", t, x0) * eps - self._coef("sqrt_one_minus_alphas_cumprod", t, x0) * x0

    def _conv_args(self, a: torch.Tensor, b: torch.Tensor, t: Timesteps, na: str, nb: str) -> torch.Tensor:
        self._check_x(a, na)
        self._check_x(b, nb)
        self._check_same_shape(a, b, na, nb)
        return self._check_t(t, a)

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: Timesteps, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)."""
        return self._x0_from_eps(x_t, self._conv_args(x_t, eps, t, "x_t", "eps"), eps)

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: Timesteps, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(ab_t) x0) / sqrt(1 - ab_t)."""
        return self._eps_from_x0(x_t, self._conv_args(x_t, x0, t, "x_t", "x0"), x0)

    def predict_x0_from_v(self, x_t: torch.Tensor, t: Timesteps, v: torch.Tensor) -> torch.Tensor:
        """x0 = sqrt(ab_t) x_t - sqrt(1 - ab_t) v."""
        return self._x0_from_v(x_t, self._conv_args(x_t, v, t, "x_t", "v"), v)

    def predict_eps_from_v(self, x_t: torch.Tensor, t: Timesteps, v: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(1 - ab_t) x_t + sqrt(ab_t) v."""
        return self._eps_from_v(x_t, self._conv_args(x_t, v, t, "x_t", "v"), v)

    def predict_v(self, x0: torch.Tensor, t: Timesteps, eps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0 (the v-prediction target for x_t = q_sample(x0, t, eps))."""
        return self._v(x0, self._conv_args(x0, eps, t, "x0", "eps"), eps)

    def predict_x0(self, x_t: torch.Tensor, t: Timesteps, model_output: torch.Tensor) -> torch.Tensor:
        """x0 from the first C channels of a model output, according to `self.prediction` (no clamp)."""
        x_t = self._check_x(x_t, "x_t", min_ndim=2)
        t = self._check_t(t, x_t)
        self._check_model_output(model_output, x_t)
        return self._x0_eps_from_output(x_t, t, model_output[:, : x_t.shape[1]])[0]

    def _x0_eps_from_output(self, x_t: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.prediction == "eps":
            return self._x0_from_eps(x_t, t, m), m
        if self.prediction == "x0":
            return m, self._eps_from_x0(x_t, t, m)
        return self._x0_from_v(x_t, t, m), self._eps_from_v(x_t, t, m)

    def training_target(self, x0: torch.Tensor, t: Timesteps, noise: torch.Tensor) -> torch.Tensor:
        """What the model should output for x_t = q_sample(x0, t, noise): eps, x0 or v."""
        t = self._conv_args(x0, noise, t, "x0", "noise")
        return self._target(x0, t, noise)

    def _target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return self._v(x0, t, noise)

    # ------------------------------------------------------------------------------ q
    def q_mean_variance(self, x0: torch.Tensor, t: Timesteps) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log-variance of q(x_t | x0) (variance tensors broadcast like [N, 1, ...])."""
        x0 = self._check_x(x0, "x0")
        t = self._check_t(t, x0)
        mean = self._coef("sqrt_alphas_cumprod", t, x0) * x0
        var = 1.0 - self._coef("alphas_cumprod", t, x0)
        return mean, var, self._coef("log_one_minus_alphas_cumprod", t, x0)

    def q_sample(
        self,
        x0: torch.Tensor,
        t: Timesteps,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x0) = N(sqrt(ab_t) x0, (1 - ab_t) I); `noise` is the standard normal used
        (drawn with `generator` when None)."""
        x0 = self._check_x(x0, "x0")
        t = self._check_t(t, x0)
        noise = self._noise_like(x0, noise, generator)
        return self._q_sample(x0, t, noise)

    def _q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._coef("sqrt_alphas_cumprod", t, x0) * x0 + self._coef("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: Timesteps
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and (clipped) log-variance of q(x_{t-1} | x_t, x0).

        Variances are expanded (views, no copies) to x_t's shape. At t = 0 the variance is 0 and the
        log-variance is clipped to log beta_tilde_1 (improved-diffusion).
        """
        t = self._conv_args(x_t, x0, t, "x_t", "x0")
        return self._q_posterior(x0, x_t, t)

    def _q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean = self._coef("posterior_mean_coef1", t, x_t) * x0 + self._coef("posterior_mean_coef2", t, x_t) * x_t
        var = self._coef("posterior_variance", t, x_t).expand(x_t.shape)
        log_var = self._coef("posterior_log_variance_clipped", t, x_t).expand(x_t.shape)
        return mean, var, log_var

    # ------------------------------------------------------------------------------ p
    def p_mean_variance(
        self,
        model: Optional[Model],
        x_t: torch.Tensor,
        t: Timesteps,
        clip_denoised: bool = True,
        model_output: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """The model's Gaussian p(x_{t-1} | x_t).

        Args:
            model: model(x_t, t) -> output; may be None when `model_output` is given.
            x_t: [N, C, *spatial]. t: int64 [N] (or an int).
            clip_denoised: clamp the predicted x0 to [-1, 1] before forming the mean.
            model_output: a precomputed output of model(x_t, t), reused instead of calling the model.
        Returns a dict:
            mean, variance, log_variance: of p(x_{t-1} | x_t) (variances expanded to x_t's shape);
            pred_x0: the predicted x0 (clamped when clip_denoised);
            eps: the noise implied by the model output (before any clamping of x0);
            model_output: the raw model output.
        """
        x_t = self._check_x(x_t, "x_t", min_ndim=2)
        t = self._check_t(t, x_t)
        if model_output is None:
            if model is None:
                raise ValueError("p_mean_variance needs a model or a model_output")
            model_output = self._run_model(model, x_t, t)
        else:
            self._check_x(model_output, "model_output")
        self._check_model_output(model_output, x_t)
        return self._p_mean_variance(x_t, t, model_output, clip_denoised)

    def _p_mean_variance(
        self, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor, clip_denoised: bool
    ) -> Dict[str, torch.Tensor]:
        c = x_t.shape[1]
        if self.variance == "fixed_small":
            var = self._coef("posterior_variance", t, x_t).expand(x_t.shape)
            log_var = self._coef("posterior_log_variance_clipped", t, x_t).expand(x_t.shape)
        elif self.variance == "fixed_large":
            var = self._coef("fixed_large_variance", t, x_t).expand(x_t.shape)
            log_var = self._coef("fixed_large_log_variance", t, x_t).expand(x_t.shape)
        else:
            frac = (model_output[:, c:] + 1.0) * 0.5
            min_log = self._coef("posterior_log_variance_clipped", t, x_t)
            max_log = self._coef("log_betas", t, x_t)
            log_var = frac * max_log + (1.0 - frac) * min_log
            var = torch.exp(log_var)
        pred_x0, eps = self._x0_eps_from_output(x_t, t, model_output[:, :c])
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean, _, _ = self._q_posterior(pred_x0, x_t, t)
        return {
            "mean": mean,
            "variance": var,
            "log_variance": log_var,
            "pred_x0": pred_x0,
            "eps": eps,
            "model_output": model_output,
        }

    # ------------------------------------------------------------------------------ bound terms
    def _vb_terms_bpd(
        self,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        model_output: torch.Tensor,
        clip_denoised: bool,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Per-sample term L_t of the bound in bits/dim: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for
        t >= 1, the decoder NLL -log p(x0 | x_1) for t = 0 (t is an index into this schedule)."""
        true_mean, _, true_log_var = self._q_posterior(x0, x_t, t)
        out = self._p_mean_variance(x_t, t, model_output, clip_denoised)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / _LN2
        nll = -_mean_flat(
            discretized_gaussian_log_likelihood(x0, means=out["mean"], log_scales=0.5 * out["log_variance"])
        ) / _LN2
        dtype = torch.promote_types(kl.dtype, nll.dtype)
        return torch.where(t == 0, nll.to(dtype), kl.to(dtype)), out

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """KL(q(x_{T-1} | x0) || N(0, I)) per sample in bits/dim (no model; the bound's prior term)."""
        x0 = self._check_x(x0, "x0")
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, dtype=torch.int64, device=x0.device)
        mean, _, log_var = self.q_mean_variance(x0, t)
        return _mean_flat(normal_kl(mean, log_var.expand(x0.shape), 0.0, 0.0)) / _LN2

    # ------------------------------------------------------------------------------ losses
    def training_losses(
        self,
        model: Model,
        x0: torch.Tensor,
        t: Optional[Timesteps] = None,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Dict[str, torch.Tensor]:
        """Per-sample training losses for one draw of (t, noise).

        Args:
            model: model(x_t, t) -> [N, C or 2C, *spatial].
            x0: clean images [N, C, *spatial] in [-1, 1].
            t: timesteps [N] (int64); None draws them uniformly from [0, T) with `generator`.
            noise: the standard normal for q_sample; None draws it with `generator`.
        Returns a dict of [N] tensors:
            "loss": what to average and minimise;
            "mse": mean squared error of the first C output channels against the target (eps, x0 or
                v); for loss="vlb" it is reported detached, for monitoring;
            "vb" (loss "vlb" and "hybrid"): T * L_t in bits/dim, where L_t is the bound's term of
                timestep t (`nll_bpd`'s vb[:, t]), so that its mean over uniform t is an unbiased
                estimate of the bound without its constant prior term. For "hybrid" it is computed
                with the mean's output channels detached (it trains only a learned variance), and
                loss = mse + 0.001 * vb.
            "t": the timesteps used.
        """
        x0 = self._check_x(x0, "x0", min_ndim=2)
        n = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (n,), generator=generator, device=x0.device, dtype=torch.int64)
        else:
            t = self._check_t(t, x0)
        noise = self._noise_like(x0, noise, generator)
        x_t = self._q_sample(x0, t, noise)
        out = self._run_model(model, x_t, t)
        self._check_model_output(out, x_t)
        c = x0.shape[1]

        target = self._target(x0, t, noise)
        mse = _mean_flat((out[:, :c] - target) ** 2)
        terms: Dict[str, torch.Tensor] = {"t": t}
        if self.loss == "simple":
            terms["mse"] = mse
            terms["loss"] = mse
            return terms

        if self.loss == "hybrid":
            frozen = out.detach() if self.variance != "learned_range" else torch.cat([out[:, :c].detach(), out[:, c:]], dim=1)
        else:
            frozen = out
        vb, _ = self._vb_terms_bpd(x0, x_t, t, frozen, clip_denoised=False)
        vb = vb * self.num_timesteps
        terms["vb"] = vb
        if self.loss == "vlb":
            terms["mse"] = mse.detach()
            terms["loss"] = vb
        else:
            terms["mse"] = mse
            terms["loss"] = mse + HYBRID_VB_WEIGHT * vb
        return terms

    # ------------------------------------------------------------------------------ bits/dim
    @torch.no_grad()
    def nll_bpd(
        self,
        model: Model,
        x0: torch.Tensor,
        clip_denoised: bool = True,
        progress: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> Dict[str, torch.Tensor]:
        """The full variational bound per sample in bits/dim (one noise draw per timestep).

        Calls the model once per timestep (T calls), from t = T-1 down to 0, under no_grad.
        Returns a dict:
            total_bpd [N]: prior_bpd + vb.sum(1);
            prior_bpd [N]: KL(q(x_{T-1} | x0) || N(0, I));
            vb [N, T]: vb[:, t] is the term of timestep t (KL for t >= 1, decoder NLL at t = 0);
            xstart_mse [N, T]: MSE of the predicted x0 (clamped when clip_denoised);
            mse [N, T]: MSE of the implied eps against the noise used.
        """
        x0 = self._check_x(x0, "x0", min_ndim=2)
        n, T = x0.shape[0], self.num_timesteps
        out_dtype = x0.dtype if x0.dtype in (torch.float32, torch.float64) else torch.float32
        vb = torch.empty((n, T), dtype=out_dtype, device=x0.device)
        xstart_mse = torch.empty_like(vb)
        mse = torch.empty_like(vb)
        steps = range(T - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="nll_bpd", total=T)
        for i in steps:
            t = torch.full((n,), i, dtype=torch.int64, device=x0.device)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = self._q_sample(x0, t, noise)
            out = self._run_model(model, x_t, t)
            self._check_model_output(out, x_t)
            term, p = self._vb_terms_bpd(x0, x_t, t, out, clip_denoised=clip_denoised)
            vb[:, i] = term
            xstart_mse[:, i] = _mean_flat((p["pred_x0"] - x0) ** 2)
            mse[:, i] = _mean_flat((p["eps"] - noise) ** 2)
        prior = self.prior_bpd(x0).to(out_dtype)
        return {
            "total_bpd": vb.sum(dim=1) + prior,
            "prior_bpd": prior,
            "vb": vb,
            "xstart_mse": xstart_mse,
            "mse": mse,
        }

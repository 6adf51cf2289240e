"""Samplers: DDPM (ancestral, respaced), DDIM(eta), DPM-Solver++(2M) and (3M), UniPC; one step API and one loop.

Every sampler is a coefficient table: row s holds the eleven numbers (A, B, P, Q, R, P2, SIGMA, LOG_MIN,
LOG_MAX, P3, P4) that the fused op `fastddpm.ops.sampler_step` needs to take step s (timestep
`timesteps[s]`, descending). The table is computed in float64 on the CPU from the (respaced)
`NoiseSchedule` when the sampler is built and cast to float32 once per device; the loop indexes it on
the device with an int64 step counter, so `sample` never synchronises with the host.

Timesteps and respacing (improved-diffusion, and what diffusers computes from its previous timestep):
with the kept timesteps S_0 < ... < S_{K-1}, the sampler uses beta_i = 1 - ab[S_i] / ab[S_{i-1}]
(ab[S_{-1}] = 1) and calls the model with the original timestep S_i. `steps` may be None (all T
timesteps), an int (DDPM, DDIM: `space_timesteps(T, steps)`, evenly spaced from T-1 down to 0, both
included; DPM-Solver++: time-quadratic, see below) or an explicit strictly descending list of
timesteps (e.g. diffusers' `scheduler.timesteps` after `set_timesteps(n)`, for drop-in parity).

Randomness: `sample(seed=s)` draws x_T and every step's noise from the Philox stream of
`fastddpm.ops.philox` (image i's noise depends on (s, image_offset + i, step) only, so an image does
not depend on the batch it is drawn in); `sample(generator=g)` uses torch.randn with g instead.

Variances (DDPM): "fixed_small" sigma^2 = beta_tilde of the respaced schedule, "fixed_large" sigma^2 =
the respaced beta, "learned_range" log sigma^2 = f log beta + (1 - f) log beta_tilde (the log clipped at
the final step as improved-diffusion), f = (v + 1) / 2 from the model's extra C channels. No noise is
added at the final step (the last element of `timesteps`), as improved-diffusion and diffusers (whose
lists end at t = 0) do.

DDIM: sigma = eta * sqrt((1 - ab_prev) / (1 - ab)) * sqrt(1 - ab / ab_prev), ab_prev = 1 at the final
step (diffusers' set_alpha_to_one=True); x_prev = sqrt(ab_prev) x0c + sqrt(1 - ab_prev - sigma^2) eps_hat
+ sigma z, with eps_hat computed from the *unclipped* model output as diffusers' DDIMScheduler does by
default (use_clipped_model_output=False).

DPM-Solver++(2M) (Lu et al. 2022, data prediction): lambda_t = log(sqrt(ab_t) / sqrt(1 - ab_t)); an int
`steps` gives time-quadratic spacing t_i = round((i / (S-1))^2 (T-1)) (made strictly increasing; dense
near t = 0, where lambda moves fastest: the uniform spacing puts one huge lambda step at the end, which
the multistep extrapolation overshoots). The first step is first order (DPM-Solver++ 1 = DDIM), and so
is the last transition (to timesteps[-1]) when the timesteps end at t = 0 (`first_order_final`); the
others are second-order multistep with the previous x0-hat, and the final model evaluation (at
timesteps[-1]) returns x0-hat itself, i.e. a first-order step to sigma = 0. `steps` counts model evaluations. `stochastic=True` ("dpm++sde") is SDE-DPM-Solver++(2M)
(Lu et al. 2022, sec. 4 / diffusers' "sde-dpmsolver++", midpoint): the same multistep x0 terms with
(1 - e^{-2h}) in place of (1 - e^{-h}), x scaled by e^{-h} sigma'/sigma, plus sigma' sqrt(1 - e^{-2h}) z.

DPM-Solver++(3M) (`DPMSolver3MSampler`, "dpm++3m" / "dpm++3m-sde") and UniPC (`UniPCSampler`, "unipc")
have the same timesteps semantics as DPM-Solver++(2M) and read up to two (3M) or three (UniPC-3: its
corrector reaches one step further back) previous x0-hats: the op's x0_prev, x0_prev2, x0_prev3 with
the columns P2, P3, P4. UniPC's corrector and predictor fold into one table row (see the class).
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ._names import DEFAULT_SPACING, DEFAULT_STEPS, SAMPLER_NAMES
from .guards import FiniteWatch
from .ops.sampler_step import NUM_COEFS, sampler_step
from .schedule import NoiseSchedule, space_timesteps
from .spacing import SPACINGS, Spacing, make_timesteps

__all__ = ["DDPMSampler", "DDIMSampler", "DPMSolverSampler", "DPMSolver3MSampler", "UniPCSampler", "Sampler",
           "gaussian_gain", "quadratic_timesteps", "make_sampler", "known_region_coefs", "SAMPLER_NAMES", "DEFAULT_STEPS",
           "DEFAULT_SPACING", "SPACINGS"]

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")

Steps = Union[None, int, Sequence[int], torch.Tensor]
Model = Callable[..., Any]

# coefficient columns
_A, _B, _P, _Q, _R, _P2, _SIGMA, _LOG_MIN, _LOG_MAX, _P3, _P4 = range(NUM_COEFS)
# the history columns, most recent first (x0_prev, x0_prev2, x0_prev3)
_HISTORY_COLS = (_P2, _P3, _P4)


def _resolve_timesteps(num_timesteps: int, steps: Steps, allow_none: bool) -> List[int]:
    """Descending original-schedule timesteps from None / an int / an explicit descending list."""
    T = num_timesteps
    if steps is None:
        if not allow_none:
            raise ValueError("steps must be an int in [1, T] or a descending list of timesteps, got None")
        return list(range(T - 1, -1, -1))
    if isinstance(steps, bool):
        raise ValueError(f"steps must be None, an int in [1, {T}] or a strictly descending list of timesteps, got {steps!r}")
    if isinstance(steps, numbers.Integral):
        steps = int(steps)
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be an int in [1, {T}] (or None, or a descending list), got {steps}")
        return sorted(space_timesteps(T, steps), reverse=True)
    if isinstance(steps, torch.Tensor):
        if steps.dtype.is_floating_point or steps.dtype.is_complex or steps.dtype == torch.bool or steps.ndim != 1:
            raise ValueError(f"steps as a tensor must be a 1-D integer tensor, got {steps.dtype} {tuple(steps.shape)}")
        ts = [int(v) for v in steps.tolist()]
    else:
        try:
            ts = [operator.index(v) for v in steps]
        except TypeError:
            raise ValueError(
                f"steps must be None, an int in [1, {T}] or a strictly descending list of integer timesteps, got {steps!r}"
            ) from None
    if len(ts) == 0:
        raise ValueError("steps must not be an empty list of timesteps")
    if any(not 0 <= v < T for v in ts):
        raise ValueError(f"steps: every timestep must lie in [0, {T}), got {ts}")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"steps must be strictly descending (e.g. scheduler.timesteps), got {ts}")
    return ts


def quadratic_timesteps(num_timesteps: int, steps: int) -> List[int]:
    """`steps` descending timesteps t_i = round((i / (steps-1))^2 (T-1)), i = steps-1..0, strictly decreasing.

    Duplicates near t = 0 (where the rounded values collide) are pushed up by one, so exactly `steps`
    distinct timesteps are returned, T-1 and 0 included (steps = 1: [T-1]). Same as
    `fastddpm.spacing.make_timesteps(schedule, steps, "quadratic")`.
    """
    T = num_timesteps
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= int(steps) <= T:
        raise ValueError(f"steps must be an int in [1, {T}], got {steps!r}")
    return make_timesteps(NoiseSchedule.linear(T), int(steps), "quadratic")


def _spaced_timesteps(diffusion: Any, steps: Steps, spacing: Optional[Spacing], default: str,
                      default_steps: Optional[int] = None) -> Tuple[List[int], str]:
    """(descending timesteps, spacing label) from a sampler's `steps` and `spacing` arguments.

    An int `steps` is spaced with `spacing` (None: the sampler's `default`); an explicit list may come
    as `steps` or as `spacing` (then `steps` is None, the class default `default_steps`, or the list's
    length); None steps = all T timesteps.
    """
    sched = getattr(diffusion, "schedule", None)
    T = int(getattr(sched, "num_timesteps", 0) or 0)
    if T < 1 or not isinstance(sched, NoiseSchedule):
        raise ValueError(f"diffusion must be a fastddpm.GaussianDiffusion (with a NoiseSchedule), got {type(diffusion).__name__}")
    if spacing is not None and not isinstance(spacing, str):  # an explicit list as spacing=
        ts = _resolve_timesteps(T, spacing, allow_none=False)
        if steps is not None and steps != default_steps and (isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or int(steps) != len(ts)):
            raise ValueError(f"steps must be None or {len(ts)} (the length of the explicit spacing list), got {steps!r}")
        return ts, "explicit"
    if isinstance(spacing, str) and spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS} or an explicit descending list of timesteps, got {spacing!r}")
    if steps is None or isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        if spacing is not None and steps is not None:
            raise ValueError(f"spacing={spacing!r} needs an int steps; got an explicit list of timesteps as steps")
        return _resolve_timesteps(T, steps, allow_none=True), ("uniform" if steps is None else "explicit")
    if not 1 <= int(steps) <= T:
        raise ValueError(f"steps must be an int in [1, {T}] (or None, or a descending list), got {steps}")
    spacing = spacing or default
    return make_timesteps(sched, int(steps), spacing), spacing


def _x0_coefs(prediction: str, ab: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with x0 = A x_t + B m for the model output m (float64)."""
    if prediction == "eps":
        return (1.0 / ab).sqrt(), -(1.0 / ab - 1.0).sqrt()
    if prediction == "x0":
        return torch.zeros_like(ab), torch.ones_like(ab)
    return ab.sqrt(), -(1.0 - ab).sqrt()  # v


def _eps_coefs(prediction: str, ab: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Ex, Em) with eps_hat = Ex x_t + Em m, from the unclipped output as diffusers' DDIM (float64)."""
    if prediction == "eps":
        return torch.zeros_like(ab), torch.ones_like(ab)
    if prediction == "x0":
        return 1.0 / (1.0 - ab).sqrt(), -(ab / (1.0 - ab)).sqrt()
    return (1.0 - ab).sqrt(), ab.sqrt()  # v


def ddim_coefs(prediction: str, ab: torch.Tensor, ab_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """DDIM coefficient rows [S, 11] (float64) for steps from alpha_bar = `ab` to `ab_prev`, row by row.

    sigma = eta sqrt((1 - ab_prev) / (1 - ab)) sqrt(1 - ab / ab_prev);
    x_prev = sqrt(ab_prev) x0c + sqrt(1 - ab_prev - sigma^2) eps_hat + sigma z.
    """
    sigma = eta * ((1.0 - ab_prev) / (1.0 - ab)).sqrt() * (1.0 - ab / ab_prev).sqrt()
    direction = (1.0 - ab_prev - sigma**2).clamp_min(0.0).sqrt()
    ex, em = _eps_coefs(prediction, ab)
    c = torch.zeros(ab.numel(), NUM_COEFS, dtype=torch.float64)
    c[:, _A], c[:, _B] = _x0_coefs(prediction, ab)
    c[:, _P] = ab_prev.sqrt()
    c[:, _Q] = direction * ex
    c[:, _R] = direction * em
    c[:, _SIGMA] = sigma
    return c


def _check_sample_args(seed: Optional[int], generator: Optional[torch.Generator], shape: Sequence[int],
                       dtype: torch.dtype, image_offset: int) -> Tuple[Optional[int], Tuple[int, ...]]:
    """`Sampler.sample`'s argument checks: the seed (0 when neither seed nor generator is given) and the shape."""
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator to sample(), not both")
    if generator is None and seed is None:
        seed = 0
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    try:
        shape = tuple(operator.index(v) for v in shape)
    except TypeError:
        raise ValueError(f"shape must be a sequence of ints (N, C, *spatial), got {shape!r}") from None
    if len(shape) < 2 or any(v < 1 for v in shape):
        raise ValueError(f"shape must be (N, C, *spatial) with positive sizes, got {shape}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype (float32, bfloat16, float16), got {dtype!r}")
    if isinstance(image_offset, bool) or not isinstance(image_offset, int) or image_offset < 0:
        raise ValueError(f"image_offset must be a non-negative int, got {image_offset!r}")
    return seed, shape


def _sample_device(model: Any, generator: Optional[torch.Generator], device: Any) -> torch.device:
    """Where to sample: `device` if given, else the generator's, else the model's parameters', else the CPU."""
    if device is None:
        if generator is not None:
            device = generator.device
        else:
            param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
            device = param.device if param is not None else torch.device("cpu")
    return torch.device(device)


def _initial_x(shape: Tuple[int, ...], seed_t: Optional[torch.Tensor], step: torch.Tensor, image_offset: int,
               generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """x_T in float32: Philox normals of (seed, image, step 0) with a seed, else torch.randn from the generator."""
    if seed_t is not None:
        from .ops.philox import philox_normal

        return philox_normal(seed_t, shape, step, stream=1, image_offset=image_offset, device=device)
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


class Sampler:
    """Base class: timesteps, the float64 coefficient table, the step API and the sampling loop.

    Subclasses set `self.timesteps` (via `_setup`) and implement `_build_coefs`.
    """

    #: whether the op's learned_range path is used (DDPM with variance="learned_range")
    learned_range: bool = False
    #: how many previous x0-hats the update reads (0; 1 for DPM-Solver++ 2M; up to 3, multistep solvers)
    num_history: int = 0

    @property
    def uses_x0_prev(self) -> bool:
        """Whether the update reads the previous x0-hat (multistep solvers)."""
        return self.num_history > 0

    def _setup(self, diffusion: Any, timesteps: List[int]) -> None:
        schedule = getattr(diffusion, "schedule", None)
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"diffusion must be a fastddpm.GaussianDiffusion (with a NoiseSchedule), got {type(diffusion).__name__}")
        prediction = getattr(diffusion, "prediction", None)
        variance = getattr(diffusion, "variance", None)
        if prediction not in PREDICTIONS:
            raise ValueError(f"diffusion.prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if variance not in VARIANCES:
            raise ValueError(f"diffusion.variance must be one of {VARIANCES}, got {variance!r}")
        self.diffusion = diffusion
        self.schedule: NoiseSchedule = schedule
        self.prediction: str = prediction
        self.variance: str = variance
        self.num_timesteps: int = int(schedule.num_timesteps)
        self.timesteps = torch.tensor(timesteps, dtype=torch.int64)
        self._row_of: Dict[int, int] = {t: s for s, t in enumerate(timesteps)}
        # the respaced schedule, ascending: respaced index i <-> row S-1-i
        self.respaced: NoiseSchedule = schedule.respace(timesteps)
        # timesteps the model sees (a diffusion over an already respaced schedule maps them back)
        tm = getattr(schedule, "timestep_map", None)
        self._model_timesteps = self.timesteps if tm is None else torch.as_tensor(tm, dtype=torch.int64)[self.timesteps]
        coefs = self._build_coefs()
        if coefs.dtype != torch.float64 or tuple(coefs.shape) != (len(timesteps), NUM_COEFS):
            raise AssertionError(f"internal: coefficient table must be float64 [S, {NUM_COEFS}]")
        self.coefs: torch.Tensor = coefs  # float64, CPU, row s <-> timesteps[s]
        # rows that add noise (known on the host: no sync in the loop)
        self._noisy: List[bool] = [bool(v != 0) for v in coefs[:, _SIGMA].tolist()]
        self._device_cache: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------------------ tables
    def _build_coefs(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _per_step(self, ascending: torch.Tensor) -> torch.Tensor:
        """A respaced-schedule table (ascending index) reordered to rows (descending timesteps)."""
        return ascending.flip(0)

    def device_tables(self, device: Union[str, torch.device]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(coefs float32 [S, 11], step indices int64 [S], model timesteps int64 [S]) on `device`.

        Cast once per device and cached. `steps[s:s+1]` is the op's step tensor for row s.
        """
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        hit = self._device_cache.get(device)
        if hit is None:
            hit = (
                self.coefs.to(device=device, dtype=torch.float32),
                torch.arange(len(self.timesteps), dtype=torch.int64, device=device),
                self._model_timesteps.to(device),
            )
            self._device_cache[device] = hit
        return hit

    @property
    def num_steps(self) -> int:
        """Number of model evaluations (= len(timesteps))."""
        return int(self.timesteps.numel())

    # ------------------------------------------------------------------------------ step API
    def _row(self, t: Any) -> int:
        if isinstance(t, bool):
            raise ValueError(f"t must be an integer timestep from sampler.timesteps, got {t!r}")
        if isinstance(t, torch.Tensor):
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.numel() == 0:
                raise ValueError(f"t must be an integer timestep (int or integer tensor), got {t.dtype} {tuple(t.shape)}")
            flat = t.reshape(-1)
            if flat.numel() > 1 and bool((flat != flat[0]).any()):  # host sync: step() is not the hot loop
                raise ValueError("t must hold one timestep for the whole batch")
            t = int(flat[0])
        else:
            try:
                t = operator.index(t)
            except TypeError:
                raise ValueError(f"t must be an integer timestep from sampler.timesteps, got {t!r}") from None
        s = self._row_of.get(t)
        if s is None:
            shown = self.timesteps.tolist()
            if len(shown) > 12:
                shown = shown[:6] + ["..."] + shown[-6:]
            raise ValueError(f"t must be one of this sampler's timesteps {shown}, got {t}")
        return s

    def _model_output_channels(self, model_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Validate the model output against x; drop learned-variance channels the update ignores."""
        if not isinstance(x, torch.Tensor) or x.ndim < 2 or not x.dtype.is_floating_point:
            raise ValueError(f"x must be a floating-point tensor [N, C, *spatial], got {getattr(x, 'shape', x)!r}")
        if not isinstance(model_output, torch.Tensor):
            raise ValueError(f"model_output must be a torch.Tensor, got {type(model_output).__name__}")
        c = x.shape[1]
        want = 2 * c if self.variance == "learned_range" else c
        if (model_output.ndim != x.ndim or model_output.shape[0] != x.shape[0] or model_output.shape[2:] != x.shape[2:]
                or model_output.shape[1] != want):
            raise ValueError(
                f"model_output must have shape {(x.shape[0], want) + tuple(x.shape[2:])} for variance={self.variance!r} "
                f"({'2C channels: mean, then variance interpolation v' if want == 2 * c else 'C channels'}), "
                f"got {tuple(model_output.shape)}"
            )
        if want == 2 * c and not self.learned_range:
            model_output = model_output[:, :c]
        return model_output

    def row(self, t: Union[int, torch.Tensor]) -> int:
        """The row of the coefficient table (and the index into `timesteps`) of timestep `t`; ValueError
        naming `t` when it is not one of this sampler's timesteps."""
        return self._row(t)

    def adds_noise(self, row: int) -> bool:
        """Whether the update of table row `row` adds sigma * z (known on the host: no device sync)."""
        return self._noisy[row]

    def checked_output(self, model_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`model_output` validated against x (ValueError naming its expected shape), the learned-variance
        channels dropped where the update does not read them: what `step` passes to the fused step."""
        return self._model_output_channels(model_output, x)

    def fused_step(self, x: torch.Tensor, model_output: torch.Tensor, coefs: torch.Tensor, step: torch.Tensor,
                   x0_prev: Optional[torch.Tensor], noise: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                   image_offset: int, clip: bool, *history: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x_prev, x0-hat) of one update with this sampler's tables (`device_tables`), as `sample` runs it:
        the arguments of `fastddpm.ops.sampler_step` (`step` the int64 [1] row index, `noise` or a Philox
        `seed`, `history` x0_prev2 / x0_prev3 for samplers with num_history >= 2), plus whatever the
        sampler does to x0-hat (e.g. the dynamic thresholding of `fastddpm.interop.schedulers`)."""
        return self._fused_step(x, model_output, coefs, step, x0_prev, noise, seed, image_offset, clip, *history)

    def _history_for(self, s: int, x0_prev: Any) -> Tuple[Optional[torch.Tensor], ...]:
        """The op's (x0_prev, x0_prev2, x0_prev3) for row s (None where unused)."""
        return (None, None, None)

    def _fused_step(self, x: torch.Tensor, model_output: torch.Tensor, coefs: torch.Tensor, step: torch.Tensor,
                    x0_prev: Optional[torch.Tensor], noise: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                    image_offset: int, clip: bool, *history: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x_prev, x0-hat) of one update: the fused op (a sampler that post-processes x0-hat, e.g. the
        dynamic thresholding of `fastddpm.interop.schedulers`, wraps it). `history`: x0_prev2 (and x0_prev3),
        passed only by samplers that read them (num_history >= 2)."""
        return sampler_step(x, model_output, coefs, step, x0_prev, noise, seed, image_offset, clip, self.learned_range,
                            *history)

    def _after_step(self, s: int, x0: torch.Tensor, history: Tuple[Optional[torch.Tensor], ...]) -> None:
        pass

    def step(
        self,
        model_output: torch.Tensor,
        t: Union[int, torch.Tensor],
        x: torch.Tensor,
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        *,
        x0_prev: Union[None, torch.Tensor, Sequence[torch.Tensor]] = None,
        generator: Optional[torch.Generator] = None,
        return_x0: bool = False,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """One update x_t -> x_{t_prev} at timestep `t` (an element of `self.timesteps`).

        Args:
            model_output: the model's output at (x, t): [N, C, ...] ([N, 2C, ...] for learned_range).
            t: the current timestep (Python int or integer tensor holding one value; a tensor costs a
                host sync, so `sample` does not use this method).
            x: x_t, [N, C, *spatial].
            noise: standard normals of x's shape for the sigma * z term; None draws them with
                torch.randn (and `generator`) on the steps that add noise.
            clip_denoised: clamp x0-hat to [-1, 1] (diffusers' clip_sample).
            x0_prev: multistep solvers only: the x0-hat of the previous step (a sequence, most recent
                first, for solvers that read several); None uses the history kept from the previous
                calls (ValueError when that is not the previous timestep). Others ignore it.
            generator: RNG for the noise when `noise` is None.
            return_x0: also return the (clipped) x0-hat, like diffusers' pred_original_sample.

        Returns:
            x_prev in x's dtype (and x0-hat when return_x0).
        """
        s = self._row(t)
        m = self._model_output_channels(model_output, x)
        coefs, steps, _ = self.device_tables(x.device)
        if noise is None and self._noisy[s]:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        hist = self._history_for(s, x0_prev)
        x_prev, x0 = self._fused_step(x, m, coefs, steps[s:s + 1], hist[0], noise, None, 0, bool(clip_denoised),
                                      *hist[1:self.num_history])
        self._after_step(s, x0, hist)
        return (x_prev, x0) if return_x0 else x_prev

    # ------------------------------------------------------------------------------ loop
    @torch.no_grad()
    def sample(
        self,
        model: Model,
        shape: Sequence[int],
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        clip_denoised: bool = True,
        progress: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
        *,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float32,
        image_offset: int = 0,
    ) -> torch.Tensor:
        """Draw samples: x_T, then one model call and one fused step per timestep.

        Runs under ``torch.no_grad()``: sampling never records an autograd graph, so a model whose
        parameters require grad neither returns a tensor with a ``grad_fn`` nor keeps every step's
        activations alive (memory stays flat in the number of steps).

        Args:
            model: callable model(x, t, **model_kwargs) -> tensor (or an object with `.sample`, as
                diffusers' UNet2DModel returns); t is an int64 [N] tensor of original timesteps.
            shape: (N, C, *spatial).
            seed: Philox seed (default 0 when no generator): x_T and the step noise of image i are a
                pure function of (seed, image_offset + i, step), whatever the batch size.
            generator: a torch.Generator instead of a seed: x_T and the noise come from torch.randn.
            clip_denoised: clamp x0-hat to [-1, 1] at every step.
            progress: show a tqdm bar.
            model_kwargs: extra keyword arguments for the model (e.g. class labels).
            device: where to sample (default: the generator's device, else the model's parameters'
                device, else the CPU).
            dtype: dtype of x (float32, bfloat16, float16); the step math is fp32 regardless.
            image_offset: global index of image 0 (Philox counter), to split a seed across batches.

        Returns:
            the samples x_0 (for DPM-Solver++ the final x0-hat), `shape`, `dtype`.
        """
        seed, shape = _check_sample_args(seed, generator, shape, dtype, image_offset)
        device = _sample_device(model, generator, device)
        model_kwargs = dict(model_kwargs or {})
        coefs, _, model_t = self.device_tables(device)
        n, S = shape[0], self.num_steps
        # all model timesteps up front: row s is a contiguous int64 [N] tensor, no host work in the loop
        t_batches = model_t.reshape(S, 1).expand(S, n).contiguous()
        step = torch.zeros(1, dtype=torch.int64, device=device)
        seed_t = None if seed is None else torch.tensor([int(seed)], dtype=torch.int64, device=device)
        x = _initial_x(shape, seed_t, step, image_offset, generator, device).to(dtype)
        k = self.num_history  # the history, most recent first, padded with None to the op's three
        hist: List[Optional[torch.Tensor]] = [torch.zeros_like(x) for _ in range(k)] + [None] * (3 - k)
        clip = bool(clip_denoised)
        watch = FiniteWatch(device, self._model_timesteps.tolist())
        iterator: Any = range(S)
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, total=S, desc=type(self).__name__)
        for s in iterator:
            out = self._call_model(model, x, t_batches[s], model_kwargs, first=s == 0)
            noise = None
            seed_arg = None
            if self._noisy[s]:
                if generator is not None:
                    noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
                else:
                    seed_arg = seed_t
            x, x0 = self._fused_step(x, out, coefs, step, hist[0], noise, seed_arg, image_offset, clip, *hist[1:k])
            if k:
                hist = [x0] + hist[:k - 1] + [None] * (3 - k)
            watch.update(x, step)  # NaN/inf: recorded on the device, raised once after the loop
            step.add_(1)
        watch.check(type(self).__name__)
        return x

    def _call_model(self, model: Model, x: torch.Tensor, t: torch.Tensor, model_kwargs: Dict[str, Any],
                    first: bool) -> torch.Tensor:
        """The model's output as a tensor (diffusers' `.sample` outputs unwrapped); its channels are checked on
        the first step (shapes do not change inside the loop) and trimmed to x's on the later ones."""
        out = model(x, t, **model_kwargs)
        if not isinstance(out, torch.Tensor):
            out = getattr(out, "sample", out[0] if isinstance(out, (tuple, list)) else out)
        if first:
            return self._model_output_channels(out, x)
        if out.shape[1] != x.shape[1] and not self.learned_range:
            return out[:, : x.shape[1]]
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(steps={self.num_steps}, spacing={getattr(self, 'spacing', 'explicit')!r}, "
                f"prediction={self.prediction!r}, variance={self.variance!r})")


class DDPMSampler(Sampler):
    """Ancestral DDPM sampling (Ho et al. 2020) on all T timesteps or a respaced subsequence.

    Args:
        diffusion: a `GaussianDiffusion` (uses its schedule, prediction and variance).
        steps: None (all T timesteps), an int (evenly respaced, improved-diffusion's
            `space_timesteps`, T-1 and 0 included) or an explicit strictly descending list.
    """

    def __init__(self, diffusion: Any, steps: Steps = None, *, spacing: Optional[Spacing] = None):
        ts, self.spacing = _spaced_timesteps(diffusion, steps, spacing, default="uniform")
        self.learned_range = getattr(diffusion, "variance", None) == "learned_range"
        self._setup(diffusion, ts)

    def _build_coefs(self) -> torch.Tensor:
        r = self.respaced
        S = r.num_timesteps
        ab = r.alphas_cumprod
        c = torch.zeros(S, NUM_COEFS, dtype=torch.float64)
        c[:, _A], c[:, _B] = _x0_coefs(self.prediction, ab)
        c[:, _P] = r.posterior_mean_coef1
        c[:, _Q] = r.posterior_mean_coef2
        if self.variance == "fixed_small":
            c[:, _SIGMA] = r.posterior_variance.clamp_min(1e-20).sqrt()  # diffusers' clamp
        elif self.variance == "fixed_large":
            c[:, _SIGMA] = r.betas.sqrt()
        else:  # learned_range: sigma = exp(0.5 * interpolated log variance)
            c[:, _SIGMA] = 1.0
            c[:, _LOG_MIN] = r.posterior_log_variance_clipped
            c[:, _LOG_MAX] = r.betas.log()
        c[0, _SIGMA] = 0.0  # no noise at the final step
        return self._per_step(c)


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021) with stochasticity eta (0: deterministic; 1: DDPM-like variance).

    Args:
        diffusion: a `GaussianDiffusion`.
        steps: an int (evenly spaced, T-1 and 0 included), None (all T) or a descending list.
        eta: in [0, 1].
        predictions: how step s reads the model output, one of "eps", "x0", "v" per step (default: the
            diffusion's prediction at every step); a distilled student may output x0 at its first step and eps
            after it. A row's prediction type changes only its coefficients.
    The update matches diffusers' DDIMScheduler.step (set_alpha_to_one=True,
    use_clipped_model_output=False); a learned-variance model's extra channels are ignored.
    """

    def __init__(self, diffusion: Any, steps: Steps = 50, eta: float = 0.0, *, spacing: Optional[Spacing] = None,
                 predictions: Optional[Sequence[str]] = None):
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not math.isfinite(float(eta)) or not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must be a real number in [0, 1], got {eta!r}")
        self.eta = float(eta)
        ts, self.spacing = _spaced_timesteps(diffusion, steps, spacing, default="uniform", default_steps=50)
        preds = [diffusion.prediction] * len(ts) if predictions is None else list(predictions)
        if len(preds) != len(ts) or any(p not in ("eps", "x0", "v") for p in preds):
            raise ValueError(f"predictions must be one of 'eps', 'x0', 'v' per timestep ({len(ts)}), got {predictions!r}")
        self.row_predictions: List[str] = preds
        self._setup(diffusion, ts)

    def _build_coefs(self) -> torch.Tensor:
        r = self.respaced
        table = self._per_step(ddim_coefs(self.prediction, r.alphas_cumprod, r.alphas_cumprod_prev, self.eta))
        for p in sorted(set(self.row_predictions) - {self.prediction}):
            other = self._per_step(ddim_coefs(p, r.alphas_cumprod, r.alphas_cumprod_prev, self.eta))
            rows = [s for s, q in enumerate(self.row_predictions) if q == p]
            table[rows] = other[rows]
        return table

    def __repr__(self) -> str:
        return (f"DDIMSampler(steps={self.num_steps}, spacing={self.spacing!r}, eta={self.eta}, "
                f"prediction={self.prediction!r})")


class _MultistepSampler(Sampler):
    """The history `step()` keeps for the multistep solvers: the x0-hats of the last `num_history`
    steps, most recent first. Take the steps in order from timesteps[0] (the first step resets the
    state), or pass `x0_prev=` explicitly (a tensor, or a sequence most recent first); `reset()`
    clears it."""

    def _init_state(self) -> None:
        self._history: List[torch.Tensor] = []
        self._last_row: Optional[int] = None

    def reset(self) -> None:
        """Forget the previous x0-hats kept by `step()`."""
        self._init_state()

    def _history_for(self, s: int, x0_prev: Any) -> Tuple[Optional[torch.Tensor], ...]:
        need = min(s, self.num_history)  # row s reads the x0-hats of rows s-1, ..., s-need
        if need == 0:
            return (None, None, None)
        if x0_prev is not None:
            hist = [x0_prev] if isinstance(x0_prev, torch.Tensor) else list(x0_prev)
            if len(hist) < need or not all(isinstance(h, torch.Tensor) for h in hist):
                raise ValueError(f"x0_prev: the step at t={int(self.timesteps[s])} needs the x0-hats of the {need} "
                                 f"previous timesteps (tensors, most recent first), got {len(hist)}")
        elif self._last_row != s - 1 or len(self._history) < need:
            raise ValueError(
                f"x0_prev: {type(self).__name__} step at t={int(self.timesteps[s])} needs the x0-hat of the previous "
                f"timestep {int(self.timesteps[s - 1])}: take the steps in order from timesteps[0], or pass x0_prev="
            )
        else:
            hist = self._history
        return tuple(hist[:need]) + (None,) * (3 - need)

    def _after_step(self, s: int, x0: torch.Tensor, history: Tuple[Optional[torch.Tensor], ...]) -> None:
        self._history = [x0] + [h for h in history if h is not None][: self.num_history - 1]
        self._last_row = s


class DPMSolverSampler(_MultistepSampler):
    """DPM-Solver++(2M) (Lu et al. 2022), multistep second order in data (x0) prediction.

    Timesteps: an int `steps` gives time-quadratic spacing (`quadratic_timesteps`: t_i =
    round((i/(S-1))^2 (T-1)), T-1 and 0 included, dense near 0), or pass an explicit descending list
    (None: all T). With lambda = log(alpha/sigma), alpha = sqrt(ab), sigma = sqrt(1 - ab),
    h = lambda_next - lambda_cur, step s < S-1 goes from timesteps[s] to timesteps[s+1]:
        first order (s = 0):  x' = (sigma'/sigma) x + alpha' (1 - e^{-h}) x0_s
        2M (0 < s < S-1):     x' = (sigma'/sigma) x + alpha' (1 - e^{-h}) ((1 + 1/2r) x0_s - (1/2r) x0_{s-1}),
                              r = h_prev / h
    and the final step (s = S-1) returns x0-hat at timesteps[-1] (a first-order step to sigma = 0).
    `steps` counts model evaluations.

    first_order_final: whether the last transition (s = S-2, timesteps[-2] -> timesteps[-1]) is first
    order too. None (default): exactly when timesteps[-1] == 0. Timesteps that end at t = 0 (quadratic,
    uniform, logsnr, karras) make that transition the solver's real last step (the final x0-hat at
    sigma(0) ~ 0.01 changes little), which DPM-Solver's lower_order_final takes at first order; on
    the exact Gaussian model that lowers the ODE error at 6-20 time-quadratic steps, linear and cosine
    schedules (cosine, 8 steps: 0.012 vs 0.069) and raises it at 5 (0.15 vs 0.06). Timesteps that end above 0 ("trailing": the final x0-hat jumps from T/S - 1 to x0) already
    end on a first-order step, the x0-hat, and keep the transition before it at second order, as
    diffusers' DPMSolverMultistepScheduler does (final_sigmas_type="zero"): step for step equal to it
    (tests/test_multistep_solvers.py::test_dpm_solver_2m_matches_diffusers). Forcing it first order
    there cost SDE-DPM-Solver++(2M) digits-FD 3.17 vs 2.91 at 15 trailing calls (seed 0, docs/samplers.md).
    Pass False for parity with diffusers on timesteps that end at 0 (its "leading" spacing).

    stochastic=True: SDE-DPM-Solver++(2M) (the "sde-dpmsolver++" midpoint update of diffusers'
    DPMSolverMultistepScheduler), which solves the reverse SDE instead of the probability-flow ODE:
        x' = e^{-h} (sigma'/sigma) x + alpha' (1 - e^{-2h}) D + sigma' sqrt(1 - e^{-2h}) z
    with D = x0_s (first order) or (1 + 1/2r) x0_s - (1/2r) x0_{s-1} (2M). The noise re-injected at
    every step corrects part of the model's error, which the deterministic solver carries to the end
    (docs/quality_vs_steps.md measures both); z is the sampler's Philox stream, as for DDPM.

    `step()` keeps the previous x0-hat internally: take the steps in order from timesteps[0] (the
    first step resets the state), or pass `x0_prev=` explicitly; `reset()` clears it.
    """

    num_history = 1

    def __init__(self, diffusion: Any, steps: Steps = 20, stochastic: bool = False, *,
                 spacing: Optional[Spacing] = None, first_order_final: Optional[bool] = None):
        self.stochastic = _check_flag("stochastic", stochastic)
        if first_order_final is not None:
            _check_flag("first_order_final", first_order_final)
        self._init_state()
        ts, self.spacing = _spaced_timesteps(diffusion, steps, spacing, default="quadratic", default_steps=20)
        self.first_order_final: bool = ts[-1] == 0 if first_order_final is None else first_order_final
        self._setup(diffusion, ts)

    def _build_coefs(self) -> torch.Tensor:
        ab = self.schedule.alphas_cumprod[self.timesteps]  # per row (descending timesteps)
        alpha, sigma = ab.sqrt(), (1.0 - ab).sqrt()
        lam = alpha.log() - sigma.log()
        S = ab.numel()
        c = torch.zeros(S, NUM_COEFS, dtype=torch.float64)
        c[:, _A], c[:, _B] = _x0_coefs(self.prediction, ab)
        for s in range(S - 1):
            h = lam[s + 1] - lam[s]
            if self.stochastic:  # e^{-h} sigma'/sigma x + alpha' (1 - e^{-2h}) D + sigma' sqrt(1 - e^{-2h}) z
                phi = alpha[s + 1] * -torch.expm1(-2.0 * h)
                c[s, _Q] = sigma[s + 1] / sigma[s] * torch.exp(-h)
                c[s, _SIGMA] = sigma[s + 1] * (-torch.expm1(-2.0 * h)).sqrt()
            else:
                phi = alpha[s + 1] * -torch.expm1(-h)
                c[s, _Q] = sigma[s + 1] / sigma[s]
            if s == 0 or (s == S - 2 and self.first_order_final):  # first order (see the class docstring)
                c[s, _P] = phi
            else:
                r = (lam[s] - lam[s - 1]) / h
                c[s, _P] = phi * (1.0 + 0.5 / r)
                c[s, _P2] = -phi * 0.5 / r
        c[S - 1, _P] = 1.0  # final step: x0-hat
        return c

    def __repr__(self) -> str:
        return (f"DPMSolverSampler(steps={self.num_steps}, spacing={self.spacing!r}, stochastic={self.stochastic}, "
                f"first_order_final={self.first_order_final}, prediction={self.prediction!r})")



def _log_snr(schedule: NoiseSchedule, timesteps: torch.Tensor) -> Tuple[List[float], List[float], List[float]]:
    """(alpha, sigma, lambda = log(alpha / sigma)) at the timesteps, float64 Python floats."""
    ab = schedule.alphas_cumprod[timesteps]
    alpha, sigma = ab.sqrt(), (1.0 - ab).sqrt()
    return alpha.tolist(), sigma.tolist(), (alpha.log() - sigma.log()).tolist()


def _solver_orders(S: int, order: int, lower_order_final: bool) -> List[int]:
    """The order of each row's step: warm-up min(order, s + 1) (only s earlier x0-hats exist), at most
    S - s with `lower_order_final` (the last transition second order), and 1 at the final row (the
    step to sigma = 0, where lambda is infinite, is x0-hat itself)."""
    orders = [min(order, s + 1, S - s) if lower_order_final else min(order, s + 1) for s in range(S)]
    orders[-1] = 1
    return orders


def _table_from_rows(sampler: Sampler, q: List[float], hist: List[List[float]], sigma: List[float]) -> torch.Tensor:
    """The float64 table of a data-prediction multistep solver: x' = Q x + P x0-hat + sum_k P_k x0_prev_k
    + SIGMA z; hist[s] = [P, P2, P3, P4] (the coefficient of x0-hat and of the history, most recent first)."""
    S = len(q)
    ab = sampler.schedule.alphas_cumprod[sampler.timesteps]
    c = torch.zeros(S, NUM_COEFS, dtype=torch.float64)
    c[:, _A], c[:, _B] = _x0_coefs(sampler.prediction, ab)
    c[:, _Q] = torch.tensor(q, dtype=torch.float64)
    c[:, _SIGMA] = torch.tensor(sigma, dtype=torch.float64)
    for col, k in zip((_P,) + _HISTORY_COLS, range(4)):
        c[:, col] = torch.tensor([row[k] for row in hist], dtype=torch.float64)
    return c


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


THIRD_ORDER_FORMS = ("taylor", "diffusers")


class DPMSolver3MSampler(_MultistepSampler):
    """DPM-Solver++(3M) (Lu et al. 2022), multistep third order in data (x0) prediction.

    Timesteps as `DPMSolverSampler` (an int: time-quadratic; or an explicit descending list; None: all
    T); `steps` counts model evaluations. With lambda = log(alpha/sigma), h = lambda' - lambda,
    r0 = (lambda - lambda_prev)/h, r1 = (lambda_prev - lambda_prev2)/h and the x0-hats m0 (this step),
    m1, m2 (the two before):
        D1_0 = (m0 - m1)/r0,  D1_1 = (m1 - m2)/r1,  D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1)  (~ h x0')
        x' = (sigma'/sigma) x + phi1 m0 + phi2 D1 + phi3 D2,
        phi1 = alpha'(1 - e^{-h}), phi2 = alpha'(1 - (1 - e^{-h})/h), phi3 = alpha'(1/2 - (h - 1 + e^{-h})/h^2)
    (the exponential integrator of the Taylor expansion of x0-hat in lambda). third_order="taylor"
    (default): D2 = 2 (D1_0 - D1_1)/(r0+r1) ~ h^2 x0'', the term the expansion needs, so the error falls
    at third order as steps double. third_order="diffusers": D2 = (D1_0 - D1_1)/(r0+r1), half of it,
    as diffusers' DPMSolverMultistepScheduler(solver_order=3) (and the DPM-Solver reference code) compute
    it: step for step equal to diffusers, but second order (measured on the exact Gaussian model in
    tests/test_samplers.py::test_dpm_solver_3m_order_of_convergence). Warm-up: first order (DDIM) at
    the first step, second order (2M, the midpoint form of `DPMSolverSampler`) at the second, where
    fewer previous x0-hats exist. The final step (at timesteps[-1]) returns x0-hat.

    stochastic=True: SDE-DPM-Solver++(3M) (diffusers' "sde-dpmsolver++" with solver_order=3): x scaled by
    e^{-h} sigma'/sigma, phi1 = alpha'(1 - e^{-2h}), phi2 = alpha'(1 - (1 - e^{-2h})/(2h)),
    phi3 = alpha'((1 - e^{-2h} - 2h)/(2h)^2 - 1/2) (diffusers' coefficients), plus
    sigma' sqrt(1 - e^{-2h}) z (the sampler's Philox stream, as for DDPM); warm-up as
    `DPMSolverSampler(stochastic=True)`.

    lower_order_final (default True): the last transition (timesteps[-2] -> timesteps[-1]) is at most
    second order, as diffusers' lower_order_final does below 15 steps (diffusers switches it off from
    15 steps on: pass lower_order_final=False there for parity). Chosen by measurement
    (scripts/multistep_choices.py, docs/multistep_choices.md): with the time-quadratic steps it halves
    the exact-Gaussian ODE error at 5 steps (0.19 vs 0.42) and lowers it at 6-20; on the digits model it
    changes the ODE error by <= 1% at 10 and 20 steps and costs 9% at 5 (0.48 vs 0.44); with diffusers'
    linspace steps (no call at t = 0) the Gaussian error at 5 steps is lower without it (0.025 vs 0.046).
    The warm-up (orders 1, 2, 3 at the first three steps) is the least the history allows; its
    first-order first step limits 2M and 3M alike on the digits model (their errors coincide at 20
    steps), which is where UniPC's corrector gains. third_order: "taylor" and "diffusers" differ by <= 1%
    on the digits model at 5-20 steps; "taylor" has the order.

    The update is linear in (x, x0-hat, x0_prev, x0_prev2): one fused `sampler_step` per step with P, P2
    and P3; `step()` keeps the two previous x0-hats (see `_MultistepSampler`).
    """

    num_history = 2

    def __init__(self, diffusion: Any, steps: Steps = 20, stochastic: bool = False, lower_order_final: bool = True,
                 third_order: str = "taylor", *, spacing: Optional[Spacing] = None):
        if third_order not in THIRD_ORDER_FORMS:
            raise ValueError(f"third_order must be one of {THIRD_ORDER_FORMS}, got {third_order!r}")
        self.third_order = third_order
        # D2 = 2 (D1_0 - D1_1)/(r0 + r1) ~ h^2 x0'' (the Taylor term phi3 multiplies); diffusers: half of it
        self._d2_scale = 2.0 if third_order == "taylor" else 1.0
        self.stochastic = _check_flag("stochastic", stochastic)
        self.lower_order_final = _check_flag("lower_order_final", lower_order_final)
        self._init_state()
        ts, self.spacing = _spaced_timesteps(diffusion, steps, spacing, default="quadratic", default_steps=20)
        self._setup(diffusion, ts)

    def _build_coefs(self) -> torch.Tensor:
        alpha, sigma, lam = _log_snr(self.schedule, self.timesteps)
        S = len(lam)
        orders = _solver_orders(S, 3, self.lower_order_final)
        q, noise = [0.0] * S, [0.0] * S
        rows = [[0.0] * 4 for _ in range(S)]
        rows[S - 1][0] = 1.0  # final step: x0-hat
        for s in range(S - 1):
            h = lam[s + 1] - lam[s]
            if self.stochastic:
                e = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
                q[s] = sigma[s + 1] / sigma[s] * math.exp(-h)
                noise[s] = sigma[s + 1] * math.sqrt(e)
                phi2 = alpha[s + 1] * (1.0 - e / (2.0 * h))
                # the Taylor term: alpha' int_0^h 2 e^{-2(h-u)} u^2/2 du / h^2 = alpha'(1/2 + (e - 2h)/(2h)^2);
                # diffusers writes - 1/2 (an O(1) weight on D2: first order as steps double)
                phi3 = alpha[s + 1] * ((e - 2.0 * h) / (2.0 * h) ** 2 + (0.5 if self.third_order == "taylor" else -0.5))
            else:
                e = -math.expm1(-h)  # 1 - e^{-h}
                q[s] = sigma[s + 1] / sigma[s]
                phi2 = alpha[s + 1] * (1.0 - e / h)
                phi3 = alpha[s + 1] * (0.5 - (h - e) / h**2)
            phi1 = alpha[s + 1] * e
            if orders[s] == 1:
                rows[s][0] = phi1
            elif orders[s] == 2:  # midpoint: phi1 (m0 + (m0 - m1) / (2 r0))
                r0 = (lam[s] - lam[s - 1]) / h
                rows[s][0], rows[s][1] = phi1 * (1.0 + 0.5 / r0), -phi1 * 0.5 / r0
            else:  # third order, as coefficient vectors over (m0, m1, m2)
                r0, r1 = (lam[s] - lam[s - 1]) / h, (lam[s - 1] - lam[s - 2]) / h
                d10 = [1.0 / r0, -1.0 / r0, 0.0]
                d11 = [0.0, 1.0 / r1, -1.0 / r1]
                diff = [a - b for a, b in zip(d10, d11)]
                d1 = [a + r0 / (r0 + r1) * b for a, b in zip(d10, diff)]
                d2 = [self._d2_scale * b / (r0 + r1) for b in diff]
                for k in range(3):
                    rows[s][k] = phi1 * (k == 0) + phi2 * d1[k] + phi3 * d2[k]
        return _table_from_rows(self, q, rows, noise)

    def __repr__(self) -> str:
        return (f"DPMSolver3MSampler(steps={self.num_steps}, spacing={self.spacing!r}, stochastic={self.stochastic}, "
                f"lower_order_final={self.lower_order_final}, third_order={self.third_order!r}, "
                f"prediction={self.prediction!r})")


UNIPC_VARIANTS = ("bh1", "bh2")


def _unipc_rhos(lam: List[float], s: int, order: int, variant: str) -> Tuple[List[float], List[float], List[float],
                                                                                 float, float]:
    """UniPC's (rks, rhos_p, rhos_c, h_phi_1, B_h) for the transition from row s to row s+1 at `order`
    (Zhao et al. 2023, the B(h) form in data prediction: hh = -h, B_h = hh (bh1) or e^{hh} - 1 (bh2)).

    rk_i = (lambda_{s-i} - lambda_s) / h for i = 1..order-1; R[k][j] = rks[j]^k with rks = (rk_1, ...,
    1); b_k = k! h phi_{k+1}(hh) / B_h. The predictor's rhos solve R[:-1, :-1] rho = b[:-1] (order 2:
    the simplified 1/2); the corrector's solve R rho = b (order 1: the simplified 1/2)."""
    h = lam[s + 1] - lam[s]
    hh = -h
    h_phi_1 = math.expm1(hh)
    B_h = hh if variant == "bh1" else math.expm1(hh)
    rks = [(lam[s - i] - lam[s]) / h for i in range(1, order)] + [1.0]
    R = torch.tensor([[rk ** k for rk in rks] for k in range(order)], dtype=torch.float64)
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1.0, 1.0
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    bt = torch.tensor(b, dtype=torch.float64)
    if order == 1:
        rhos_p: List[float] = []
    elif order == 2:
        rhos_p = [0.5]
    else:
        rhos_p = torch.linalg.solve(R[:-1, :-1], bt[:-1]).tolist()
    rhos_c = [0.5] if order == 1 else torch.linalg.solve(R, bt).tolist()
    return rks[:-1], rhos_p, rhos_c, h_phi_1, B_h


class UniPCSampler(_MultistepSampler):
    """UniPC (Zhao et al. 2023): the UniP-p predictor with the UniC corrector, data prediction, B(h) =
    "bh1" (h) or "bh2" (e^h - 1), orders 1-3; `steps` counts model evaluations, as for every sampler.

    Step s (x_s from the previous predictor, x0_s from the model call at timesteps[s]):
        corrector (s > 0): x_s^c = (sigma_s/sigma_{s-1}) x_{s-1}^c - alpha_s h_phi_1 x0_{s-1}
                           - alpha_s B(h) (sum_i rho^c_i D_i + rho^c_p (x0_s - x0_{s-1}))
        predictor:         x_{s+1} = (sigma_{s+1}/sigma_s) x_s^c - alpha_{s+1} h_phi_1 x0_s - alpha_{s+1} B(h) sum_i rho^p_i D_i
    with D_i = (x0_{s-i} - x0_s)/r_i the divided differences (`_unipc_rhos`). The corrector reuses the
    model call the predictor needs anyway: it adds no model call. Both are linear in the stored state,
    and x_s^c - x_s is a combination of x0-hats only (the sigma ratios are the same), so corrector and
    predictor fold into ONE row of the coefficient table: x_{s+1} = Q x_s + P x0_s + P2 x0_{s-1}
    + P3 x0_{s-2} + P4 x0_{s-3} (order 3 reads three previous x0-hats, all computed from the
    uncorrected x's that the model saw, as diffusers' UniPCMultistepScheduler keeps them). The
    corrector at step s has the order of the predictor that produced x_s.

    Warm-up: order min(order, s + 1) at step s; lower_order_final (default True): the last transition
    at most second order, the step before at most third (diffusers' lower_order_final). The final step
    returns x0-hat (the predictor to sigma = 0). corrector=False gives UniP alone (then the same table
    as DPM-Solver++(3M) "taylor" for bh2).
    Defaults (order 3, bh2, lower_order_final) by measurement (scripts/multistep_choices.py,
    docs/multistep_choices.md; ODE error, not sample quality): bh2 beats bh1 in every setting measured
    (digits, 20 time-quadratic steps: 0.099 vs 0.340); order 3 and order 2 are within 3% on the digits
    model, order 3 is ahead on the exact Gaussian model from 15 steps (0.008 vs 0.012 at 20) and behind
    at 5-10 with time-quadratic steps; lower_order_final: halves the Gaussian error at 5 time-quadratic
    steps (0.25 vs 0.50), digits within 5%; the corrector lowers the digits error by 20-40% at 10-20
    steps (0.211 vs 0.288 at 10) at no model call.
    """

    def __init__(self, diffusion: Any, steps: Steps = 10, order: int = 3, variant: str = "bh2",
                 lower_order_final: bool = True, corrector: bool = True, *, spacing: Optional[Spacing] = None):
        if isinstance(order, bool) or not isinstance(order, numbers.Integral) or not 1 <= int(order) <= 3:
            raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
        if variant not in UNIPC_VARIANTS:
            raise ValueError(f"variant must be one of {UNIPC_VARIANTS}, got {variant!r}")
        self.order = int(order)
        self.variant = variant
        self.lower_order_final = _check_flag("lower_order_final", lower_order_final)
        self.corrector = _check_flag("corrector", corrector)
        # the corrector at step s reads x0-hats back to s - order (the predictor's order that made x_s)
        self.num_history = self.order if self.corrector else self.order - 1
        self._init_state()
        ts, self.spacing = _spaced_timesteps(diffusion, steps, spacing, default="quadratic", default_steps=10)
        self._setup(diffusion, ts)

    def _build_coefs(self) -> torch.Tensor:
        alpha, sigma, lam = _log_snr(self.schedule, self.timesteps)
        S = len(lam)
        orders = _solver_orders(S, self.order, self.lower_order_final)
        q = [0.0] * S
        rows = [[0.0] * 4 for _ in range(S)]
        rows[S - 1][0] = 1.0  # final step: x0-hat
        prev_pred: List[float] = []  # the previous predictor's x0 coefficients (x0_{s-1}, x0_{s-2}, ...)
        for s in range(S - 1):
            # corrector: delta = x_s^c - x_s over (x0_s, x0_{s-1}, x0_{s-2}, x0_{s-3})
            delta = [0.0] * 4
            if s > 0 and self.corrector:
                p = orders[s - 1]
                rks, _, rhos_c, h_phi_1, B_h = _unipc_rhos(lam, s - 1, p, self.variant)
                a = alpha[s] * B_h
                delta[0] = -a * rhos_c[-1]
                delta[1] = -alpha[s] * h_phi_1 + a * rhos_c[-1]
                for i, (rk, rho) in enumerate(zip(rks, rhos_c[:-1]), start=1):
                    delta[1] += a * rho / rk
                    delta[1 + i] -= a * rho / rk
                for k, v in enumerate(prev_pred):  # minus the predictor that produced x_s
                    delta[1 + k] -= v
            # predictor from x_s^c over (x0_s, x0_{s-1}, x0_{s-2})
            rks, rhos_p, _, h_phi_1, B_h = _unipc_rhos(lam, s, orders[s], self.variant)
            a = alpha[s + 1] * B_h
            pred = [-alpha[s + 1] * h_phi_1] + [0.0] * len(rks)
            for i, (rk, rho) in enumerate(zip(rks, rhos_p), start=1):
                pred[0] += a * rho / rk
                pred[i] -= a * rho / rk
            q[s] = sigma[s + 1] / sigma[s]
            for k in range(4):
                rows[s][k] = q[s] * delta[k] + (pred[k] if k < len(pred) else 0.0)
            prev_pred = pred
        return _table_from_rows(self, q, rows, [0.0] * S)

    def __repr__(self) -> str:
        return (f"UniPCSampler(steps={self.num_steps}, spacing={self.spacing!r}, order={self.order}, variant={self.variant!r}, "
                f"lower_order_final={self.lower_order_final}, corrector={self.corrector}, "
                f"prediction={self.prediction!r})")


def gaussian_gain(sampler: Sampler, data_variance: float) -> float:
    """k with sample = k x_T when the model is the exact denoiser of N(0, data_variance) data.

    For such data E[eps | x_t] = sqrt(1 - ab) x_t / (ab s2 + 1 - ab), so a deterministic sampler (no
    noise column) is a linear map of x_T; k is computed here in float64 from the sampler's coefficient
    table with the op's formula (no clipping). The exact probability-flow ODE gives
    k = g(t1) sqrt(var(t1) / var(t0)), var(t) = ab_t s2 + 1 - ab_t, g(t) = sqrt(ab_t) s2 / var(t), for
    timesteps t0 (first) and t1 (last): the relative difference is the solver's error on this problem.
    """
    s2 = float(data_variance)
    ab_all = sampler.schedule.alphas_cumprod
    x, hist = 1.0, [0.0, 0.0, 0.0]
    preds = getattr(sampler, "row_predictions", None) or [sampler.prediction] * sampler.num_steps
    for row, t, pred in zip(sampler.coefs.tolist(), sampler.timesteps.tolist(), preds):
        ab = float(ab_all[t])
        eps = math.sqrt(1.0 - ab) / (ab * s2 + 1.0 - ab) * x
        x0_exact = math.sqrt(ab) * s2 / (ab * s2 + 1.0 - ab) * x
        m = {"eps": eps, "x0": x0_exact, "v": math.sqrt(ab) * eps - math.sqrt(1.0 - ab) * x0_exact}[pred]
        x0 = row[_A] * x + row[_B] * m
        x = (row[_P] * x0 + row[_Q] * x + row[_R] * m
             + sum(row[col] * h for col, h in zip(_HISTORY_COLS, hist)))
        hist = [x0] + hist[:2]
    return x


def known_region_coefs(sampler: Sampler) -> torch.Tensor:
    """float64 [S, 2]: the op's KA, KZ columns for known-region replacement (inpainting): row s noises the
    known image to the timestep step s lands on, sqrt(ab_next) and sqrt(1 - ab_next), with ab_next the
    alpha_bar of timesteps[s + 1] (1 after the last step: the known image itself)."""
    ab = sampler.schedule.alphas_cumprod.to(torch.float64)
    nxt = torch.cat([ab[sampler.timesteps[1:]], torch.ones(1, dtype=torch.float64)])
    return torch.stack([nxt.sqrt(), (1.0 - nxt).clamp_min(0.0).sqrt()], dim=1)


def make_sampler(name: str, diffusion: Any, steps: Steps = None, eta: float = 0.0, *,
                 spacing: Optional[Spacing] = None) -> Sampler:
    """A sampler by name: "ddpm" (steps None = all T), "ddim" (default 50 steps, `eta`), "dpm++"
    (DPM-Solver++(2M), default 20), "dpm++sde" (its stochastic SDE form, default 20), "dpm++3m"
    (DPM-Solver++(3M), default 20), "dpm++3m-sde" (its SDE form, default 20) or "unipc" (UniPC,
    bh2, order 3, default 10).

    `spacing` (see `fastddpm.spacing`): "uniform", "trailing", "quadratic", "logsnr", "karras" or an
    explicit descending list of timesteps; None takes `DEFAULT_SPACING[name]` (measured per sampler on
    the bundled model: docs/quality_table.md).
    """
    if name not in SAMPLER_NAMES:
        raise ValueError(f"sampler must be one of {SAMPLER_NAMES}, got {name!r}")
    if eta and name != "ddim":
        import warnings

        warnings.warn(f"eta={eta!r} is ignored: only the 'ddim' sampler has an eta (the '-sde' samplers are the "
                      "stochastic ones)", stacklevel=2)
    if steps is None and (spacing is None or isinstance(spacing, str)):
        steps = DEFAULT_STEPS[name]
    if spacing is None and isinstance(steps, numbers.Integral):
        spacing = DEFAULT_SPACING[name]
    if name == "ddpm":
        return DDPMSampler(diffusion, steps=steps, spacing=spacing)
    if name == "ddim":
        return DDIMSampler(diffusion, steps=steps, eta=eta, spacing=spacing)
    if name in ("dpm++3m", "dpm++3m-sde"):
        return DPMSolver3MSampler(diffusion, steps=steps, stochastic=name == "dpm++3m-sde", spacing=spacing)
    if name == "unipc":
        return UniPCSampler(diffusion, steps=steps, spacing=spacing)
    return DPMSolverSampler(diffusion, steps=steps, stochastic=name == "dpm++sde", spacing=spacing)

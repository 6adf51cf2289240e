"""Timestep spacings: which `steps` of the T training timesteps a sampler visits.

Every function returns a strictly descending list of int timesteps in [0, T) that starts at T-1 (x_T
is drawn at the last training timestep, whatever the spacing) and has exactly `steps` elements:

- "uniform": evenly spaced in t, T-1 and 0 included (improved-diffusion's `space_timesteps`).
- "trailing": diffusers' timestep_spacing="trailing": round(T - i T / steps) - 1, i = 0..steps-1
  (T-1 down to T/steps - 1; the last step jumps from there to x0).
- "quadratic": t_i = round((i / (steps-1))^2 (T-1)), dense near t = 0 (DPM-Solver's time-quadratic).
- "logsnr": equally spaced in lambda = log(alpha / sigma) = 0.5 log(ab / (1 - ab)) from lambda(T-1)
  (clipped, below) to lambda(0), each rounded to the timestep of nearest lambda (DPM-Solver's
  "logSNR" spacing, diffusers' use_lu_lambdas).
- "karras": sigma_i = (smax^(1/rho) + i/(steps-1) (smin^(1/rho) - smax^(1/rho)))^rho in the EDM
  sigma = sqrt((1 - ab) / ab) (Karras et al. 2022, rho = 7), from sigma(T-1) (clipped) to sigma(0),
  each rounded to the timestep of nearest log sigma.

Clipping. On the cosine schedule sigma(T-1) is about 2e4 (alpha_bar collapses in the last few
timesteps, where betas hit max_beta): a grid from there puts several points in the last 1% of t,
which round to the same few timesteps (diffusers then visits t = 999 several times, and its scores
are 5-20x worse). Here the grid's largest sigma is min(sigma(T-1), `sigma_max`) (default 80, EDM's
sigma_max: the model's prediction is the data mean beyond it) and its first point is then moved to
T-1, so the first step goes from x_T to the second grid point.

Duplicates. Rounding can map two grid points to one timestep (near t = 0 for few timesteps T, or
for steps close to T); `strictly_descending` then moves the later ones to the next free timestep, so
no two steps share a t and the count stays `steps`.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Sequence, Union

import torch

from ._names import SPACING_NAMES
from .schedule import NoiseSchedule, space_timesteps

__all__ = ["SPACINGS", "make_timesteps", "strictly_descending", "edm_sigma", "DEFAULT_SIGMA_MAX",
           "KARRAS_RHO"]

SPACINGS = SPACING_NAMES
DEFAULT_SIGMA_MAX = 80.0
KARRAS_RHO = 7.0

Spacing = Union[str, Sequence[int]]


def edm_sigma(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The EDM noise level sigma_t = sqrt((1 - ab) / ab) (= exp(-lambda_t)), float64."""
    ab = alphas_cumprod.to(torch.float64)
    return ((1.0 - ab) / ab).sqrt()


def strictly_descending(ts: Sequence[int], num_timesteps: int) -> List[int]:
    """`ts` (descending, possibly with ties) made strictly descending inside [0, T) with the least moves:
    ties are pushed up from the bottom (t = 0 side), then anything pushed past T-1 is pushed back down."""
    T = int(num_timesteps)
    if len(ts) > T:
        raise ValueError(f"steps must be <= T = {T}, got {len(ts)} timesteps")
    up = sorted(int(v) for v in ts)
    for i in range(1, len(up)):
        up[i] = max(up[i], up[i - 1] + 1)
    up[-1] = min(up[-1], T - 1)
    for i in range(len(up) - 2, -1, -1):
        up[i] = min(up[i], up[i + 1] - 1)
    return up[::-1]


def _nearest(table: torch.Tensor, targets: torch.Tensor) -> List[int]:
    """For each target, the index t of the table value (monotone in t) nearest to it."""
    return [int(torch.argmin((table - g).abs())) for g in targets.tolist()]


def _check_steps(steps: object, T: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= int(steps) <= T:
        raise ValueError(f"steps must be an int in [1, {T}], got {steps!r}")
    return int(steps)


def make_timesteps(schedule: NoiseSchedule, steps: int, spacing: str = "uniform", *,
                   sigma_max: float = DEFAULT_SIGMA_MAX, rho: float = KARRAS_RHO) -> List[int]:
    """`steps` descending timesteps of `schedule` with `spacing` (one of SPACINGS; see the module doc).

    Args:
        schedule: the training NoiseSchedule (its alphas_cumprod define lambda and sigma).
        steps: the number of timesteps (model calls of a one-call-per-step sampler).
        spacing: "uniform", "trailing", "quadratic", "logsnr" or "karras".
        sigma_max: largest EDM sigma of the "logsnr" / "karras" grids (clipping; inf: none).
        rho: the Karras exponent.
    """
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule must be a fastddpm.NoiseSchedule, got {type(schedule).__name__}")
    T = int(schedule.num_timesteps)
    steps = _check_steps(steps, T)
    if not isinstance(spacing, str) or spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS} (or an explicit descending list), got {spacing!r}")
    if not (isinstance(sigma_max, numbers.Real) and float(sigma_max) > 0):
        raise ValueError(f"sigma_max must be a positive number (math.inf: no clipping), got {sigma_max!r}")
    if not (isinstance(rho, numbers.Real) and math.isfinite(float(rho)) and float(rho) > 0):
        raise ValueError(f"rho must be a positive number, got {rho!r}")
    if steps == 1:
        return [T - 1]
    if spacing == "uniform":
        return sorted(space_timesteps(T, steps), reverse=True)
    if spacing == "trailing":
        ts = [round(T - i * T / steps) - 1 for i in range(steps)]
        return strictly_descending(ts, T)
    if spacing == "quadratic":
        ts = [round((i / (steps - 1)) ** 2 * (T - 1)) for i in range(steps - 1, -1, -1)]
        return strictly_descending(ts, T)
    sig = edm_sigma(schedule.alphas_cumprod)
    log_sig = sig.log()  # = -lambda, increasing in t
    hi = min(float(sig[-1]), float(sigma_max))
    lo = float(sig[0])
    i = torch.arange(steps, dtype=torch.float64) / (steps - 1)
    if spacing == "logsnr":  # equally spaced in lambda = -log sigma
        grid = math.log(hi) + i * (math.log(lo) - math.log(hi))
    else:  # karras
        r = 1.0 / float(rho)
        grid = ((hi ** r + i * (lo ** r - hi ** r)) ** float(rho)).log()
    ts = _nearest(log_sig, grid)
    ts[0] = T - 1  # x_T is drawn at T-1: the first point of a clipped grid moves there
    return strictly_descending(ts, T)

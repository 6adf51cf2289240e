"""Noise schedules: betas and the tables derived from them, in float64 on the CPU.

Timesteps are int64 indices t in [0, T): t = 0 is the first noising step.
alphas_cumprod[t] = prod_{s<=t} (1 - betas[s]). Every table is float64 and lives on the CPU; users
cast once to the device and dtype they need (`NoiseSchedule.table`).
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

Betas = Union[Sequence[float], torch.Tensor]


class NoiseSchedule:
    """A variance schedule beta_0..beta_{T-1} with the DDPM tables derived from it.

    Attributes (float64 CPU tensors of shape [T] unless noted):
        betas, alphas (1 - betas), alphas_cumprod (alpha_bar_t), alphas_cumprod_prev (alpha_bar_{t-1},
        1 at t = 0), sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, sqrt_recip_alphas_cumprod,
        sqrt_recipm1_alphas_cumprod, posterior_variance (beta_tilde_t), posterior_log_variance_clipped
        (log beta_tilde with t = 0 replaced by t = 1, whose beta_tilde_0 = 0), posterior_mean_coef1
        (coefficient of x0 in the mean of q(x_{t-1} | x_t, x0)), posterior_mean_coef2 (of x_t),
        num_timesteps (int T).
    """

    def __init__(self, betas: Betas):
        if isinstance(betas, (str, bytes)):
            raise ValueError(f"betas must be a non-empty 1-D sequence of floats in (0, 1), got {betas!r}")
        try:
            b = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().clone()
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"betas must be a non-empty 1-D sequence of floats in (0, 1), got "
                             f"{type(betas).__name__} ({e})") from None
        if b.ndim != 1 or b.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(b.shape)}")
        if not torch.isfinite(b).all() or (b <= 0).any() or (b >= 1).any():
            raise ValueError("betas must be finite and lie in the open interval (0, 1)")
        self.betas = b
        self.num_timesteps = int(b.numel())
        self.alphas = 1.0 - b
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([b.new_ones(1), self.alphas_cumprod[:-1]])
        ab, ab_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.sqrt_alphas_cumprod = ab.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ab).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / ab).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ab - 1.0).sqrt()
        self.posterior_variance = b * (1.0 - ab_prev) / (1.0 - ab)
        # beta_tilde_0 = 0: clip the log at t = 0 with beta_tilde_1 (improved-diffusion). With T = 1
        # there is no t = 1; use beta_0 then.
        first = self.posterior_variance[1:2] if self.num_timesteps > 1 else b[:1]
        self.posterior_log_variance_clipped = torch.cat([first, self.posterior_variance[1:]]).log()
        self.posterior_mean_coef1 = b * ab_prev.sqrt() / (1.0 - ab)
        self.posterior_mean_coef2 = (1.0 - ab_prev) * self.alphas.sqrt() / (1.0 - ab)

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """DDPM's linear schedule; the end points are scaled by 1000/T so any T spans the same range."""
        _check_num_timesteps(num_timesteps)
        for name, v in (("beta_start", beta_start), ("beta_end", beta_end)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ValueError(f"{name} must be a number in (0, 1), got {v!r}")
        if beta_start > beta_end:
            raise ValueError(f"beta_start must be <= beta_end (the noise grows with t), got beta_start={beta_start!r}, "
                             f"beta_end={beta_end!r}")
        scale = 1000.0 / num_timesteps
        if beta_end * scale >= 1:
            raise ValueError(f"num_timesteps={num_timesteps} is too small for the linear schedule: beta_end * 1000 / T "
                             f"= {beta_end * scale:g} must stay below 1 (use T >= {int(1000 * beta_end) + 1})")
        return cls(torch.linspace(beta_start * scale, beta_end * scale, num_timesteps, dtype=torch.float64))

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "NoiseSchedule":
        """Nichol & Dhariwal's cosine schedule: alpha_bar(t) = cos(((t/T)+s)/(1+s) * pi/2)^2."""
        _check_num_timesteps(num_timesteps)
        t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)
        return cls(betas)

    # ----------------------------------------------------------------------------- respacing
    def respace(self, timesteps: Sequence[int]) -> "NoiseSchedule":
        """The schedule of a subsequence S of timesteps (improved-diffusion's respacing).

        beta_i = 1 - alpha_bar[S_i] / alpha_bar[S_{i-1}] (alpha_bar[S_{-1}] = 1), so the new schedule's
        alphas_cumprod equals the old one at the kept timesteps. `timesteps` may be given in any order;
        it is used sorted ascending. The result's `timestep_map` holds S (int64): the model is still
        called with the original timestep S_i.
        """
        try:
            raw = torch.as_tensor(list(timesteps) if not torch.is_tensor(timesteps) else timesteps)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"timesteps must be a sequence of integers, got {timesteps!r}") from None
        if raw.dtype == torch.bool or (raw.is_floating_point() and not bool((raw == raw.round()).all())) \
                or raw.is_complex():
            raise ValueError(f"timesteps must be integers, got {raw.tolist()!r}")
        ts = torch.unique(raw.to(torch.int64))  # sorted ascending
        if ts.numel() == 0 or ts.min() < 0 or ts.max() >= self.num_timesteps:
            raise ValueError(f"timesteps must be a non-empty set of integers in [0, {self.num_timesteps})")
        ab = self.alphas_cumprod[ts]
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        out = NoiseSchedule(1.0 - ab / ab_prev)
        out.timestep_map = ts
        return out

    def table(self, name: str, device=None, dtype=torch.float32) -> torch.Tensor:
        """One of the float64 tables, cast once to `device`/`dtype`."""
        return getattr(self, name).to(device=device, dtype=dtype)

    def __repr__(self) -> str:
        return f"NoiseSchedule(num_timesteps={self.num_timesteps}, beta[0]={self.betas[0]:.3g}, beta[-1]={self.betas[-1]:.3g})"


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` timesteps evenly spaced over [0, T), always containing 0 and T-1 when steps >= 2.

    Uses improved-diffusion's rule for a single section: a float stride (T-1)/(steps-1) accumulated
    step by step and rounded (accumulating, as improved-diffusion does, decides the .5 ties the same way).
    One step gives [T-1] (improved-diffusion gives [0]; a one-step sampler must start from noise).
    """
    _check_num_timesteps(num_timesteps)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1 or steps > num_timesteps:
        raise ValueError(f"steps must be an int in [1, {num_timesteps}], got {steps!r}")
    if steps == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (steps - 1)
    taken, position = [], 0.0
    for _ in range(steps):
        taken.append(round(position))
        position += stride
    return taken


def _check_num_timesteps(num_timesteps: int) -> None:
    if not isinstance(num_timesteps, int) or isinstance(num_timesteps, bool) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")

"""Timestep spacings (fastddpm.spacing) against their closed forms, computed here in numpy, and the
samplers' spacing= argument."""
import math

import numpy as np
import pytest

from fastddpm.diffusion import GaussianDiffusion
from fastddpm.samplers import DDIMSampler, DDPMSampler, DPMSolverSampler, make_sampler, quadratic_timesteps
from fastddpm.schedule import NoiseSchedule, space_timesteps
from fastddpm.spacing import SPACINGS, make_timesteps, strictly_descending

T = 1000


def linear_ab(T=T):
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))


def cosine_ab(T=T, s=0.008):
    f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    betas = np.clip(1 - f(np.arange(1, T + 1)) / f(np.arange(T)), 0, 0.999)
    return np.cumprod(1.0 - betas)


def nearest(table, values):
    return [int(np.argmin(np.abs(table - v))) for v in values]


def test_logsnr_is_equally_spaced_in_lambda_to_the_rounding_of_t():
    ab = linear_ab()
    lam = 0.5 * np.log(ab / (1 - ab))
    ts = make_timesteps(NoiseSchedule.linear(T), 12, "logsnr", sigma_max=math.inf)
    grid = np.linspace(lam[-1], lam[0], 12)
    assert ts == nearest(lam, grid)
    # each visited lambda is within half a local lambda step of its grid point
    for t, g in zip(ts, grid):
        local = max(abs(lam[min(t + 1, T - 1)] - lam[t]), abs(lam[t] - lam[max(t - 1, 0)]))
        assert abs(lam[t] - g) <= 0.5 * local + 1e-12


def test_karras_follows_the_rho7_sigma_formula():
    ab = linear_ab()
    sig = np.sqrt((1 - ab) / ab)
    smax, smin, rho, n = sig[-1], sig[0], 7.0, 10
    i = np.arange(n) / (n - 1)
    sigmas = (smax ** (1 / rho) + i * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    ts = make_timesteps(NoiseSchedule.linear(T), n, "karras", sigma_max=math.inf)
    assert ts == nearest(np.log(sig), np.log(sigmas))
    assert ts[0] == T - 1 and ts[-1] == 0


@pytest.mark.parametrize("spacing", ["logsnr", "karras"])
def test_cosine_sigma_max_is_clipped(spacing):
    """Cosine: sigma(T-1) ~ 2e4; unclipped grids crowd the last timesteps. Clipped at 80: the first step
    goes from T-1 to the second grid point, computed here from sigma_max = 80."""
    ab = cosine_ab()
    sig = np.sqrt((1 - ab) / ab)
    assert sig[-1] > 1e4
    sched = NoiseSchedule.cosine(T)
    ts = make_timesteps(sched, 10, spacing)
    hi, lo, i = 80.0, sig[0], np.arange(10) / 9
    if spacing == "logsnr":
        grid = np.exp(np.log(hi) + i * (np.log(lo) - np.log(hi)))
    else:
        grid = (hi ** (1 / 7) + i * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    want = [T - 1] + nearest(np.log(sig), np.log(grid[1:]))
    assert ts == want
    assert sum(sig[t] > 80 for t in ts) == 1  # only x_T's own timestep lies beyond sigma_max
    raw = nearest(np.log(sig), np.log(np.exp(np.linspace(np.log(sig[-1]), np.log(lo), 10))))
    assert sum(t >= 990 for t in raw) >= 3  # what unclipped logSNR spacing would visit near t = 999


def test_uniform_trailing_quadratic_closed_forms():
    sched = NoiseSchedule.linear(T)
    assert make_timesteps(sched, 10, "uniform") == sorted(space_timesteps(T, 10), reverse=True)
    assert make_timesteps(sched, 10, "trailing") == [int(v) for v in np.round(np.arange(T, 0, -T / 10)) - 1]
    assert make_timesteps(sched, 7, "quadratic") == quadratic_timesteps(T, 7)
    assert make_timesteps(sched, 5, "quadratic") == [round((i / 4) ** 2 * 999) for i in range(4, -1, -1)]


def test_trailing_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    s = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    s.set_timesteps(13)
    assert make_timesteps(NoiseSchedule.linear(T), 13, "trailing") == s.timesteps.tolist()


@pytest.mark.parametrize("spacing", SPACINGS)
def test_never_two_steps_at_one_timestep(spacing):
    for Tn, sched in ((20, NoiseSchedule.cosine(20)), (50, NoiseSchedule.linear(50))):
        for steps in range(1, Tn + 1):
            ts = make_timesteps(sched, steps, spacing)
            assert len(ts) == steps and ts[0] == Tn - 1 and ts[-1] >= 0
            assert all(a > b for a, b in zip(ts, ts[1:])), (Tn, steps, ts)


def test_strictly_descending_moves_ties_minimally():
    assert strictly_descending([9, 3, 0, 0, 0], 10) == [9, 3, 2, 1, 0]
    assert strictly_descending([9, 9, 9, 2], 10) == [9, 8, 7, 2]
    with pytest.raises(ValueError, match="steps must be <= T"):
        strictly_descending(list(range(11)), 10)


def test_samplers_take_spacing():
    d = GaussianDiffusion(NoiseSchedule.cosine(T))
    sched = d.schedule
    for cls, kw in ((DDPMSampler, {}), (DDIMSampler, {"eta": 0.0}), (DPMSolverSampler, {})):
        s = cls(d, steps=8, spacing="logsnr", **kw)
        assert s.timesteps.tolist() == make_timesteps(sched, 8, "logsnr") and s.spacing == "logsnr"
        assert "spacing='logsnr'" in repr(s)
        s = cls(d, spacing=[999, 500, 3], **kw)
        assert s.timesteps.tolist() == [999, 500, 3] and s.spacing == "explicit"
    assert DPMSolverSampler(d, steps=6).spacing == "quadratic"  # the class default, named
    assert make_sampler("ddim", d, steps=6, spacing="trailing").timesteps.tolist() == make_timesteps(sched, 6, "trailing")
    with pytest.raises(ValueError, match="spacing must be one of"):
        DDIMSampler(d, steps=5, spacing="cosine")
    with pytest.raises(ValueError, match="steps must be None or 3"):
        DDIMSampler(d, steps=4, spacing=[999, 500, 3])
    with pytest.raises(ValueError, match="needs an int steps"):
        DDIMSampler(d, steps=[999, 3], spacing="logsnr")
    with pytest.raises(ValueError, match="strictly descending"):
        DDIMSampler(d, spacing=[999, 500, 500])

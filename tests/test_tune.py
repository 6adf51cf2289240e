"""tune_timesteps on the exact denoiser of Gaussian data, and the tuned schedules' storage."""
import json
import os

import pytest
import torch

from fastddpm.diffusion import GaussianDiffusion
from fastddpm.samplers import make_sampler
from fastddpm.schedule import NoiseSchedule
from fastddpm import tune as ft


class GaussianEps:
    """Exact eps prediction for x0 ~ N(0, s2 I): E[eps | x_t] = sqrt(1 - ab) x_t / (ab s2 + 1 - ab)."""

    def __init__(self, schedule, s2=0.25):
        self.ab, self.s2 = schedule.alphas_cumprod, s2

    def __call__(self, x, t):
        ab = self.ab[t].reshape(-1, 1, 1, 1)
        return ((1 - ab).sqrt() * x.double() / (ab * self.s2 + 1 - ab)).to(x.dtype)


@pytest.fixture(scope="module")
def gaussian():
    d = GaussianDiffusion(NoiseSchedule.cosine(1000))
    return GaussianEps(d.schedule), d


def _error(model, d, ts, seed=5, n=64, shape=(1, 4, 4)):
    """Independent check of the objective: mean squared error of DDIM on `ts` against a 200-step DDIM."""
    x = make_sampler("ddim", d, steps=list(ts)).sample(model, (n, *shape), seed=seed)
    ref = make_sampler("ddim", d, steps=200, spacing="uniform").sample(model, (n, *shape), seed=seed)
    return float(((x - ref) ** 2).mean())


def test_tune_improves_on_uniform_for_the_exact_gaussian_model(gaussian):
    model, d = gaussian
    r = ft.tune_timesteps(model, d, "ddim", 4, shape=(1, 4, 4), num_samples=64, val_samples=64, reference_steps=100,
                          max_rounds=3)
    uniform = r.spacing_objectives["uniform"]
    assert set(r.spacing_objectives) >= {"uniform", "logsnr", "karras", "quadratic", "trailing"}
    assert r.accepted and r.val_objective < r.val_initial_objective
    assert r.objective < 0.7 * uniform, (r.objective, uniform)
    assert len(r.timesteps) == 4 and r.timesteps[0] == 999
    assert all(a > b for a, b in zip(r.timesteps, r.timesteps[1:]))
    # on fresh x_T and against another reference solver, the tuned schedule still beats uniform
    assert _error(model, d, r.timesteps) < 0.7 * _error(model, d, make_sampler("ddim", d, steps=4).timesteps.tolist())


def test_tune_rejects_stochastic_samplers_and_bad_args(gaussian):
    model, d = gaussian
    with pytest.raises(ValueError, match="deterministic"):
        ft.tune_timesteps(model, d, "dpm++sde", 4, shape=(1, 4, 4))
    with pytest.raises(ValueError, match="steps must be an int >= 2"):
        ft.tune_timesteps(model, d, "ddim", 1, shape=(1, 4, 4))
    with pytest.raises(ValueError, match="shape is required"):
        ft.tune_timesteps(model, d, "ddim", 4)


def test_tuned_schedule_is_stored_beside_the_checkpoint(tmp_path):
    ck = tmp_path / "m.safetensors"
    ck.write_bytes(b"")
    r = ft.TuneResult("unipc", 3, [999, 400, 20], "logsnr", [999, 500, 0], 1.0, 2.0, 1.5, 2.5, True, 10, 1.0)
    path = ft.save_tuned_schedule(str(ck), r)
    assert path == str(tmp_path / "m.schedules.json")
    r2 = ft.TuneResult("unipc", 5, [999, 700, 400, 100, 0], "logsnr", [999, 700, 400, 100, 0], 1, 1, 1, 1, False, 1, 1)
    ft.save_tuned_schedule(str(ck), r2)
    assert ft.load_tuned_schedules(str(ck)) == {"unipc": {"3": [999, 400, 20], "5": [999, 700, 400, 100, 0]}}
    assert ft.tuned_timesteps(str(ck), "unipc", 3) == [999, 400, 20] and ft.tuned_timesteps(str(ck), "ddim", 3) is None
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # atomic write left nothing behind
    d = tmp_path / "ckdir"
    d.mkdir()
    assert ft.schedules_path(str(d)) == str(d / "schedules.json")
    (tmp_path / "bad.schedules.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a fastddpm tuned-schedule file"):
        ft.load_tuned_schedules(str(tmp_path / "bad.safetensors"))

"""NoiseSchedule and space_timesteps against closed forms and independent computations (numpy, diffusers)."""
import math

import numpy as np
import pytest
import torch

from fastddpm.schedule import NoiseSchedule, space_timesteps

ALL_TABLES = (
    "betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def reference_tables(betas):
    """The DDPM tables from betas, written out element by element in Python floats (float64)."""
    T = len(betas)
    ab, acc = [], 1.0
    for b in betas:
        acc *= 1.0 - b
        ab.append(acc)
    ab_prev = [1.0] + ab[:-1]
    post_var = [betas[i] * (1 - ab_prev[i]) / (1 - ab[i]) for i in range(T)]
    first = post_var[1] if T > 1 else betas[0]
    return {
        "betas": list(betas),
        "alphas": [1 - b for b in betas],
        "alphas_cumprod": ab,
        "alphas_cumprod_prev": ab_prev,
        "sqrt_alphas_cumprod": [math.sqrt(a) for a in ab],
        "sqrt_one_minus_alphas_cumprod": [math.sqrt(1 - a) for a in ab],
        "sqrt_recip_alphas_cumprod": [math.sqrt(1 / a) for a in ab],
        "sqrt_recipm1_alphas_cumprod": [math.sqrt(1 / a - 1) for a in ab],
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": [math.log(first)] + [math.log(v) for v in post_var[1:]],
        "posterior_mean_coef1": [betas[i] * math.sqrt(ab_prev[i]) / (1 - ab[i]) for i in range(T)],
        "posterior_mean_coef2": [(1 - ab_prev[i]) * math.sqrt(1 - betas[i]) / (1 - ab[i]) for i in range(T)],
    }


def assert_tables(sched, betas, rtol=1e-12):
    ref = reference_tables([float(b) for b in betas])
    assert sched.num_timesteps == len(betas)
    for name in ALL_TABLES:
        got = getattr(sched, name)
        assert got.dtype == torch.float64 and got.device.type == "cpu", name
        np.testing.assert_allclose(got.numpy(), np.array(ref[name]), rtol=rtol, atol=0, err_msg=name)


@pytest.mark.parametrize("T", [1000, 100, 40])
def test_linear_closed_form(T):
    s = NoiseSchedule.linear(T)
    betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
    assert_tables(s, betas)
    assert s.betas[0].item() == pytest.approx(0.1 / T, rel=1e-12)
    assert s.betas[-1].item() == pytest.approx(20.0 / T, rel=1e-12)


@pytest.mark.parametrize("T", [1000, 50])
def test_cosine_closed_form(T):
    s = NoiseSchedule.cosine(T)
    f = lambda u: math.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f(i + 1) / f(i), 0.999) for i in range(T)]
    assert_tables(s, betas, rtol=1e-10)
    # Where no beta is clipped, alpha_bar[t] is exactly f(t + 1) / f(0).
    clipped = [b >= 0.999 for b in betas]
    assert clipped[-1] and not any(clipped[:-1])
    ab = s.alphas_cumprod.numpy()[:-1]
    np.testing.assert_allclose(ab, [f(i + 1) / f(0) for i in range(T - 1)], rtol=1e-9)
    assert s.betas.max().item() == pytest.approx(0.999)


def test_against_diffusers_schedules():
    diffusers = pytest.importorskip("diffusers")
    lin = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    cos = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    # diffusers keeps float32 tables
    np.testing.assert_allclose(NoiseSchedule.linear(1000).betas.numpy(), lin.betas.double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(NoiseSchedule.cosine(1000).betas.numpy(), cos.betas.double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        NoiseSchedule.cosine(1000).alphas_cumprod.numpy(), cos.alphas_cumprod.double().numpy(), rtol=2e-5, atol=1e-9
    )


def test_linear_too_short_raises():
    # T = 10 scales beta_end to 2.0: not a valid schedule
    with pytest.raises(ValueError, match="num_timesteps"):
        NoiseSchedule.linear(10)


def test_custom_betas_hand_values():
    s = NoiseSchedule([0.1, 0.2, 0.5])
    assert_tables(s, [0.1, 0.2, 0.5])
    # a few numbers by hand
    assert s.alphas_cumprod.tolist() == pytest.approx([0.9, 0.72, 0.36])
    # beta_tilde_1 = 0.2 * (1 - 0.9) / (1 - 0.72)
    assert s.posterior_variance[1].item() == pytest.approx(0.2 * 0.1 / 0.28)
    assert s.posterior_variance[0].item() == 0.0
    assert s.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(0.2 * 0.1 / 0.28))
    # posterior at t = 0 is the point x0: coef1 = 1, coef2 = 0
    assert s.posterior_mean_coef1[0].item() == pytest.approx(1.0)
    assert s.posterior_mean_coef2[0].item() == pytest.approx(0.0, abs=1e-15)
    # tensor and numpy inputs give the same schedule
    s2 = NoiseSchedule(torch.tensor([0.1, 0.2, 0.5], dtype=torch.float32))
    np.testing.assert_allclose(s2.betas.numpy(), np.float32([0.1, 0.2, 0.5]).astype(np.float64))
    s3 = NoiseSchedule(np.array([0.1, 0.2, 0.5]))
    assert torch.equal(s3.betas, s.betas)


def test_single_step_schedule():
    s = NoiseSchedule([0.3])
    assert_tables(s, [0.3])


def test_table_cast():
    s = NoiseSchedule.linear(100)
    t = s.table("alphas_cumprod", device="cpu", dtype=torch.float32)
    assert t.dtype == torch.float32
    assert torch.equal(t, s.alphas_cumprod.float())
    assert s.alphas_cumprod.dtype == torch.float64  # the source is untouched


@pytest.mark.parametrize(
    "betas",
    [[0.1, 0.0, 0.2], [0.1, 1.0], [0.5, -0.1], [0.1, float("nan")], [float("inf")], [1.5], [], [[0.1, 0.2]]],
    ids=["zero", "one", "negative", "nan", "inf", "above_one", "empty", "2d"],
)
def test_invalid_betas_raise(betas):
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule(betas)


@pytest.mark.parametrize("ctor", [NoiseSchedule.linear, NoiseSchedule.cosine])
@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_invalid_num_timesteps_raise(ctor, bad):
    with pytest.raises(ValueError, match="num_timesteps"):
        ctor(bad)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("kept", [[0, 9, 99, 500, 999], list(range(0, 1000, 40)), [999], [3, 1, 2]])
def test_respace_reproduces_alphas_cumprod(kind, kept):
    base = getattr(NoiseSchedule, kind)(1000)
    r = base.respace(kept)
    ts = sorted(set(kept))
    assert r.num_timesteps == len(ts)
    assert r.timestep_map.dtype == torch.int64 and r.timestep_map.tolist() == ts
    # exact up to the float64 rounding of 1 - beta when beta is close to 1 (cosine's last steps:
    # relative error ~ 1e-16 / alpha)
    np.testing.assert_allclose(r.alphas_cumprod.numpy(), base.alphas_cumprod[ts].numpy(), rtol=1e-7)
    np.testing.assert_allclose(r.alphas_cumprod.numpy()[:-1], base.alphas_cumprod[ts[:-1]].numpy(), rtol=1e-12)
    # the respaced betas by the definition beta_i = 1 - ab[S_i] / ab[S_{i-1}]
    ab = [1.0] + [base.alphas_cumprod[i].item() for i in ts]
    np.testing.assert_allclose(r.betas.numpy(), [1 - ab[i + 1] / ab[i] for i in range(len(ts))], rtol=1e-12)
    # and the derived tables follow the respaced betas
    assert_tables(r, r.betas.tolist())


def test_respace_full_is_identity():
    base = NoiseSchedule.linear(100)
    r = base.respace(range(100))
    np.testing.assert_allclose(r.betas.numpy(), base.betas.numpy(), rtol=1e-10)


@pytest.mark.parametrize("bad", [[], [-1, 3], [0, 1000]])
def test_respace_invalid(bad):
    with pytest.raises(ValueError, match="timesteps"):
        NoiseSchedule.linear(1000).respace(bad)


def improved_diffusion_single_section(T, steps):
    """improved-diffusion's space_timesteps for one section (its accumulation loop, rewritten)."""
    stride = (T - 1) / (steps - 1)
    cur, out = 0.0, []
    for _ in range(steps):
        out.append(round(cur))
        cur += stride
    return out


@pytest.mark.parametrize("T", [1000, 4000, 100])
@pytest.mark.parametrize("steps", [2, 10, 20, 25, 50, 100])
def test_space_timesteps_matches_improved_diffusion(T, steps):
    got = space_timesteps(T, steps)
    assert got == improved_diffusion_single_section(T, steps)
    assert got[0] == 0 and got[-1] == T - 1 and len(set(got)) == steps
    gaps = np.diff(got)
    assert gaps.max() - gaps.min() <= 1


def test_space_timesteps_properties_all_counts():
    T = 60
    for steps in range(2, T + 1):
        got = space_timesteps(T, steps)
        assert len(got) == steps and got == sorted(set(got))
        assert got[0] == 0 and got[-1] == T - 1
        stride = (T - 1) / (steps - 1)
        assert all(abs(g - i * stride) <= 0.5 + 1e-9 for i, g in enumerate(got))
    assert space_timesteps(T, T) == list(range(T))
    assert space_timesteps(T, 1) == [T - 1]


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.0, True])
def test_space_timesteps_invalid(steps):
    with pytest.raises(ValueError, match="steps"):
        space_timesteps(1000, steps)

"""Samplers and the sampler_step op against independent references.

The main oracle is the exact denoiser of Gaussian data: for x0 ~ N(0, s^2 I) and
x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, E[eps | x_t] = sqrt(1 - ab) x_t / (ab s^2 + 1 - ab) (and the
matching x0 / v predictions). With it every sampler is a linear-Gaussian recursion, so the variance of
its samples (or, for deterministic samplers, the exact map x_T -> x_0) is computed here in float64 from
the schedule with the textbook formulas, independently of the coefficient tables, and also compared with
s^2 itself (the sampler's discretisation error).
"""
import math
from types import SimpleNamespace

import pytest
import torch

from fastddpm.ops import sampler_step, use_backend
from fastddpm.ops.sampler_step import sampler_step_reference
from fastddpm.diffusion import GaussianDiffusion
from fastddpm.samplers import DDIMSampler, DDPMSampler, DPMSolverSampler
from fastddpm.schedule import NoiseSchedule

T = 1000
S2 = 0.25  # data variance s^2 (s = 0.5)

try:
    from fastddpm.ops.philox import philox_normal

    HAVE_PHILOX = True
except ImportError:  # pragma: no cover - the Philox reference is written alongside the kernel
    HAVE_PHILOX = False
needs_philox = pytest.mark.skipif(not HAVE_PHILOX, reason="fastddpm.ops.philox not available yet")


def make_diffusion(schedule, prediction="eps", variance="fixed_small"):
    try:
        from fastddpm.diffusion import GaussianDiffusion
    except ImportError:  # stand-in: the samplers read only these attributes
        return SimpleNamespace(schedule=schedule, prediction=prediction, variance=variance,
                               num_timesteps=schedule.num_timesteps)
    return GaussianDiffusion(schedule, prediction=prediction, variance=variance)


@pytest.fixture(scope="module")
def linear():
    return NoiseSchedule.linear(T)


class GaussianDenoiser:
    """Exact prediction for x0 ~ N(0, s2 I); `v_channel` adds C constant learned-variance channels."""

    def __init__(self, schedule, prediction="eps", s2=S2, v_channel=None):
        self.ab = schedule.alphas_cumprod  # float64
        self.prediction, self.s2, self.v_channel = prediction, s2, v_channel
        self.calls = []

    def __call__(self, x, t):
        assert t.dtype == torch.int64 and t.shape == (x.shape[0],)
        self.calls.append(t)
        ab = self.ab.to(x.device)[t].reshape(-1, *([1] * (x.ndim - 1)))
        var = ab * self.s2 + 1 - ab
        xd = x.double()
        eps = (1 - ab).sqrt() * xd / var
        x0 = ab.sqrt() * self.s2 * xd / var
        out = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[self.prediction].to(x.dtype)
        if self.v_channel is not None:
            out = torch.cat([out, torch.full_like(out, self.v_channel)], 1)
        return out


# ---------------------------------------------------------------------------------------------
# independent float64 references of each sampler on Gaussian data (scalars: x = k x_T + noise)
def _pairs(ab_all, timesteps):
    """(ab_t, ab_prev) along the descending timesteps; ab_prev = 1 after the last one."""
    abs_ = [float(ab_all[t]) for t in timesteps]
    return list(zip(abs_, abs_[1:] + [1.0]))


def ddpm_variance(ab_all, timesteps, variance="fixed_small", v=0.0, s2=S2):
    """Variance of DDPM samples from x_T ~ N(0, 1) driven by the exact denoiser (no clipping)."""
    var = 1.0
    pairs = _pairs(ab_all, timesteps)
    for i, (ab, abp) in enumerate(pairs):
        beta = 1 - ab / abp
        g = math.sqrt(ab) * s2 / (ab * s2 + 1 - ab)  # x0_hat = g x_t
        a = math.sqrt(abp) * beta / (1 - ab) * g + math.sqrt(1 - beta) * (1 - abp) / (1 - ab)
        small = beta * (1 - abp) / (1 - ab)
        if i == len(pairs) - 1:
            noise = 0.0
        elif variance == "fixed_small":
            noise = small
        elif variance == "fixed_large":
            noise = beta
        else:
            f = (v + 1) / 2
            noise = math.exp(f * math.log(beta) + (1 - f) * math.log(small))
        var = a * a * var + noise
    return var


def ddim_map(ab_all, timesteps, eta, s2=S2):
    """(k, noise variance): DDIM sample = k x_T + N(0, noise variance), exact denoiser, no clipping."""
    k, nv = 1.0, 0.0
    for ab, abp in _pairs(ab_all, timesteps):
        var_t = ab * s2 + 1 - ab
        g = math.sqrt(ab) * s2 / var_t
        e = math.sqrt(1 - ab) / var_t
        sig2 = eta**2 * (1 - abp) / (1 - ab) * (1 - ab / abp)
        a = math.sqrt(abp) * g + math.sqrt(1 - abp - sig2) * e
        k, nv = a * k, a * a * nv + sig2
    return k, nv


def dpm_solver_map(ab_all, timesteps, s2=S2, first_order_final=None):
    """k with DPM-Solver++(2M) sample = k x_T (Lu et al. 2022, Algorithm 2, first order at the first
    step and, when timesteps end at t = 0 (first_order_final None), the last transition; the final
    evaluation returns x0-hat)."""
    if first_order_final is None:
        first_order_final = timesteps[-1] == 0
    ab = [float(ab_all[t]) for t in timesteps]
    alpha = [math.sqrt(a) for a in ab]
    sigma = [math.sqrt(1 - a) for a in ab]
    lam = [math.log(a / s) for a, s in zip(alpha, sigma)]
    k, d_prev = 1.0, None
    for i in range(len(ab)):
        d = math.sqrt(ab[i]) * s2 / (ab[i] * s2 + 1 - ab[i]) * k  # x0_hat coefficient
        if i == len(ab) - 1:
            return d
        h = lam[i + 1] - lam[i]
        if d_prev is None or (i == len(ab) - 2 and first_order_final):  # first order
            D = d
        else:
            r = (lam[i] - lam[i - 1]) / h
            D = (1 + 1 / (2 * r)) * d - 1 / (2 * r) * d_prev
        k = sigma[i + 1] / sigma[i] * k - alpha[i + 1] * math.expm1(-h) * D
        d_prev = d


def sde_dpm_solver_variance(ab_all, timesteps, s2=S2):
    """Variance of SDE-DPM-Solver++(2M) samples (Lu et al. 2022; diffusers' "sde-dpmsolver++", midpoint)
    from x_T ~ N(0, 1) with the exact denoiser: x is tracked as coefficients over the independent
    normals (x_T, z_1, ..., z_S), so the 2M term's correlation with the previous x0-hat is exact. The
    last transition is first order only when the timesteps end at t = 0."""
    ab = [float(ab_all[t]) for t in timesteps]
    alpha = [math.sqrt(a) for a in ab]
    sigma = [math.sqrt(1 - a) for a in ab]
    lam = [math.log(a / s) for a, s in zip(alpha, sigma)]
    n = len(ab)
    x = [1.0] + [0.0] * n
    d_prev = None
    for i in range(n):
        d = [math.sqrt(ab[i]) * s2 / (ab[i] * s2 + 1 - ab[i]) * c for c in x]  # x0-hat
        if i == n - 1:
            return sum(c * c for c in d)
        h = lam[i + 1] - lam[i]
        if d_prev is None or (i == n - 2 and timesteps[-1] == 0):
            D = d
        else:
            r = (lam[i] - lam[i - 1]) / h
            D = [(1 + 1 / (2 * r)) * a - 1 / (2 * r) * b for a, b in zip(d, d_prev)]
        x = [sigma[i + 1] / sigma[i] * math.exp(-h) * a - alpha[i + 1] * math.expm1(-2 * h) * b for a, b in zip(x, D)]
        x[1 + i] += sigma[i + 1] * math.sqrt(-math.expm1(-2 * h))  # the fresh noise z_{i+1}
        d_prev = d


def quadratic(n):
    """time-quadratic timesteps round((i/(n-1))^2 (T-1)), collisions pushed up to stay distinct."""
    out = []
    for i in range(n):
        v = round((i / (n - 1)) ** 2 * (T - 1))
        out.append(max(v, out[-1] + 1) if out else v)
    return desc(out)


def desc(ts):
    return sorted(ts, reverse=True)


def spaced(n):
    """improved-diffusion's evenly spaced timesteps, written out: round(i (T-1)/(n-1))."""
    return desc([round(i * (T - 1) / (n - 1)) for i in range(n)])


# Monte-Carlo: 32 x 1 x 16 x 16 = 8192 independent samples; the relative std of a variance estimate is
# sqrt(2/8192) = 1.6%, so 5 sigma = 8%.
MC_SHAPE = (32, 1, 16, 16)
MC_RTOL = 5 * math.sqrt(2 / 8192)


def mc_var(x):
    return x.double().pow(2).mean().item()  # mean 0 is known


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "steps,variance,prediction,v",
    [
        (None, "fixed_small", "eps", None),
        (100, "fixed_large", "x0", None),
        (50, "learned_range", "v", 0.3),
        (spaced(25), "fixed_small", "v", None),
    ],
    ids=["full-small-eps", "respaced100-large-x0", "respaced50-learned-v", "list25-small-v"],
)
def test_ddpm_gaussian_variance(linear, steps, variance, prediction, v):
    sampler = DDPMSampler(make_diffusion(linear, prediction, variance), steps=steps)
    ts = sampler.timesteps.tolist()
    assert ts == (list(range(T - 1, -1, -1)) if steps is None else spaced(steps) if isinstance(steps, int) else steps)
    model = GaussianDenoiser(linear, prediction, v_channel=v)
    x = sampler.sample(model, MC_SHAPE, generator=torch.Generator().manual_seed(0), clip_denoised=False)
    assert [int(t[0]) for t in model.calls] == ts  # model called with original timesteps, in order
    want = ddpm_variance(linear.alphas_cumprod, ts, variance, v or 0.0)
    assert mc_var(x) == pytest.approx(want, rel=MC_RTOL)
    if steps is None:  # the full chain's bias w.r.t. the data variance is small (short chains: not so)
        assert want == pytest.approx(S2, rel=0.02)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddim_eta0_is_the_closed_form_map(linear, prediction):
    sampler = DDIMSampler(make_diffusion(linear, prediction), steps=50, eta=0.0)
    assert sampler.timesteps.tolist() == spaced(50)
    g = torch.Generator().manual_seed(1)
    x = sampler.sample(GaussianDenoiser(linear, prediction), (4, 3, 8, 8), generator=g, clip_denoised=False)
    x_T = torch.randn((4, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    k, nv = ddim_map(linear.alphas_cumprod, sampler.timesteps.tolist(), 0.0)
    assert nv == 0.0
    # atol: x0-hat from eps at t = T-1 is sqrt(1/ab) ~ 156 times the fp32 rounding of x
    torch.testing.assert_close(x, (k * x_T.double()).float(), rtol=1e-4, atol=1e-4)
    # the probability-flow ODE preserves the data variance; 50 first-order steps undershoot by 11%
    assert k * k == pytest.approx(S2, rel=0.15) and k * k < S2


def test_ddim_eta1_gaussian_variance(linear):
    sampler = DDIMSampler(make_diffusion(linear), steps=50, eta=1.0)
    x = sampler.sample(GaussianDenoiser(linear), MC_SHAPE, generator=torch.Generator().manual_seed(2),
                       clip_denoised=False)
    k, nv = ddim_map(linear.alphas_cumprod, sampler.timesteps.tolist(), 1.0)
    assert mc_var(x) == pytest.approx(k * k + nv, rel=MC_RTOL)


@pytest.mark.parametrize("prediction,spacing", [("eps", "quadratic"), ("v", "quadratic"), ("eps", "trailing")])
def test_dpm_solver_is_the_closed_form_map(linear, prediction, spacing):
    sampler = DPMSolverSampler(make_diffusion(linear, prediction), steps=20, spacing=spacing)
    assert sampler.timesteps.tolist() == (quadratic(20) if spacing == "quadratic" else [round(T - i * T / 20) - 1 for i in range(20)])
    x = sampler.sample(GaussianDenoiser(linear, prediction), (4, 3, 8, 8),
                       generator=torch.Generator().manual_seed(3), clip_denoised=False)
    x_T = torch.randn((4, 3, 8, 8), generator=torch.Generator().manual_seed(3))
    k = dpm_solver_map(linear.alphas_cumprod, sampler.timesteps.tolist())
    torch.testing.assert_close(x, (k * x_T.double()).float(), rtol=1e-4, atol=1e-4)
    if spacing == "trailing":
        # x0-hat at t = 49 of the exact probability-flow solution: within 1.2%; with the last transition
        # at first order (the rule of timesteps that end at t = 0) 3.7%
        ab = linear.alphas_cumprod
        var = lambda t: float(ab[t]) * S2 + 1 - float(ab[t])  # noqa: E731
        exact = math.sqrt(float(ab[49])) * S2 / var(49) * math.sqrt(var(49) / var(999))
        first = dpm_solver_map(ab, sampler.timesteps.tolist(), first_order_final=True)
        assert abs(k / exact - 1) < 0.015 and abs(first / exact - 1) > 2 * abs(k / exact - 1)
        return
    # 20 steps of a second-order solver: the sample variance is the data's to a few % (4% here)
    assert k * k == pytest.approx(S2, rel=0.06)
    # and it beats first order (DDIM) on the same timesteps by far
    k_ddim, _ = ddim_map(linear.alphas_cumprod, quadratic(20), 0.0)
    assert abs(k * k - S2) < 0.5 * abs(k_ddim * k_ddim - S2)


@pytest.mark.parametrize("steps,spacing", [(20, "quadratic"), (100, "quadratic"), (15, "trailing")])
def test_sde_dpm_solver_gaussian_variance(linear, steps, spacing):
    sampler = DPMSolverSampler(make_diffusion(linear), steps=steps, stochastic=True, spacing=spacing)
    if spacing == "quadratic":
        assert sampler.timesteps.tolist() == quadratic(steps)
    x = sampler.sample(GaussianDenoiser(linear), MC_SHAPE, generator=torch.Generator().manual_seed(5),
                       clip_denoised=False)
    want = sde_dpm_solver_variance(linear.alphas_cumprod, sampler.timesteps.tolist())
    assert mc_var(x) == pytest.approx(want, rel=MC_RTOL)
    # the reverse SDE with the exact score ends at the data distribution: within 3% at 100 steps
    if steps == 100:
        assert want == pytest.approx(S2, rel=0.03)


def test_sde_dpm_solver_steps_match_diffusers(linear):
    """Every step before the last transition equals diffusers' DPMSolverMultistepScheduler with
    algorithm_type="sde-dpmsolver++" (midpoint, order 2) given the same model outputs and noise."""
    diffusers = pytest.importorskip("diffusers")
    sampler = DPMSolverSampler(make_diffusion(linear), steps=12, stochastic=True)
    ts = sampler.timesteps.tolist()
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T, trained_betas=linear.betas.numpy(), algorithm_type="sde-dpmsolver++",
        solver_order=2, prediction_type="epsilon", lower_order_final=False, final_sigmas_type="zero")
    sched.set_timesteps(timesteps=ts)
    assert [int(t) for t in sched.timesteps] == ts
    g = torch.Generator().manual_seed(6)
    x = torch.randn((2, 3, 4, 4), generator=g, dtype=torch.float64).float()
    ours, theirs = x.clone(), x.clone()
    model = GaussianDenoiser(linear)
    for i, t in enumerate(ts[:-2]):  # diffusers ends on its own first-order rule; compare until then
        noise = torch.randn(x.shape, generator=g)
        ours = sampler.step(model(ours, torch.full((2,), t)), t, ours, noise=noise, clip_denoised=False)
        theirs = sched.step(model(theirs, torch.full((2,), t)), t, theirs, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4, msg=f"step {i} (t={t})")
        theirs = ours.clone()  # both continue from the same state: each step is compared on its own


def test_dpm_solver_single_and_two_steps(linear):
    """steps=1 returns x0-hat at T-1; steps=2: one first-order step to t=0, then x0-hat."""
    diff = make_diffusion(linear)
    for n in (1, 2):
        sampler = DPMSolverSampler(diff, steps=n)
        x = sampler.sample(GaussianDenoiser(linear), (2, 1, 4, 4), generator=torch.Generator().manual_seed(4),
                           clip_denoised=False)
        x_T = torch.randn((2, 1, 4, 4), generator=torch.Generator().manual_seed(4))
        assert sampler.timesteps.tolist() == [T - 1, 0][:n]
        k = dpm_solver_map(linear.alphas_cumprod, sampler.timesteps.tolist())
        torch.testing.assert_close(x, (k * x_T.double()).float(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
def test_step_loop_equals_sample(linear):
    """sample(generator=g) is exactly a loop of step(..., generator=g) (same noise order)."""
    sampler = DDPMSampler(make_diffusion(linear, "eps", "fixed_large"), steps=30)
    model = GaussianDenoiser(linear)
    shape = (3, 2, 4, 4)
    ref = sampler.sample(model, shape, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g)
    for t in sampler.timesteps.tolist():
        x = sampler.step(model(x, torch.full((3,), t)), t, x, generator=g)
    torch.testing.assert_close(x, ref, rtol=0, atol=0)


def test_dpm_solver_step_state(linear):
    sampler = DPMSolverSampler(make_diffusion(linear), steps=6)
    model = GaussianDenoiser(linear)
    shape = (2, 1, 4, 4)
    ref = sampler.sample(model, shape, generator=torch.Generator().manual_seed(6), clip_denoised=False)
    ts = sampler.timesteps.tolist()
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    x = x_T
    for t in ts:
        x = sampler.step(model(x, torch.full((2,), t)), t, x, clip_denoised=False)
    torch.testing.assert_close(x, ref, rtol=0, atol=0)
    # explicit x0_prev instead of the kept state
    sampler.reset()
    x, x0 = sampler.step(model(x_T, torch.full((2,), ts[0])), ts[0], x_T, clip_denoised=False, return_x0=True)
    sampler.reset()
    x2 = sampler.step(model(x, torch.full((2,), ts[1])), ts[1], x, clip_denoised=False, x0_prev=x0)
    sampler.reset()
    sampler.step(model(x_T, torch.full((2,), ts[0])), ts[0], x_T, clip_denoised=False)
    x2_state = sampler.step(model(x, torch.full((2,), ts[1])), ts[1], x, clip_denoised=False)
    torch.testing.assert_close(x2, x2_state, rtol=0, atol=0)
    # out of order without x0_prev: ValueError
    sampler.reset()
    with pytest.raises(ValueError, match="x0_prev"):
        sampler.step(model(x, torch.full((2,), ts[2])), ts[2], x)
    sampler.step(model(x_T, torch.full((2,), ts[0])), ts[0], x_T)
    with pytest.raises(ValueError, match="x0_prev"):
        sampler.step(model(x, torch.full((2,), ts[2])), ts[2], x)


def test_ddim_eta1_steps_match_ddpm_fixed_small_variance(linear):
    """DDIM's sigma at eta = 1 is DDPM's fixed_small sigma (same table column)."""
    diff = make_diffusion(linear)
    a, b = DDIMSampler(diff, steps=40, eta=1.0), DDPMSampler(diff, steps=40)
    torch.testing.assert_close(a.coefs[:, 6], b.coefs[:, 6], rtol=1e-12, atol=0)
    assert a.coefs[-1, 6] == 0 and b.coefs[-1, 6] == 0  # no noise at the final step


# ---------------------------------------------------------------------------------------------
@needs_philox
def test_seed_reproducible_and_batch_independent(linear):
    sampler = DDPMSampler(make_diffusion(linear, "eps", "fixed_large"), steps=20)
    model = GaussianDenoiser(linear)
    a = sampler.sample(model, (8, 3, 4, 4), seed=7)
    b = sampler.sample(model, (8, 3, 4, 4), seed=7)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = sampler.sample(model, (4, 3, 4, 4), seed=7)
    torch.testing.assert_close(c, a[:4], rtol=0, atol=0)
    d = sampler.sample(model, (4, 3, 4, 4), seed=7, image_offset=4)
    torch.testing.assert_close(d, a[4:], rtol=0, atol=0)
    e = sampler.sample(model, (8, 3, 4, 4), seed=8)
    assert (e - a).abs().min() > 0  # a different seed changes every element
    assert sampler.sample(model, (2, 3, 4, 4)).equal(sampler.sample(model, (2, 3, 4, 4), seed=0))  # default seed 0


@needs_philox
def test_seed_x_T_is_philox_stream_1(linear):
    """A one-step DDIM with an x0-model returning x_t outputs x_T itself."""
    sampler = DDIMSampler(make_diffusion(linear, "x0"), steps=[T - 1])
    x = sampler.sample(lambda x, t: x, (3, 2, 4, 4), seed=11, clip_denoised=False)
    seed = torch.tensor([11])
    want = philox_normal(seed, (3, 2, 4, 4), torch.zeros(1, dtype=torch.int64), stream=1)
    torch.testing.assert_close(x, want, rtol=0, atol=0)
    other = philox_normal(seed, (3, 2, 4, 4), torch.zeros(1, dtype=torch.int64), stream=0)
    assert not torch.equal(x, other)


@needs_philox
def test_seeded_noise_is_gaussian_with_the_right_variance(linear):
    sampler = DDPMSampler(make_diffusion(linear, "eps", "fixed_small"), steps=50)
    x = sampler.sample(GaussianDenoiser(linear), MC_SHAPE, seed=3, clip_denoised=False)
    want = ddpm_variance(linear.alphas_cumprod, sampler.timesteps.tolist(), "fixed_small")
    assert mc_var(x) == pytest.approx(want, rel=MC_RTOL)


def test_generator_reproducible(linear):
    sampler = DDIMSampler(make_diffusion(linear), steps=10, eta=0.5)
    model = GaussianDenoiser(linear)
    a = sampler.sample(model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(9))
    b = sampler.sample(model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
@pytest.mark.parametrize("kind", ["ddpm", "ddim", "dpm", "dpm_sde"])
def test_low_precision_sampling_close_to_fp32(linear, kind, dtype, tol):
    """bf16/fp16 x (fp32 step math): the samples stay within `tol` (max abs) of the fp32 run.

    Per step the state is rounded to the dtype (bf16: 2^-9 relative, fp16: 2^-12); over 50 steps of a
    contracting map that accumulates to a few 1e-2 (bf16) / 1e-3 (fp16) at most on O(1) values.
    """
    diff = make_diffusion(linear)
    sampler = {"ddpm": lambda: DDPMSampler(diff, steps=50), "ddim": lambda: DDIMSampler(diff, steps=50, eta=0.0),
               "dpm": lambda: DPMSolverSampler(diff, steps=20),
               "dpm_sde": lambda: DPMSolverSampler(diff, steps=20, stochastic=True)}[kind]()
    model = GaussianDenoiser(linear)
    ref = sampler.sample(model, (4, 3, 8, 8), generator=torch.Generator().manual_seed(10))
    low = sampler.sample(model, (4, 3, 8, 8), generator=torch.Generator().manual_seed(10), dtype=dtype)
    assert low.dtype == dtype
    assert (low.float() - ref).abs().max().item() <= tol


def test_model_kwargs_device_and_diffusers_like_output(linear):
    sampler = DDIMSampler(make_diffusion(linear), steps=3)
    seen = []

    def model(x, t, label=None):
        seen.append(label)
        return SimpleNamespace(sample=torch.zeros_like(x))  # an object with .sample, as UNet2DModel

    x = sampler.sample(model, (2, 1, 2, 2), generator=torch.Generator().manual_seed(0), model_kwargs={"label": 3},
                       progress=True)
    assert seen == [3, 3, 3] and x.shape == (2, 1, 2, 2) and x.device.type == "cpu"


# ---------------------------------------------------------------------------------------------
def test_bad_input(linear):
    diff = make_diffusion(linear)
    for bad in (0, -1, T + 1, 2.5, True, [5, 10], [10, 10, 3], [T, 3], [5, -1], [], "ten"):
        with pytest.raises(ValueError, match="steps"):
            DDPMSampler(diff, steps=bad)
    with pytest.raises(ValueError, match="steps"):
        DDIMSampler(diff, steps=T + 1)
    with pytest.raises(ValueError, match="steps"):
        DPMSolverSampler(diff, steps=0)
    for eta in (-0.1, 1.5, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="eta"):
            DDIMSampler(diff, steps=10, eta=eta)
    with pytest.raises(ValueError, match="prediction"):
        DDPMSampler(SimpleNamespace(schedule=linear, prediction="score", variance="fixed_small", num_timesteps=T))
    with pytest.raises(ValueError, match="variance"):
        DDPMSampler(SimpleNamespace(schedule=linear, prediction="eps", variance="learned", num_timesteps=T))
    with pytest.raises(ValueError, match="diffusion"):
        DDPMSampler(object())

    s = DDPMSampler(diff, steps=10)
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="timesteps"):
        s.step(torch.zeros_like(x), 500, x)  # not one of the 10 kept timesteps
    with pytest.raises(ValueError, match="t must"):
        s.step(torch.zeros_like(x), 1.5, x)
    with pytest.raises(ValueError, match="one timestep"):
        s.step(torch.zeros_like(x), torch.tensor([999, 0]), x)
    with pytest.raises(ValueError, match="model_output"):
        s.step(torch.zeros(2, 6, 4, 4), 999, x)  # 2C channels without learned_range
    with pytest.raises(ValueError, match="model_output"):
        DDPMSampler(make_diffusion(linear, variance="learned_range"), steps=10).step(torch.zeros_like(x), 999, x)
    with pytest.raises(ValueError, match="noise"):
        s.step(torch.zeros_like(x), 999, x, noise=torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="seed or generator"):
        s.sample(GaussianDenoiser(linear), (1, 1, 2, 2), seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="seed"):
        s.sample(GaussianDenoiser(linear), (1, 1, 2, 2), seed=-1)
    with pytest.raises(ValueError, match="shape"):
        s.sample(GaussianDenoiser(linear), (4,), generator=torch.Generator())
    with pytest.raises(ValueError, match="model_output"):
        s.sample(lambda x, t: x[:, :1], (1, 2, 2, 2), generator=torch.Generator())
    # a tensor t holding one value is accepted
    out = s.step(torch.zeros_like(x), torch.full((2,), 0), x)
    assert out.shape == x.shape


def test_learned_range_model_with_ddim_ignores_variance_channels(linear):
    a = DDIMSampler(make_diffusion(linear, variance="learned_range"), steps=10)
    b = DDIMSampler(make_diffusion(linear), steps=10)
    g = lambda: torch.Generator().manual_seed(12)  # noqa: E731
    xa = a.sample(GaussianDenoiser(linear, v_channel=0.7), (2, 3, 4, 4), generator=g())
    xb = b.sample(GaussianDenoiser(linear), (2, 3, 4, 4), generator=g())
    torch.testing.assert_close(xa, xb, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- the op
def _op_inputs(dtype=torch.float32, learned=False, n=3, c=2, hw=(5, 3), steps=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, *hw, generator=g).to(dtype)
    m = torch.randn(n, 2 * c if learned else c, *hw, generator=g)
    if learned:
        m[:, c:] = m[:, c:].tanh()
    m = m.to(dtype)
    coefs = torch.randn(steps, 9, generator=g)
    coefs[:, 6] = coefs[:, 6].abs() + (1.0 if learned else 0.0)
    coefs[:, 7] = -coefs[:, 7].abs() - 3
    coefs[:, 8] = -coefs[:, 8].abs() - 1
    x0p = torch.randn(n, c, *hw, generator=g).to(dtype)
    z = torch.randn(n, c, *hw, generator=g)
    return x, m, coefs, x0p, z


def _op_float64(x, m, coefs, row, x0p, z, clip, learned):
    """The op's formula evaluated in float64 with named columns (independent of the implementation)."""
    A, B, P, Q, R, P2, SIG, LMIN, LMAX = coefs[row].double().tolist()
    c = x.shape[1]
    xd, md = x.double(), m[:, :c].double()
    x0 = A * xd + B * md
    if clip:
        x0 = x0.clamp(-1, 1)
    mean = P * x0 + Q * xd + R * md
    if x0p is not None:
        mean = mean + P2 * x0p.double()
    sigma = SIG
    if learned:
        f = (m[:, c:].double() + 1) / 2
        sigma = SIG * torch.exp(0.5 * (f * LMAX + (1 - f) * LMIN))
    if z is not None:
        mean = mean + sigma * z.double()
    return mean, x0


@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("with_x0p", [False, True])
def test_op_reference_matches_float64_formula(learned, clip, with_x0p):
    x, m, coefs, x0p, z = _op_inputs(learned=learned)
    x0p = x0p if with_x0p else None
    with use_backend("reference"):
        for row in range(coefs.shape[0]):
            out, x0 = sampler_step(x, m, coefs, torch.tensor([row]), x0p, z, None, 0, clip, learned)
            want, want_x0 = _op_float64(x, m, coefs, row, x0p, z, clip, learned)
            torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(x0.double(), want_x0, rtol=1e-5, atol=1e-5)
    # without noise and seed the sigma term is absent
    out, _ = sampler_step(x, m, coefs, torch.tensor([1]), x0p, None, None, 0, clip, learned)
    want, _ = _op_float64(x, m, coefs, 1, x0p, None, clip, learned)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_op_low_precision(dtype):
    """Low-precision in/out, fp32 math: error within 2 ulps of the output dtype of the float64 result."""
    x, m, coefs, x0p, z = _op_inputs(dtype=dtype)
    out, x0 = sampler_step(x, m, coefs, torch.tensor([2]), x0p, z.to(dtype))
    assert out.dtype == dtype and x0.dtype == dtype
    want, _ = _op_float64(x, m, coefs, 2, x0p, z.to(dtype), True, False)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    assert ((out.double() - want).abs() <= 2 * ulp * want.abs().clamp_min(1.0)).all()


@needs_philox
def test_op_seeded_noise_is_the_philox_stream():
    x, m, coefs, _, _ = _op_inputs()
    seed, step = torch.tensor([5]), torch.tensor([3])
    out, _ = sampler_step(x, m, coefs, step, None, None, seed, 7, False, False)
    z = philox_normal(seed, tuple(x.shape), step, stream=0, image_offset=7)
    want, _ = sampler_step(x, m, coefs, step, None, z, None, 0, False, False)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_op_opcheck_and_fake():
    x, m, coefs, x0p, z = _op_inputs(learned=True)
    torch.library.opcheck(torch.ops.fastddpm.sampler_step.default,
                          (x, m, coefs, torch.tensor([1]), x0p, z, None, 0, True, True))
    from torch._subclasses.fake_tensor import FakeTensorMode

    xb, mb, step0 = x.to(torch.bfloat16), m.to(torch.bfloat16), torch.tensor([0])
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(xb)
        fm = mode.from_tensor(mb)
        a, b = sampler_step(fx, fm, mode.from_tensor(coefs), mode.from_tensor(step0), None, None, None, 0, True, True)
        assert a.shape == x.shape and a.dtype == torch.bfloat16 and b.shape == x.shape


def test_op_bad_input():
    x, m, coefs, x0p, z = _op_inputs()
    step = torch.tensor([0])
    with pytest.raises(ValueError, match="model_output"):
        sampler_step(x, m, coefs, step, learned_range=True)
    with pytest.raises(ValueError, match="coefs"):
        sampler_step(x, m, coefs.double(), step)
    with pytest.raises(ValueError, match="coefs"):
        sampler_step(x, m, coefs[:, :8].contiguous(), step)
    with pytest.raises(ValueError, match="step"):
        sampler_step(x, m, coefs, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="step"):
        sampler_step(x, m, coefs, torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match="x0_prev"):
        sampler_step(x, m, coefs, step, x0p[:1])
    with pytest.raises(ValueError, match="noise"):
        sampler_step(x, m, coefs, step, None, z[..., :2])
    with pytest.raises(ValueError, match="seed"):
        sampler_step(x, m, coefs, step, None, None, torch.tensor([1.0]))


def test_reference_function_is_the_op():
    x, m, coefs, x0p, z = _op_inputs(learned=True)
    a = sampler_step(x, m, coefs, torch.tensor([3]), x0p, z, None, 0, True, True)
    b = sampler_step_reference(x, m, coefs, torch.tensor([3]), x0p, z, None, 0, True, True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- Triton
@pytest.mark.skipif(not __import__("fastddpm.ops.backend", fromlist=["x"]).triton_available(), reason="triton not installed")
@pytest.mark.parametrize("how", ["seed", "generator"])
def test_triton_backend_samples_match_reference(linear, how, triton_on_cpu):
    """Whole loops through the Triton kernel (interpreter on CPU) equal the reference path: the
    kernel's in-kernel Philox noise (seed) and given noise (generator), every sampler kind."""
    cases = [
        (DDPMSampler(make_diffusion(linear, "eps", "learned_range"), steps=5),
         lambda x, t: torch.cat([torch.tanh(0.7 * x + 0.1), torch.tanh(x)], 1)),
        (DDIMSampler(make_diffusion(linear, "v"), steps=4, eta=0.5), lambda x, t: torch.tanh(0.7 * x)),
        (DPMSolverSampler(make_diffusion(linear, "x0"), steps=4), lambda x, t: torch.tanh(0.9 * x)),
    ]
    for sampler, model in cases:
        def run():
            kw = {"seed": 5} if how == "seed" else {"generator": torch.Generator().manual_seed(5)}
            return sampler.sample(model, (2, 3, 5, 4), **kw)

        ref = run()
        with use_backend("triton"):
            tri = run()
        # fp32 elementwise math without FMA contraction in the kernel; Philox normals to float rounding
        torch.testing.assert_close(tri, ref, rtol=1e-5, atol=1e-5)


def test_ddim_per_step_predictions_take_each_rows_table():
    sched = NoiseSchedule.cosine(100)
    eps, x0, v = (GaussianDiffusion(sched, prediction=p) for p in ("eps", "x0", "v"))
    steps = [99, 60, 30, 5]
    mixed = DDIMSampler(eps, steps=steps, predictions=["x0", "eps", "v", "eps"])
    for s, d in enumerate((x0, eps, v, eps)):
        torch.testing.assert_close(mixed.coefs[s], DDIMSampler(d, steps=steps).coefs[s], rtol=0, atol=0)
    assert mixed.coefs.dtype == torch.float64
    # the exact denoiser of Gaussian data answers in every parameterisation: mixing them maps x_T the same way
    from fastddpm.samplers import gaussian_gain

    assert gaussian_gain(mixed, 0.3) == pytest.approx(gaussian_gain(DDIMSampler(eps, steps=steps), 0.3), rel=1e-12)
    with pytest.raises(ValueError, match="predictions must be one of"):
        DDIMSampler(eps, steps=steps, predictions=["x0"])

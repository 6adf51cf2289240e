"""DPM-Solver++(3M) and UniPC against independent references.

1. diffusers: step() with diffusers' own timesteps equals DPMSolverMultistepScheduler(solver_order=3)
   ("dpmsolver++" and "sde-dpmsolver++", third_order="diffusers") and UniPCMultistepScheduler (bh1 / bh2,
   orders 1-3, with and without the corrector) over whole loops, every prediction type.
2. The exact denoiser of Gaussian data (tests/test_samplers.py): each solver is then a linear map
   x_T -> k x_T, and k is computed here in float64 by scalar re-implementations written from the papers'
   update rules in their unfolded form (UniPC keeps its corrected state and its model outputs as
   diffusers does), independently of the coefficient tables, which fold corrector and predictor into one
   row. sample() must produce k x_T, and the float64 tables must give the same k.
3. Order of convergence: the error of k against the exact probability-flow solution falls at the
   solver's order as the steps double (a fine cosine schedule, T = 10000, so that integer timesteps do
   not limit the refinement; steps uniform in lambda).
4. FastSampler (CPU path) equals sample(), and the Triton kernel (interpreter) equals the reference.
"""
import math

import pytest
import torch

from fastddpm.graphs import FastSampler
from fastddpm.ops import use_backend
from fastddpm.samplers import (DPMSolver3MSampler, DPMSolverSampler, UniPCSampler, gaussian_gain, make_sampler,
                               quadratic_timesteps)
from fastddpm.schedule import NoiseSchedule
from test_samplers import S2, GaussianDenoiser, ddim_map, make_diffusion, mc_var

T = 1000


@pytest.fixture(scope="module")
def linear():
    return NoiseSchedule.linear(T)


# ------------------------------------------------------------------------------------------ references
def _alpha_sigma_lambda(ab_all, timesteps):
    ab = [float(ab_all[t]) for t in timesteps]
    alpha = [math.sqrt(a) for a in ab]
    sigma = [math.sqrt(1 - a) for a in ab]
    return ab, alpha, sigma, [math.log(a / s) for a, s in zip(alpha, sigma)]


def _x0_gain(ab, s2):
    """x0-hat = gain * x_t for the exact denoiser of N(0, s2) data."""
    return math.sqrt(ab) * s2 / (ab * s2 + 1 - ab)


def dpm_3m_map(ab_all, timesteps, s2=S2, taylor=True, lower_order_final=True):
    """k with DPM-Solver++(3M) sample = k x_T: warm-up orders 1, 2, then 3 (the multistep formulas of
    Lu et al. 2022 with D1 ~ h x0' and D2 ~ h^2 x0'' (taylor) or D2 ~ h^2 x0'' / 2 (diffusers)); the
    last transition second order with lower_order_final; the final evaluation returns x0-hat."""
    ab, alpha, sigma, lam = _alpha_sigma_lambda(ab_all, timesteps)
    n = len(ab)
    x, ms = 1.0, []
    for i in range(n):
        ms.append(_x0_gain(ab[i], s2) * x)
        if i == n - 1:
            return ms[-1]
        h = lam[i + 1] - lam[i]
        order = min(3, i + 1, n - i if lower_order_final else 3)
        m0 = ms[-1]
        if order == 1:
            d = (1 - math.exp(-h)) * m0
        elif order == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            d = (1 - math.exp(-h)) * (m0 + 0.5 * (m0 - ms[-2]) / r0)
        else:
            m1, m2 = ms[-2], ms[-3]
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            d10, d11 = (m0 - m1) / r0, (m1 - m2) / r1
            d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
            d2 = (2.0 if taylor else 1.0) * (d10 - d11) / (r0 + r1)
            e = math.exp(-h)
            d = (1 - e) * m0 + ((e - 1) / h + 1) * d1 - ((e - 1 + h) / h**2 - 0.5) * d2
        x = sigma[i + 1] / sigma[i] * x + alpha[i + 1] * d


def unipc_map(ab_all, timesteps, s2=S2, order=3, variant="bh2", lower_order_final=True, corrector=True):
    """k with UniPC sample = k x_T (Zhao et al. 2023, B(h) form, data prediction), written as the paper's
    predictor-corrector loop: the corrected state x^c and the model outputs (x0-hats of the uncorrected
    states) are kept separately; UniC at step i uses the order of the predictor that made x_i."""
    ab, alpha, sigma, lam = _alpha_sigma_lambda(ab_all, timesteps)
    n = len(ab)

    def coefficients(i0, p):
        """rks, B(h), h phi_1 and the (R, b) system of the transition i0 -> i0 + 1 at order p."""
        h = lam[i0 + 1] - lam[i0]
        hh = -h
        rks = [(lam[i0 - k] - lam[i0]) / h for k in range(1, p)] + [1.0]
        bh = hh if variant == "bh1" else math.expm1(hh)
        g, fact, b = math.expm1(hh) / hh - 1, 1.0, []
        for k in range(1, p + 1):
            b.append(g * fact / bh)
            fact *= k + 1
            g = g / hh - 1 / fact
        R = torch.tensor([[r ** k for r in rks] for k in range(p)], dtype=torch.float64)
        return rks, bh, math.expm1(hh), R, torch.tensor(b, dtype=torch.float64)

    x, ms, last, prev_order = 1.0, [], None, None
    for i in range(n):
        m = _x0_gain(ab[i], s2) * x  # from the uncorrected x the model saw
        if i > 0 and corrector:  # UniC-p, p = the previous predictor's order
            rks, bh, hphi, R, b = coefficients(i - 1, prev_order)
            rho = [0.5] if prev_order == 1 else torch.linalg.solve(R, b).tolist()
            m0 = ms[-1]
            res = sum(rho[k] * (ms[-2 - k] - m0) / rks[k] for k in range(prev_order - 1)) + rho[-1] * (m - m0)
            x = sigma[i] / sigma[i - 1] * last - alpha[i] * hphi * m0 - alpha[i] * bh * res
        ms.append(m)
        if i == n - 1:
            return m  # the predictor to sigma = 0 at order 1: x0-hat
        p = min(order, i + 1, n - i if lower_order_final else order)
        rks, bh, hphi, R, b = coefficients(i, p)
        rho = [] if p == 1 else [0.5] if p == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        m0 = ms[-1]
        res = sum(rho[k] * (ms[-2 - k] - m0) / rks[k] for k in range(p - 1))
        last = x
        x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * hphi * m0 - alpha[i + 1] * bh * res
        prev_order = p


def table_map(sampler, s2=S2):
    """k from the sampler's float64 coefficient table (what the fused op computes, in float64)."""
    return gaussian_gain(sampler, s2)


def exact_map(sampler, s2=S2):
    """The exact probability-flow map to x0-hat at timesteps[-1]: x_t = sqrt(var_t / var_T) x_T."""
    ab_all = sampler.schedule.alphas_cumprod
    t0, t1 = int(sampler.timesteps[0]), int(sampler.timesteps[-1])
    var = lambda t: float(ab_all[t]) * s2 + 1 - float(ab_all[t])  # noqa: E731
    return _x0_gain(float(ab_all[t1]), s2) * math.sqrt(var(t1) / var(t0))


# ------------------------------------------------------------------------------ closed-form Gaussian maps
UNIPC_CASES = [
    dict(order=3, variant="bh2"), dict(order=3, variant="bh1"), dict(order=2, variant="bh2"),
    dict(order=1, variant="bh1"), dict(order=3, variant="bh2", corrector=False),
    dict(order=3, variant="bh2", lower_order_final=False),
]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 12])
@pytest.mark.parametrize("kw", UNIPC_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_unipc_table_is_the_unfolded_predictor_corrector(linear, kw, n):
    """Corrector and predictor folded into one table row give the paper's predictor-corrector map."""
    sampler = UniPCSampler(make_diffusion(linear), steps=n, **kw)
    assert sampler.timesteps.tolist() == quadratic_timesteps(T, n)
    want = unipc_map(linear.alphas_cumprod, sampler.timesteps.tolist(), **kw)
    assert table_map(sampler) == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 12, 20])
@pytest.mark.parametrize("kw", [dict(), dict(third_order="diffusers"), dict(lower_order_final=False)],
                         ids=["taylor", "diffusers", "no-lower-order-final"])
def test_dpm_solver_3m_table_is_the_multistep_formula(linear, kw, n):
    sampler = DPMSolver3MSampler(make_diffusion(linear), steps=n, **kw)
    want = dpm_3m_map(linear.alphas_cumprod, sampler.timesteps.tolist(), taylor=kw.get("third_order") != "diffusers",
                      lower_order_final=kw.get("lower_order_final", True))
    assert table_map(sampler) == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("name", ["dpm++3m", "unipc"])
def test_sample_is_the_closed_form_map(linear, name, prediction):
    """The whole loop (fused op, fp32, every prediction type) is k x_T with the independent k."""
    sampler = make_sampler(name, make_diffusion(linear, prediction), steps=10, spacing="quadratic")
    x = sampler.sample(GaussianDenoiser(linear, prediction), (4, 3, 8, 8), generator=torch.Generator().manual_seed(3),
                       clip_denoised=False)
    x_T = torch.randn((4, 3, 8, 8), generator=torch.Generator().manual_seed(3))
    ts = sampler.timesteps.tolist()
    k = dpm_3m_map(linear.alphas_cumprod, ts) if name == "dpm++3m" else unipc_map(linear.alphas_cumprod, ts)
    torch.testing.assert_close(x, (k * x_T.double()).float(), rtol=1e-4, atol=1e-4)
    assert gaussian_gain(sampler, S2) == pytest.approx(k, rel=1e-10)  # the float64 table, any prediction
    # 10 model calls on the time-quadratic steps: the sample variance is 0.291 (3M) / 0.281 (UniPC)
    # where the data's is 0.25; DDIM on the same timesteps gives 0.173
    k_ddim, _ = ddim_map(linear.alphas_cumprod, ts, 0.0)
    assert abs(k * k - S2) < 0.6 * abs(k_ddim * k_ddim - S2)


# ------------------------------------------------------------------------------------ order of convergence
@pytest.fixture(scope="module")
def fine():
    """A cosine schedule with T = 10000 and steps uniform in lambda in [-4, 4]."""
    sched = NoiseSchedule.cosine(10000)
    ab = sched.alphas_cumprod
    lam = (ab.sqrt() / (1 - ab).sqrt()).log()

    def timesteps(n):
        return sorted({int((lam - v).abs().argmin()) for v in torch.linspace(-4.0, 4.0, n).tolist()}, reverse=True)

    return make_diffusion(sched), timesteps


def _rates(make, timesteps, counts=(20, 40, 80, 160)):
    errs = []
    for n in counts:
        sampler = make(timesteps(n))
        errs.append(abs(table_map(sampler) / exact_map(sampler) - 1))
    return [math.log2(a / b) for a, b in zip(errs, errs[1:])], errs


@pytest.mark.parametrize("kw,order", [
    (dict(order=1), 2), (dict(order=2), 3), (dict(order=3), 3.3), (dict(order=3, variant="bh1"), 3.3),
    (dict(order=3, corrector=False), 3),
], ids=["unipc1", "unipc2", "unipc3-bh2", "unipc3-bh1", "unip3"])
def test_unipc_order_of_convergence(fine, kw, order):
    """UniC raises UniP-p to order p + 1 (measured: UniPC-1 2.0, UniPC-2 3.0, UniPC-3 3.6-4.4, UniP-3 alone
    4.0 here, where the Gaussian problem is kinder to third-order extrapolation than theory)."""
    diffusion, timesteps = fine
    rates, errs = _rates(lambda ts: UniPCSampler(diffusion, steps=ts, **kw), timesteps)
    assert min(rates[-2:]) >= order - 0.3, (rates, errs)


def test_dpm_solver_3m_order_of_convergence(fine):
    """third_order="taylor" converges at third order (measured 4.0 here); diffusers' D2 (half the
    Taylor term) at second order only (2.2, 2.1), like 2M."""
    diffusion, timesteps = fine
    rates, errs = _rates(lambda ts: DPMSolver3MSampler(diffusion, steps=ts), timesteps)
    assert min(rates[-2:]) >= 2.7, (rates, errs)
    rates_d, errs_d = _rates(lambda ts: DPMSolver3MSampler(diffusion, steps=ts, third_order="diffusers"), timesteps)
    assert max(rates_d[-2:]) < 2.4 and min(rates_d[-2:]) > 1.7, (rates_d, errs_d)
    rates_2m, _ = _rates(lambda ts: DPMSolverSampler(diffusion, steps=ts), timesteps)
    assert max(rates_2m[-2:]) < 2.4 and errs[-1] < 0.01 * errs_d[-1]


def _sde_variance(sampler, s2=S2):
    """Exact variance of a stochastic multistep sampler's output (x_T and every step's z independent
    standard normals), from its float64 table: x and the history as coefficient vectors."""
    ab_all = sampler.schedule.alphas_cumprod
    n = sampler.num_steps
    x = [1.0] + [0.0] * n
    hist = [[0.0] * (n + 1)] * 3
    for s, (row, t) in enumerate(zip(sampler.coefs.tolist(), sampler.timesteps.tolist())):
        A, B, P, Q, R, P2, sig, _lmin, _lmax, P3, P4 = row
        ab = float(ab_all[t])
        g = math.sqrt(1 - ab) / (ab * s2 + 1 - ab)
        x0 = [(A + B * g) * v for v in x]
        x = [P * a + (Q + R * g) * v + P2 * h1 + P3 * h2 + P4 * h3 for a, v, h1, h2, h3 in zip(x0, x, *hist)]
        x[1 + s] += sig
        hist = [x0] + hist[:2]
    return sum(v * v for v in x)


def test_sde_dpm_solver_3m_weak_order(fine):
    """SDE-DPM-Solver++(3M): the variance of its samples (exact, from the table) approaches the exact
    reverse SDE's at second order (as SDE-2M: the x0-hats along a Brownian path are not smooth enough
    for more); diffusers' third-order SDE coefficients (-1/2 where the Taylor term needs +1/2) only at
    first order (measured: taylor 2.3, 2.1; diffusers 1.2, 1.0)."""
    diffusion, timesteps = fine
    ab = diffusion.schedule.alphas_cumprod

    def rates(**kw):
        errs = []
        for n in (20, 40, 80, 160):
            sampler = DPMSolver3MSampler(diffusion, steps=timesteps(n), stochastic=True, **kw)
            a = float(ab[int(sampler.timesteps[-1])])
            want = _x0_gain(a, S2) ** 2 * (a * S2 + 1 - a)  # x0-hat of the exact marginal at timesteps[-1]
            errs.append(abs(_sde_variance(sampler) / want - 1))
        return [math.log2(a / b) for a, b in zip(errs, errs[1:])]

    assert min(rates()[-2:]) >= 1.8
    assert max(rates(third_order="diffusers")[-2:]) < 1.4


def test_sde_dpm_solver_3m_monte_carlo_variance(linear):
    """sample() with the Philox noise has the variance the table predicts (8192 samples, 5 sigma)."""
    sampler = make_sampler("dpm++3m-sde", make_diffusion(linear), steps=20)
    x = sampler.sample(GaussianDenoiser(linear), (32, 1, 16, 16), seed=4, clip_denoised=False)
    assert mc_var(x) == pytest.approx(_sde_variance(sampler), rel=5 * math.sqrt(2 / 8192))


# ------------------------------------------------------------------------------------------ diffusers parity
diffusers = pytest.importorskip("diffusers")
PRED = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
TOL = 3e-4  # the project's drop-in parity contract (tests/test_diffusers_parity.py); measured ~2e-6


def _compare(sched, ours, n_steps, prediction, stochastic=False, upto=None, shape=(2, 3, 4, 4), clip=False):
    from test_diffusers_parity import FixedModel

    schedule = ours.schedule
    model = FixedModel(schedule, prediction, shape[1], False)
    g = torch.Generator().manual_seed(0)
    x_ref = torch.randn(shape, generator=g)
    x = x_ref.clone()
    worst = 0.0
    ts = sched.timesteps.tolist()
    assert ours.timesteps.tolist() == ts
    for t in ts[:upto]:
        noise = torch.randn(shape, generator=g)
        kw = dict(variance_noise=noise) if stochastic else {}
        x_ref = sched.step(model(x_ref, t), t, x_ref, **kw).prev_sample
        x = ours.step(model(x, t), t, x, noise=noise if stochastic else None, clip_denoised=clip)
        worst = max(worst, (x - x_ref).abs().max().item())
    assert torch.isfinite(x_ref).all() and x_ref.abs().max() > 0.1
    return worst


@pytest.mark.parametrize("n_steps", [8, 20])
@pytest.mark.parametrize("stochastic", [False, True], ids=["ode", "sde"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_dpm_solver_3m_matches_diffusers(linear, prediction, stochastic, n_steps):
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T, trained_betas=linear.betas.numpy(), prediction_type=PRED[prediction], solver_order=3,
        algorithm_type="sde-dpmsolver++" if stochastic else "dpmsolver++")
    sched.set_timesteps(n_steps)
    # diffusers lowers the order of the last transition below 15 steps only
    ours = DPMSolver3MSampler(make_diffusion(linear, prediction), steps=sched.timesteps.tolist(), stochastic=stochastic,
                              lower_order_final=n_steps < 15, third_order="diffusers")
    worst = _compare(sched, ours, n_steps, prediction, stochastic)
    assert worst <= TOL, f"max abs diff {worst:.3g}"


@pytest.mark.parametrize("n_steps", [5, 10, 15, 20])
@pytest.mark.parametrize("stochastic", [False, True], ids=["ode", "sde"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpm_solver_2m_matches_diffusers(linear, schedule, stochastic, n_steps):
    """DPM-Solver++(2M) and SDE-DPM-Solver++(2M) on "trailing" timesteps equal diffusers'
    DPMSolverMultistepScheduler(solver_order=2, timestep_spacing="trailing", final_sigmas_type="zero")
    over the whole loop, same noise, x0-hat clipped to [-1, 1] (diffusers: thresholding with
    sample_max_value=1): the transition to timesteps[-1] is second order, the final x0-hat first order.
    (With the transition at first order, fastddpm's rule before this test, every case fails.)"""
    sch = linear if schedule == "linear" else NoiseSchedule.cosine(T)
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T, trained_betas=sch.betas.numpy(), solver_order=2, timestep_spacing="trailing",
        algorithm_type="sde-dpmsolver++" if stochastic else "dpmsolver++", thresholding=True, sample_max_value=1.0)
    sched.set_timesteps(n_steps)
    ours = make_sampler("dpm++sde" if stochastic else "dpm++", make_diffusion(sch), steps=n_steps, spacing="trailing")
    assert not ours.first_order_final
    worst = _compare(sched, ours, n_steps, "eps", stochastic, clip=True)
    assert worst <= TOL, f"max abs diff {worst:.3g}"


def test_dpm_solver_2m_first_order_final(linear):
    """Timesteps ending at t = 0 keep the first-order last transition by default (diffusers, given the
    same list, differs from there on); first_order_final=False equals diffusers on them too."""
    ts = quadratic_timesteps(T, 9)
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, trained_betas=linear.betas.numpy(),
                                                  solver_order=2, algorithm_type="sde-dpmsolver++")
    sched.set_timesteps(timesteps=ts)
    default = DPMSolverSampler(make_diffusion(linear), steps=ts, stochastic=True)
    assert default.first_order_final
    assert _compare(sched, default, 9, "eps", stochastic=True) > 1e-2
    sched.set_timesteps(timesteps=ts)
    parity = DPMSolverSampler(make_diffusion(linear), steps=ts, stochastic=True, first_order_final=False)
    assert _compare(sched, parity, 9, "eps", stochastic=True) <= TOL
    with pytest.raises(ValueError, match="first_order_final"):
        DPMSolverSampler(make_diffusion(linear), steps=ts, first_order_final=1)


@pytest.mark.parametrize("n_steps", [7, 12])
@pytest.mark.parametrize("kw", [
    dict(order=3, variant="bh2"), dict(order=3, variant="bh1"), dict(order=2, variant="bh2"),
    dict(order=2, variant="bh1"), dict(order=1, variant="bh2"), dict(order=3, variant="bh2", corrector=False),
    dict(order=3, variant="bh1", lower_order_final=False),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_unipc_matches_diffusers(linear, prediction, kw, n_steps):
    kw = dict(kw)
    corrector = kw.pop("corrector", True)
    lof = kw.pop("lower_order_final", True)
    sched = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=T, trained_betas=linear.betas.numpy(), prediction_type=PRED[prediction],
        solver_order=kw["order"], solver_type=kw["variant"], lower_order_final=lof,
        disable_corrector=[] if corrector else list(range(n_steps)))
    sched.set_timesteps(n_steps)
    ours = UniPCSampler(make_diffusion(linear, prediction), steps=sched.timesteps.tolist(), corrector=corrector,
                        lower_order_final=lof, **kw)
    # diffusers' last predictor (to sigma = 0, lambda = inf) is singular without lower_order_final and
    # NaN for bh1 (B(h) = -inf times a zero correction); ours returns x0-hat: compared up to that step
    last = lof and kw["variant"] == "bh2"
    worst = _compare(sched, ours, n_steps, prediction, upto=None if last else -1)
    assert worst <= TOL, f"max abs diff {worst:.3g}"


def test_parity_is_sensitive(linear):
    """The Taylor third-order term differs from diffusers' (the comparison can fail)."""
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, trained_betas=linear.betas.numpy(),
                                                  solver_order=3)
    sched.set_timesteps(8)
    ours = DPMSolver3MSampler(make_diffusion(linear), steps=sched.timesteps.tolist())
    assert _compare(sched, ours, 8, "eps") > 1e-2


# ------------------------------------------------------------------------------ step state, FastSampler, Triton
def test_step_state_and_explicit_history(linear):
    sampler = UniPCSampler(make_diffusion(linear), steps=6)
    model = GaussianDenoiser(linear)
    shape = (2, 1, 4, 4)
    ref = sampler.sample(model, shape, generator=torch.Generator().manual_seed(6), clip_denoised=False)
    ts = sampler.timesteps.tolist()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    xs, x0s = [x], []
    for t in ts:
        x, x0 = sampler.step(model(x, torch.full((2,), t)), t, x, clip_denoised=False, return_x0=True)
        xs.append(x)
        x0s.append(x0)
    torch.testing.assert_close(x, ref, rtol=0, atol=0)
    # row 4 with an explicit history (most recent first) equals the kept state
    sampler.reset()
    x4 = sampler.step(model(xs[4], torch.full((2,), ts[4])), ts[4], xs[4], clip_denoised=False,
                      x0_prev=[x0s[3], x0s[2], x0s[1]])
    torch.testing.assert_close(x4, xs[5], rtol=0, atol=0)
    with pytest.raises(ValueError, match="x0_prev"):
        sampler.step(model(xs[4], torch.full((2,), ts[4])), ts[4], xs[4], x0_prev=[x0s[3]])
    sampler.reset()
    with pytest.raises(ValueError, match="x0_prev"):
        sampler.step(model(xs[2], torch.full((2,), ts[2])), ts[2], xs[2])


@pytest.mark.parametrize("name", ["dpm++3m", "dpm++3m-sde", "unipc"])
def test_fast_sampler_equals_sample(linear, name):
    sampler = make_sampler(name, make_diffusion(linear), steps=7)
    model = GaussianDenoiser(linear)
    fast = FastSampler(model, sampler, batch_size=3, image_shape=(2, 4, 4), capture="none", clip_denoised=False)
    assert [h is not None for h in fast.history] == [i < sampler.num_history for i in range(3)]
    ref = sampler.sample(model, (3, 2, 4, 4), seed=11, clip_denoised=False)
    torch.testing.assert_close(fast(seed=11), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not __import__("fastddpm.ops.backend", fromlist=["x"]).triton_available(), reason="triton not installed")
@pytest.mark.parametrize("name", ["dpm++3m-sde", "unipc"])
def test_triton_backend_matches_reference(linear, name):
    """Whole loops through the Triton kernel (interpreter on CPU) equal the reference path, in sample()
    (the functional kernel) and in FastSampler (the in-place kernel with the history shift)."""
    sampler = make_sampler(name, make_diffusion(linear, "v"), steps=5)
    model = lambda x, t: torch.tanh(0.8 * x)  # noqa: E731
    ref = sampler.sample(model, (2, 3, 5, 4), seed=5)
    fast_ref = FastSampler(model, sampler, batch_size=2, image_shape=(3, 5, 4), capture="none")(seed=5)
    with use_backend("triton"):
        tri = sampler.sample(model, (2, 3, 5, 4), seed=5)
        fast_tri = FastSampler(model, sampler, batch_size=2, image_shape=(3, 5, 4), capture="none")(seed=5)
    torch.testing.assert_close(tri, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_tri, fast_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_ref, ref, rtol=1e-5, atol=1e-5)


def test_bad_arguments(linear):
    diff = make_diffusion(linear)
    with pytest.raises(ValueError, match="order"):
        UniPCSampler(diff, order=4)
    with pytest.raises(ValueError, match="variant"):
        UniPCSampler(diff, variant="bh3")
    with pytest.raises(ValueError, match="corrector"):
        UniPCSampler(diff, corrector=1)
    with pytest.raises(ValueError, match="third_order"):
        DPMSolver3MSampler(diff, third_order="exact")
    with pytest.raises(ValueError, match="lower_order_final"):
        DPMSolver3MSampler(diff, lower_order_final="yes")
    with pytest.raises(ValueError, match="steps"):
        UniPCSampler(diff, steps=[5, 7])
    assert UniPCSampler(diff, order=2, corrector=False).num_history == 1
    assert UniPCSampler(diff, order=3).num_history == 3 and DPMSolver3MSampler(diff).num_history == 2


@pytest.mark.parametrize("n", [5, 20])
def test_unip3_bh2_is_dpm_solver_3m_taylor(linear, n):
    """Two derivations of one method: UniP-3 with B(h) = e^h - 1 (its rhos from the R b system) and
    DPM-Solver++(3M) with the Taylor D2 give the same table (lower_order_final and warm-up included)."""
    diff = make_diffusion(linear)
    a = UniPCSampler(diff, steps=n, corrector=False).coefs
    b = DPMSolver3MSampler(diff, steps=n).coefs
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert (a - DPMSolver3MSampler(diff, steps=n, third_order="diffusers").coefs).abs().max() > 1e-3

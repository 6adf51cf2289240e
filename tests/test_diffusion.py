"""GaussianDiffusion against independent references: closed-form Gaussian algebra done here in float64
(Bayes' rule, the exact denoiser of Gaussian data, the exact model of a one-image dataset), Monte Carlo,
torch.distributions and scipy's normal CDF.

Tolerances: float64 algebra 1e-10 relative unless stated; Monte Carlo checks at 5 standard errors.
"""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

mpmath = pytest.importorskip("mpmath")

from fastddpm.diffusion import GaussianDiffusion, discretized_gaussian_log_likelihood, normal_kl
from fastddpm.schedule import NoiseSchedule

F64 = torch.float64
LN2 = math.log(2.0)


def lin_betas(T):
    """Linear schedule written out independently (numpy)."""
    return np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)


def ab_np(betas):
    return np.cumprod(1.0 - betas)


# ------------------------------------------------------------------------------------------------
# construction and validation
# ------------------------------------------------------------------------------------------------
def test_attributes():
    s = NoiseSchedule.cosine(50)
    d = GaussianDiffusion(s, prediction="v", variance="learned_range", loss="hybrid")
    assert (d.schedule, d.prediction, d.variance, d.loss, d.num_timesteps) == (s, "v", "learned_range", "hybrid", 50)
    d = GaussianDiffusion(s)
    assert (d.prediction, d.variance, d.loss) == ("eps", "fixed_small", "simple")


@pytest.mark.parametrize(
    "kwargs,arg,accepted",
    [
        (dict(prediction="epsilon"), "prediction", "x0"),
        (dict(variance="learned"), "variance", "fixed_large"),
        (dict(loss="mse"), "loss", "hybrid"),
    ],
)
def test_unknown_names_raise(kwargs, arg, accepted):
    with pytest.raises(ValueError, match=arg) as e:
        GaussianDiffusion(NoiseSchedule.linear(100), **kwargs)
    assert accepted in str(e.value)


def test_schedule_type_checked():
    with pytest.raises(ValueError, match="schedule"):
        GaussianDiffusion([0.1, 0.2])


def test_tables_cast_once_and_follow_input_dtype():
    d = GaussianDiffusion(NoiseSchedule.linear(100))
    a = d.tables("cpu", torch.float32)
    assert a is d.tables(torch.device("cpu"), torch.float32)
    assert a["betas"].dtype == torch.float32 and d.tables("cpu", F64)["betas"].dtype == F64
    assert torch.equal(d.tables("cpu", F64)["sqrt_alphas_cumprod"], d.schedule.sqrt_alphas_cumprod)
    for dtype in (torch.float32, torch.bfloat16, F64):
        x = torch.zeros(2, 3, 4, 4, dtype=dtype)
        t = torch.tensor([0, 99])
        assert d.q_sample(x, t).dtype == dtype
        out = d.p_mean_variance(lambda x, t: torch.zeros_like(x), x, t)
        assert out["mean"].dtype == dtype and out["log_variance"].dtype == dtype


# ------------------------------------------------------------------------------------------------
# q(x_t | x0)
# ------------------------------------------------------------------------------------------------
def test_q_sample_moments_monte_carlo():
    T = 1000
    d = GaussianDiffusion(NoiseSchedule.linear(T))
    ab = ab_np(lin_betas(T))
    g = torch.Generator().manual_seed(0)
    M = 40000
    x0_vals = torch.tensor([-1.0, -0.3, 0.5, 1.0], dtype=F64)
    for t_val in (0, 10, 300, 999):
        x0 = x0_vals.expand(M, 4).clone()
        xt = d.q_sample(x0, torch.full((M,), t_val), generator=g)
        mean_ref = math.sqrt(ab[t_val]) * x0_vals.numpy()
        var_ref = 1.0 - ab[t_val]
        se_mean = math.sqrt(var_ref / M)
        se_var = var_ref * math.sqrt(2.0 / M)
        np.testing.assert_allclose(xt.mean(0).numpy(), mean_ref, atol=5 * se_mean, rtol=0)
        np.testing.assert_allclose(xt.var(0).numpy(), var_ref, atol=5 * se_var, rtol=0)
        m, v, lv = d.q_mean_variance(x0[:3], torch.full((3,), t_val))
        np.testing.assert_allclose(m.numpy(), np.tile(mean_ref, (3, 1)), rtol=1e-12)
        np.testing.assert_allclose(v.flatten().numpy(), var_ref, rtol=1e-10)
        np.testing.assert_allclose(lv.flatten().numpy(), math.log(var_ref), rtol=1e-10)


def test_q_sample_given_noise_is_the_affine_map():
    T = 100
    d = GaussianDiffusion(NoiseSchedule.linear(T))
    ab = ab_np(lin_betas(T))
    x0 = torch.randn(5, 2, 3, dtype=F64)
    noise = torch.randn(5, 2, 3, dtype=F64)
    t = torch.tensor([0, 1, 50, 98, 99])
    ref = np.sqrt(ab[t])[:, None, None] * x0.numpy() + np.sqrt(1 - ab[t])[:, None, None] * noise.numpy()
    np.testing.assert_allclose(d.q_sample(x0, t, noise).numpy(), ref, rtol=1e-12, atol=1e-14)
    # a Python int t applies to the whole batch
    np.testing.assert_allclose(d.q_sample(x0, 50, noise).numpy(), d.q_sample(x0, torch.full((5,), 50), noise).numpy())


# ------------------------------------------------------------------------------------------------
# q(x_{t-1} | x_t, x0) by Bayes' rule
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_q_posterior_bayes(kind):
    T = 200
    s = getattr(NoiseSchedule, kind)(T)
    d = GaussianDiffusion(s)
    betas = s.betas.numpy()
    ab = np.cumprod(1 - betas)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([1, 2, 17, 100, 150, 199])
    x0 = torch.rand(6, 3, 2, 2, generator=g, dtype=F64) * 2 - 1
    xt = torch.randn(6, 3, 2, 2, generator=g, dtype=F64)
    mean, var, log_var = d.q_posterior(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        # prior x_{t-1} | x0 ~ N(sqrt(ab_{t-1}) x0, 1 - ab_{t-1}); likelihood x_t | x_{t-1} ~ N(sqrt(a_t) x_{t-1}, beta_t)
        a_t, b_t, abp = 1 - betas[ti], betas[ti], ab[ti - 1]
        prec = 1 / (1 - abp) + a_t / b_t
        v_ref = 1 / prec
        m_ref = v_ref * (math.sqrt(abp) * x0[i].numpy() / (1 - abp) + math.sqrt(a_t) * xt[i].numpy() / b_t)
        np.testing.assert_allclose(mean[i].numpy(), m_ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(var[i].numpy(), v_ref, rtol=1e-10)
        np.testing.assert_allclose(log_var[i].numpy(), math.log(v_ref), rtol=1e-10)
    assert var.shape == xt.shape and log_var.shape == xt.shape


def test_q_posterior_at_t0_is_the_point_x0():
    T = 100
    d = GaussianDiffusion(NoiseSchedule.linear(T))
    betas = lin_betas(T)
    x0 = torch.randn(3, 2, dtype=F64)
    xt = torch.randn(3, 2, dtype=F64)
    mean, var, log_var = d.q_posterior(x0, xt, torch.zeros(3, dtype=torch.int64))
    np.testing.assert_allclose(mean.numpy(), x0.numpy(), rtol=1e-12, atol=1e-15)
    assert (var == 0).all()
    # log-variance clipped with beta_tilde_1
    ab = ab_np(betas)
    bt1 = betas[1] * (1 - ab[0]) / (1 - ab[1])
    np.testing.assert_allclose(log_var.numpy(), math.log(bt1), rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# Gaussian helpers
# ------------------------------------------------------------------------------------------------
def test_normal_kl_vs_monte_carlo_and_torch():
    m1 = torch.tensor([0.0, 1.0, -2.0, 0.3], dtype=F64)
    lv1 = torch.tensor([0.0, -1.0, 0.5, -3.0], dtype=F64)
    m2 = torch.tensor([0.0, 0.0, -1.0, 0.4], dtype=F64)
    lv2 = torch.tensor([0.0, 0.5, 0.2, -2.5], dtype=F64)
    kl = normal_kl(m1, lv1, m2, lv2)
    p = torch.distributions.Normal(m1, (0.5 * lv1).exp())
    q = torch.distributions.Normal(m2, (0.5 * lv2).exp())
    np.testing.assert_allclose(kl.numpy(), torch.distributions.kl_divergence(p, q).numpy(), rtol=1e-12, atol=1e-15)
    g = torch.Generator().manual_seed(0)
    M = 400000
    x = m1 + (0.5 * lv1).exp() * torch.randn(M, 4, generator=g, dtype=F64)
    llr = p.log_prob(x) - q.log_prob(x)
    se = llr.std(0) / math.sqrt(M)
    assert ((llr.mean(0) - kl).abs() <= 5 * se + 1e-12).all(), (llr.mean(0), kl, se)
    assert kl[0].item() == 0.0
    # floats broadcast against tensors
    np.testing.assert_allclose(normal_kl(m1, lv1, 0.0, 0.0).numpy(), 0.5 * (-1 - lv1 + lv1.exp() + m1**2).numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="mean1"):
        normal_kl(0.0, 0.0, 0.0, 0.0)


BINS = torch.linspace(-1, 1, 256, dtype=F64)


def bin_log_prob_mp(x, mu, sigma):
    """log P(bin of x) under N(mu, sigma^2), edge bins open, with 60-digit arithmetic (mpmath)."""
    mpmath.mp.dps = 60
    x, mu, sigma = mpmath.mpf(float(x)), mpmath.mpf(float(mu)), mpmath.mpf(float(sigma))
    z_hi = (x + mpmath.mpf(1) / 255 - mu) / sigma if x < 0.999 else mpmath.inf
    z_lo = (x - mpmath.mpf(1) / 255 - mu) / sigma if x > -0.999 else -mpmath.inf
    # P = Phi(z_hi) - Phi(z_lo) = Phi(-z_lo) - Phi(-z_hi): use the tails (mpmath's exponent range is unbounded)
    if z_lo > 0:
        hi, lo = mpmath.ncdf(-z_lo), mpmath.ncdf(-z_hi)
    else:
        hi, lo = mpmath.ncdf(z_hi), mpmath.ncdf(z_lo)
    return float(mpmath.log(hi - lo))


@pytest.mark.parametrize(
    "mean,log_scale",
    [(0.0, math.log(0.1)), (0.99, math.log(0.004)), (-1.0, math.log(1e-4)), (0.3, math.log(2e-3)),
     (3.0, math.log(0.5)), (-7.0, 0.0), (0.5, math.log(1e-6)), (1.0 / 255, math.log(1e-5)), (0.0, 3.0)],
)
def test_decoder_probabilities_sum_to_one(mean, log_scale):
    x = BINS[:, None]
    means = torch.full_like(x, mean)
    ls = torch.full_like(x, log_scale)
    logp = discretized_gaussian_log_likelihood(x, means, ls)
    assert logp.dtype == F64 and torch.isfinite(logp).all()
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    # float32 as well
    logp32 = discretized_gaussian_log_likelihood(x.float(), means.float(), ls.float())
    assert logp32.dtype == torch.float32 and torch.isfinite(logp32).all()
    assert logp32.exp().sum().item() == pytest.approx(1.0, abs=1e-4)


def test_decoder_matches_mpmath():
    g = torch.Generator().manual_seed(3)
    k = torch.randint(0, 256, (300,), generator=g)
    k[:3] = torch.tensor([0, 255, 128])
    x = (k.to(F64) * 2 / 255 - 1)
    mu = torch.rand(300, generator=g, dtype=F64) * 2.4 - 1.2
    sig = torch.exp(torch.rand(300, generator=g, dtype=F64) * 4 - 6)  # 2.5e-3 .. 0.14
    got = discretized_gaussian_log_likelihood(x, mu, sig.log()).numpy()
    ref = np.array([bin_log_prob_mp(a, b, c) for a, b, c in zip(x.tolist(), mu.tolist(), sig.tolist())])
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


def test_decoder_far_tail_is_accurate():
    # a bin 500 standard deviations away: log P is about log Phi(-z); improved-diffusion's clamp would give log(1e-12)
    sigma = 1e-3
    x = torch.tensor([128 * 2 / 255 - 1], dtype=F64)
    mu = x - 0.5
    z_lo = (0.5 - 1 / 255) / sigma
    ref = norm.logcdf(-z_lo)  # the upper edge's tail is exp(-7.8 z) smaller: negligible
    got = discretized_gaussian_log_likelihood(x, mu, torch.full_like(x, math.log(sigma))).item()
    assert got == pytest.approx(ref, rel=1e-9)
    assert got < -1e5
    # the same on the left, and for the open edge bins
    got_left = discretized_gaussian_log_likelihood(x, x + 0.5, torch.full_like(x, math.log(sigma))).item()
    assert got_left == pytest.approx(ref, rel=1e-9)
    edge = torch.tensor([1.0], dtype=F64)
    got_edge = discretized_gaussian_log_likelihood(edge, edge - 0.5, torch.full_like(edge, math.log(sigma))).item()
    assert got_edge == pytest.approx(norm.logcdf(-(0.5 - 1 / 255) / sigma), rel=1e-9)


# ------------------------------------------------------------------------------------------------
# eps / x0 / v conversions
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_conversions_round_trip(kind):
    T = 1000
    d = GaussianDiffusion(getattr(NoiseSchedule, kind)(T))
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([0, 1, 10, 500, 900, 998, 999])
    x0 = torch.rand(7, 3, 4, 4, generator=g, dtype=F64) * 2 - 1
    eps = torch.randn(7, 3, 4, 4, generator=g, dtype=F64)
    xt = d.q_sample(x0, t, eps)
    tol = dict(rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(d.predict_x0_from_eps(xt, t, eps).numpy(), x0.numpy(), **tol)
    np.testing.assert_allclose(d.predict_eps_from_x0(xt, t, x0).numpy(), eps.numpy(), **tol)
    v = d.predict_v(x0, t, eps)
    ab = d.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    np.testing.assert_allclose(v.numpy(), (ab.sqrt() * eps - (1 - ab).sqrt() * x0).numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(d.predict_x0_from_v(xt, t, v).numpy(), x0.numpy(), **tol)
    np.testing.assert_allclose(d.predict_eps_from_v(xt, t, v).numpy(), eps.numpy(), **tol)
    for pred, out in (("eps", eps), ("x0", x0), ("v", v)):
        dp = GaussianDiffusion(d.schedule, prediction=pred)
        np.testing.assert_allclose(dp.predict_x0(xt, t, out).numpy(), x0.numpy(), **tol)
        np.testing.assert_allclose(dp.training_target(x0, t, eps).numpy(), out.numpy(), rtol=1e-12)
        o = dp.p_mean_variance(None, xt, t, clip_denoised=False, model_output=out)
        np.testing.assert_allclose(o["pred_x0"].numpy(), x0.numpy(), **tol)
        np.testing.assert_allclose(o["eps"].numpy(), eps.numpy(), **tol)


# ------------------------------------------------------------------------------------------------
# p(x_{t-1} | x_t) with the exact denoiser of Gaussian data x0 ~ N(0, s^2 I)
# ------------------------------------------------------------------------------------------------
def gaussian_exact_model(d, s, prediction):
    """The exact (MMSE) model output for data x0 ~ N(0, s^2) elementwise, computed in the test."""
    ab_tab = torch.tensor(ab_np(d.schedule.betas.numpy()), dtype=F64)

    def model(x, t):
        ab = ab_tab[t].view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        D = ab * s**2 + 1 - ab
        if prediction == "eps":
            return (1 - ab).sqrt() / D * x
        if prediction == "x0":
            return ab.sqrt() * s**2 / D * x
        return (ab * (1 - ab)).sqrt() * (1 - s**2) / D * x

    return model


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_p_mean_variance_exact_gaussian_denoiser(prediction):
    T, s = 100, 0.5
    sched = NoiseSchedule.linear(T)
    d = GaussianDiffusion(sched, prediction=prediction)
    betas = lin_betas(T)
    ab = ab_np(betas)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    g = torch.Generator().manual_seed(4)
    t = torch.tensor([0, 1, 5, 50, 99])
    xt = torch.randn(5, 2, 3, 3, generator=g, dtype=F64)
    out = d.p_mean_variance(gaussian_exact_model(d, s, prediction), xt, t, clip_denoised=False)
    for i, ti in enumerate(t.tolist()):
        var_t = ab[ti] * s**2 + 1 - ab[ti]
        var_prev = ab_prev[ti] * s**2 + 1 - ab_prev[ti]  # Var(x_{t-1}); x_{-1} = x0
        # E[x0 | x_t] and E[x_{t-1} | x_t] from the joint Gaussian: Cov(x_{t-1}, x_t) = sqrt(alpha_t) Var(x_{t-1})
        x0_ref = math.sqrt(ab[ti]) * s**2 / var_t * xt[i].numpy()
        mean_ref = math.sqrt(1 - betas[ti]) * var_prev / var_t * xt[i].numpy()
        eps_ref = math.sqrt(1 - ab[ti]) / var_t * xt[i].numpy()
        np.testing.assert_allclose(out["pred_x0"][i].numpy(), x0_ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(out["mean"][i].numpy(), mean_ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(out["eps"][i].numpy(), eps_ref, rtol=1e-9, atol=1e-12)


def test_variance_types():
    T = 100
    sched = NoiseSchedule.linear(T)
    betas = lin_betas(T)
    ab = ab_np(betas)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    bt = betas * (1 - ab_prev) / (1 - ab)
    t = torch.tensor([0, 1, 2, 60, 99])
    tn = t.numpy()
    xt = torch.zeros(5, 2, 2, 2, dtype=F64)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731

    small = GaussianDiffusion(sched, variance="fixed_small").p_mean_variance(zero, xt, t)
    small_ref = np.where(tn == 0, 0.0, bt[tn])
    np.testing.assert_allclose(small["variance"][:, 0, 0, 0].numpy(), small_ref, rtol=1e-12)
    np.testing.assert_allclose(small["log_variance"][:, 0, 0, 0].numpy(), np.log(np.where(tn == 0, bt[1], bt[tn])), rtol=1e-12)
    assert small["variance"].shape == xt.shape

    large = GaussianDiffusion(sched, variance="fixed_large").p_mean_variance(zero, xt, t)
    large_ref = np.where(tn == 0, bt[1], betas[tn])
    np.testing.assert_allclose(large["variance"][:, 0, 0, 0].numpy(), large_ref, rtol=1e-12)
    np.testing.assert_allclose(large["log_variance"][:, 0, 0, 0].numpy(), np.log(large_ref), rtol=1e-12)

    lr = GaussianDiffusion(sched, variance="learned_range")
    v = torch.tensor([-1.0, 1.0, 0.0, 0.5, -0.25], dtype=F64)
    out_v = torch.cat([torch.zeros_like(xt), v.view(5, 1, 1, 1).expand(5, 2, 2, 2)], dim=1)
    o = lr.p_mean_variance(None, xt, t, model_output=out_v)
    f = (v.numpy() + 1) / 2
    lv_ref = f * np.log(betas[tn]) + (1 - f) * np.log(np.where(tn == 0, bt[1], bt[tn]))
    np.testing.assert_allclose(o["log_variance"][:, 0, 0, 0].numpy(), lv_ref, rtol=1e-12)
    np.testing.assert_allclose(o["variance"][:, 1, 1, 1].numpy(), np.exp(lv_ref), rtol=1e-12)


def test_clip_denoised_and_model_output_reuse():
    T = 100
    d = GaussianDiffusion(NoiseSchedule.linear(T), prediction="x0")
    xt = torch.zeros(2, 1, 2, 2, dtype=F64)
    t = torch.tensor([10, 20])
    raw = torch.tensor([3.0, -0.5, 0.2, -4.0], dtype=F64).view(1, 1, 2, 2).expand(2, 1, 2, 2)
    calls = []

    def model(x, t):
        calls.append(t.clone())
        return raw

    o = d.p_mean_variance(model, xt, t, clip_denoised=True)
    np.testing.assert_allclose(o["pred_x0"].numpy(), raw.clamp(-1, 1).numpy())
    coef1 = d.schedule.posterior_mean_coef1[t].view(2, 1, 1, 1)
    np.testing.assert_allclose(o["mean"].numpy(), (coef1 * raw.clamp(-1, 1)).numpy(), rtol=1e-12)
    o2 = d.p_mean_variance(model, xt, t, clip_denoised=False, model_output=raw)
    np.testing.assert_allclose(o2["pred_x0"].numpy(), raw.numpy())
    assert len(calls) == 1 and torch.equal(calls[0], t)


def test_model_output_with_sample_attribute_and_respaced_timesteps():
    base = NoiseSchedule.linear(1000)
    r = base.respace([0, 250, 500, 999])
    d = GaussianDiffusion(r, prediction="eps")
    seen = []

    class Out:
        def __init__(self, sample):
            self.sample = sample

    def model(x, t):
        seen.append(t.clone())
        return Out(torch.zeros_like(x))

    xt = torch.randn(4, 1, 2, 2, dtype=F64)
    t = torch.tensor([0, 1, 2, 3])
    o = d.p_mean_variance(model, xt, t, clip_denoised=False)
    assert seen[0].tolist() == [0, 250, 500, 999]  # the model sees original timesteps
    ab = base.alphas_cumprod[[0, 250, 500, 999]].view(4, 1, 1, 1)
    np.testing.assert_allclose(o["pred_x0"].numpy(), (xt / ab.sqrt()).numpy(), rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# training losses
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("loss", ["simple", "vlb", "hybrid"])
def test_training_losses_shapes(variance, loss):
    d = GaussianDiffusion(NoiseSchedule.linear(50), variance=variance, loss=loss)
    C = 3
    oc = 2 * C if variance == "learned_range" else C
    net = torch.nn.Conv2d(C, oc, 3, padding=1)
    x0 = torch.rand(4, C, 5, 5) * 2 - 1
    g = torch.Generator().manual_seed(0)
    terms = d.training_losses(lambda x, t: net(x), x0, generator=g)
    assert terms["loss"].shape == (4,) and terms["mse"].shape == (4,)
    assert ("vb" in terms) == (loss != "simple")
    assert terms["t"].shape == (4,) and terms["t"].dtype == torch.int64
    assert torch.isfinite(terms["loss"]).all()
    if loss == "hybrid":
        torch.testing.assert_close(terms["loss"], terms["mse"] + 0.001 * terms["vb"], rtol=1e-6, atol=0)
    if loss == "vlb":
        assert torch.equal(terms["loss"], terms["vb"])
    terms["loss"].mean().backward()
    assert net.weight.grad is not None and torch.isfinite(net.weight.grad).all()
    # same generator seed, same draw
    g2 = torch.Generator().manual_seed(0)
    terms2 = d.training_losses(lambda x, t: net(x), x0, generator=g2)
    assert torch.equal(terms2["loss"], terms["loss"]) and torch.equal(terms2["t"], terms["t"])


def test_uniform_t():
    T = 10
    d = GaussianDiffusion(NoiseSchedule.cosine(T))
    g = torch.Generator().manual_seed(5)
    n = 4000
    terms = d.training_losses(lambda x, t: torch.zeros_like(x), torch.zeros(n, 1, 1, 1), generator=g)
    counts = torch.bincount(terms["t"], minlength=T).double()
    assert counts.numel() == T and terms["t"].min() >= 0
    # chi-square with 9 dof: the 0.9999 quantile is ~33.7
    chi2 = ((counts - n / T) ** 2 / (n / T)).sum().item()
    assert chi2 < 33.7


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_training_mse_of_exact_gaussian_denoiser(prediction):
    """E[mse] at timestep t = Var(target | x_t): eps: ab s^2/D, x0: s^2 (1-ab)/D, v: s^2/D, D = ab s^2 + 1 - ab."""
    T, s = 1000, 0.6
    d = GaussianDiffusion(NoiseSchedule.linear(T), prediction=prediction)
    ab = ab_np(lin_betas(T))
    ts = [0, 100, 400, 999]
    per, dim = 2000, 16
    t = torch.tensor(ts).repeat_interleave(per)
    g = torch.Generator().manual_seed(6)
    x0 = s * torch.randn(len(t), dim, generator=g, dtype=F64)
    terms = d.training_losses(gaussian_exact_model(d, s, prediction).__call__, x0.view(-1, 1, 4, 4), t=t, generator=g)
    mse = terms["mse"].view(len(ts), per).mean(1).numpy()
    a = ab[ts]
    D = a * s**2 + 1 - a
    ref = {"eps": a * s**2 / D, "x0": s**2 * (1 - a) / D, "v": s**2 / D}[prediction]
    # mean of per*dim squared Gaussians: relative standard error sqrt(2 / (per*dim)) = 0.8%
    np.testing.assert_allclose(mse, ref, rtol=5 * math.sqrt(2 / (per * dim)))


def _schedule_np(T):
    betas = lin_betas(T)
    ab = ab_np(betas)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    bt = betas * (1 - ab_prev) / (1 - ab)
    c1 = betas * np.sqrt(ab_prev) / (1 - ab)
    c2 = (1 - ab_prev) * np.sqrt(1 - betas) / (1 - ab)
    return betas, ab, bt, c1, c2


def test_hybrid_stop_gradient_learned_range():
    """hybrid: the mean channels get only the MSE gradient, the variance channels only 0.001 * d(vb)/dv.
    vlb: the mean channels get the bound's gradient. All against the closed-form derivatives of the KL."""
    T, C, H = 100, 2, 2
    Dm = C * H * H
    betas, ab, bt, c1, c2 = _schedule_np(T)
    g = torch.Generator().manual_seed(7)
    N = 4
    t = torch.tensor([1, 5, 40, 99])
    x0 = torch.rand(N, C, H, H, generator=g, dtype=F64) * 2 - 1
    noise = torch.randn(N, C, H, H, generator=g, dtype=F64)
    p0 = torch.cat([torch.randn(N, C, H, H, generator=g, dtype=F64), torch.rand(N, C, H, H, generator=g, dtype=F64) * 2 - 1], 1)

    # closed forms, per element
    tn = t.numpy()
    A = lambda arr: arr[tn][:, None, None, None]  # noqa: E731
    xt = np.sqrt(A(ab)) * x0.numpy() + np.sqrt(1 - A(ab)) * noise.numpy()
    eps_hat, v = p0[:, :C].numpy(), p0[:, C:].numpy()
    x0_hat = (xt - np.sqrt(1 - A(ab)) * eps_hat) / np.sqrt(A(ab))
    m1 = A(c1) * x0.numpy() + A(c2) * xt
    m2 = A(c1) * x0_hat + A(c2) * xt
    L1 = np.log(A(bt))
    frac = (v + 1) / 2
    L2 = frac * np.log(A(betas)) + (1 - frac) * L1
    kl = 0.5 * (-1 + L2 - L1 + np.exp(L1 - L2) + (m1 - m2) ** 2 * np.exp(-L2))
    vb_ref = T * kl.mean(axis=(1, 2, 3)) / LN2
    dkl_dL2 = 0.5 * (1 - np.exp(L1 - L2) - (m1 - m2) ** 2 * np.exp(-L2))
    dvb_dv = T / (Dm * LN2) * dkl_dL2 * 0.5 * (np.log(A(betas)) - L1)
    dvb_deps = T / (Dm * LN2) * (-(m1 - m2) * np.exp(-L2)) * (A(c1) * -np.sqrt(1 - A(ab)) / np.sqrt(A(ab)))
    dmse_deps = 2 * (eps_hat - noise.numpy()) / Dm

    for loss in ("hybrid", "vlb"):
        d = GaussianDiffusion(NoiseSchedule.linear(T), variance="learned_range", loss=loss)
        p = p0.clone().requires_grad_(True)
        terms = d.training_losses(lambda x, t: p, x0, t=t, noise=noise)
        np.testing.assert_allclose(terms["vb"].detach().numpy(), vb_ref, rtol=1e-9)
        terms["loss"].sum().backward()
        gm, gv = p.grad[:, :C].numpy(), p.grad[:, C:].numpy()
        if loss == "hybrid":
            np.testing.assert_allclose(terms["loss"].detach().numpy(), terms["mse"].detach().numpy() + 0.001 * vb_ref, rtol=1e-12)
            np.testing.assert_allclose(gm, dmse_deps, rtol=1e-9, atol=1e-14)
            np.testing.assert_allclose(gv, 0.001 * dvb_dv, rtol=1e-8, atol=1e-14)
        else:
            np.testing.assert_allclose(gm, dvb_deps, rtol=1e-8, atol=1e-12)
            np.testing.assert_allclose(gv, dvb_dv, rtol=1e-8, atol=1e-12)
            assert np.abs(gm).max() > 1e-6


def test_hybrid_fixed_variance_gradient_is_mse_only():
    T = 100
    d = GaussianDiffusion(NoiseSchedule.linear(T), variance="fixed_small", loss="hybrid")
    g = torch.Generator().manual_seed(8)
    x0 = torch.rand(3, 1, 2, 2, generator=g, dtype=F64) * 2 - 1
    noise = torch.randn(3, 1, 2, 2, generator=g, dtype=F64)
    p = torch.randn(3, 1, 2, 2, generator=g, dtype=F64).requires_grad_(True)
    terms = d.training_losses(lambda x, t: p, x0, t=torch.tensor([0, 3, 70]), noise=noise)
    assert (terms["vb"] > 0).all()
    terms["loss"].sum().backward()
    np.testing.assert_allclose(p.grad.numpy(), (2 * (p - noise) / 4).detach().numpy(), rtol=1e-12)


def test_vlb_decoder_term_at_t0_matches_mpmath():
    T = 100
    betas, ab, bt, _, _ = _schedule_np(T)
    d = GaussianDiffusion(NoiseSchedule.linear(T), prediction="x0", loss="vlb")
    g = torch.Generator().manual_seed(9)
    x0 = (torch.randint(0, 256, (3, 1, 3, 3), generator=g).to(F64) * 2 / 255 - 1)
    x0[0, 0, 0, 0], x0[0, 0, 0, 1] = -1.0, 1.0
    mu = torch.rand(3, 1, 3, 3, generator=g, dtype=F64) * 2 - 1  # the model's x0 = the decoder mean at t = 0
    terms = d.training_losses(lambda x, t: mu, x0, t=torch.zeros(3, dtype=torch.int64))
    sigma = math.sqrt(bt[1])
    logp = np.array([bin_log_prob_mp(a, b, sigma) for a, b in zip(x0.flatten().tolist(), mu.flatten().tolist())])
    ref = T * (-logp.reshape(3, -1)).mean(axis=1) / LN2
    np.testing.assert_allclose(terms["vb"].numpy(), ref, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# bits/dim: a model exact for a one-image dataset
# ------------------------------------------------------------------------------------------------
def one_image_model(d, images):
    """eps(x_t, t) = (x_t - sqrt(ab_t) x*) / sqrt(1 - ab_t), per sample (each sample its own dataset)."""
    ab_tab = torch.tensor(ab_np(d.schedule.betas.numpy()), dtype=F64)

    def model(x, t):
        ab = ab_tab[t].view(-1, 1, 1, 1)
        return (x - ab.sqrt() * images) / (1 - ab).sqrt()

    return model


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_nll_bpd_one_image_closed_form(variance):
    T = 1000
    d = GaussianDiffusion(NoiseSchedule.linear(T), prediction="eps", variance=variance)
    betas, ab, bt, _, _ = _schedule_np(T)
    g = torch.Generator().manual_seed(10)
    k = torch.randint(0, 256, (2, 1, 4, 4), generator=g)
    k[0, 0, 0, :2] = torch.tensor([0, 255])
    x = k.to(F64) * 2 / 255 - 1
    out = d.nll_bpd(one_image_model(d, x), x, generator=g)
    for key in ("vb", "xstart_mse", "mse"):
        assert out[key].shape == (2, T) and out[key].dtype == F64
    assert out["total_bpd"].shape == (2,) and out["prior_bpd"].shape == (2,)

    xn = x.numpy()
    # prior: KL(N(sqrt(ab_T) x, 1 - ab_T) || N(0, 1)) per element
    aT = ab[-1]
    prior = (0.5 * (-np.log(1 - aT) + (1 - aT) + aT * xn**2 - 1)).mean(axis=(1, 2, 3)) / LN2
    # decoder at t = 0: mean x* exactly, variance beta_tilde_1 for both fixed_small and fixed_large
    sigma = math.sqrt(bt[1])
    hi = norm.cdf((1 / 255) / sigma)
    p = np.where(np.abs(xn) > 0.999, hi, 2 * hi - 1)
    decoder = (-np.log(p)).mean(axis=(1, 2, 3)) / LN2
    # t >= 1: the model mean is the true posterior mean; only the variances may differ
    if variance == "fixed_small":
        kl_t = np.zeros(T - 1)
    else:
        kl_t = 0.5 * (np.log(betas[1:] / bt[1:]) + bt[1:] / betas[1:] - 1) / LN2

    np.testing.assert_allclose(out["prior_bpd"].numpy(), prior, rtol=1e-10)
    np.testing.assert_allclose(out["vb"][:, 0].numpy(), decoder, rtol=1e-9)
    np.testing.assert_allclose(out["vb"][:, 1:].numpy(), np.tile(kl_t, (2, 1)), rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(out["total_bpd"].numpy(), prior + decoder + kl_t.sum(), rtol=1e-9)
    assert out["xstart_mse"].max().item() < 1e-18
    assert out["mse"].max().item() < 1e-12
    # plain floats: pytest.approx cannot compare 0-d tensors (pytest >= 9.2 iterates them)
    total = out["total_bpd"].sum().item()
    assert total == pytest.approx((out["vb"].sum() + out["prior_bpd"].sum()).item(), rel=1e-12)


def test_nll_bpd_progress_and_learned_range_runs():
    T = 20
    d = GaussianDiffusion(NoiseSchedule.cosine(T), prediction="v", variance="learned_range")
    x = torch.rand(2, 1, 3, 3) * 2 - 1
    out = d.nll_bpd(lambda x, t: torch.zeros(x.shape[0], 2, 3, 3), x, progress=True)
    assert out["vb"].shape == (2, T) and torch.isfinite(out["total_bpd"]).all()
    assert (out["vb"] >= 0).all()


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_bad_t_raises():
    d = GaussianDiffusion(NoiseSchedule.linear(100))
    x = torch.zeros(3, 1, 2, 2)
    for bad in (torch.tensor([0, 1, 100]), torch.tensor([-1, 0, 0]), 100, -1):
        with pytest.raises(ValueError, match=r"t must lie in \[0, 100\)"):
            d.q_sample(x, bad)
    with pytest.raises(ValueError, match=r"t must have shape \[3\]"):
        d.q_sample(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"t must have shape \[3\]"):
        d.q_sample(x, torch.zeros(3, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="t must have an integer dtype"):
        d.q_sample(x, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="t must"):
        d.q_sample(x, 1.5)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 100\)"):
        d.training_losses(lambda x, t: x, x, t=torch.tensor([5, 5, 200]))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 100\)"):
        d.p_mean_variance(lambda x, t: x, x, torch.tensor([5, 5, 100]))
    # int32 t is accepted
    d.q_sample(x, torch.tensor([0, 1, 99], dtype=torch.int32))


def test_bad_channels_raise():
    sched = NoiseSchedule.linear(100)
    x = torch.zeros(2, 3, 4, 4)
    t = torch.tensor([1, 2])
    lr = GaussianDiffusion(sched, variance="learned_range", loss="hybrid")
    with pytest.raises(ValueError, match=r"2\*C = 6 channels for variance='learned_range'"):
        lr.p_mean_variance(lambda x, t: torch.zeros_like(x), x, t)
    with pytest.raises(ValueError, match=r"2\*C = 6 channels"):
        lr.training_losses(lambda x, t: torch.zeros_like(x), x)
    fixed = GaussianDiffusion(sched)
    with pytest.raises(ValueError, match=r"C = 3 channels"):
        fixed.p_mean_variance(None, x, t, model_output=torch.zeros(2, 6, 4, 4))
    with pytest.raises(ValueError, match="model output must have shape"):
        fixed.p_mean_variance(None, x, t, model_output=torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match="model output must have shape"):
        fixed.nll_bpd(lambda x, t: torch.zeros(1, 3, 4, 4), x)


def test_shape_mismatch_raises():
    d = GaussianDiffusion(NoiseSchedule.linear(100))
    x = torch.zeros(2, 3, 4, 4)
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="noise must have the shape of x0"):
        d.q_sample(x, t, torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match="noise must have the shape of x0"):
        d.training_losses(lambda x, t: x, x, noise=torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="x0 must have the shape of x_t"):
        d.q_posterior(torch.zeros(2, 3, 4, 3), x, t)
    with pytest.raises(ValueError, match="eps must have the shape of x_t"):
        d.predict_x0_from_eps(x, t, torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="x0 must be a floating-point tensor"):
        d.q_sample(torch.zeros(2, 3, dtype=torch.int64), t)
    with pytest.raises(ValueError, match=r"x0 must have shape \[N, C, \*spatial\]"):
        d.training_losses(lambda x, t: x, torch.zeros(2))
    with pytest.raises(ValueError, match="model must return a torch.Tensor"):
        d.training_losses(lambda x, t: None, x)

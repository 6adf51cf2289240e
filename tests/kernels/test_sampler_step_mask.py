"""The fused step's known-region replacement (mask / known inputs, table columns KA, KZ): the reference
against a float64 closed form, the Triton kernel (interpreter) against the reference, functional and in
place, and FastSampler (its static-buffer loop) against fd.inpaint's eager loop."""
import pytest
import torch

import fastddpm as fd
from fastddpm.ops import use_backend
from fastddpm.ops.philox import philox_normal
from fastddpm.ops.sampler_step import KNOWN_COEFS, sampler_step, sampler_step_
from references import tiny_class_conditional_unet

torch.set_num_threads(1)


def _inputs(n=2, c=3, h=5, w=7, rows=4, learned=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    out = torch.randn(n, (2 if learned else 1) * c, h, w, generator=g)
    if learned:
        out[:, c:] = out[:, c:].clamp(-1, 1)
    coefs = torch.rand(rows, KNOWN_COEFS, generator=g)
    coefs[:, 7], coefs[:, 8] = -5.0, -2.0  # LOG_MIN < LOG_MAX
    known = torch.rand(n, c, h, w, generator=g) * 2 - 1
    mask = (torch.rand(n, c, h, w, generator=g) > 0.5).float()
    hist = [torch.randn(n, c, h, w, generator=g) for _ in range(3)]
    z = torch.randn(n, c, h, w, generator=g)
    return x, out, coefs, known, mask, hist, z


@pytest.mark.parametrize("learned", [False, True])
def test_reference_is_the_closed_form(learned):
    x, out, coefs, known, mask, hist, z = _inputs(learned=learned)
    step = torch.tensor([2])
    plain, x0 = sampler_step(x, out, coefs[:, :11].contiguous(), step, hist[0], z, None, 0, True, learned,
                             hist[1], hist[2])
    got, x0m = sampler_step(x, out, coefs, step, hist[0], z, None, 0, True, learned, hist[1], hist[2], mask, known)
    ka, kz = coefs[2, 11].double(), coefs[2, 12].double()
    want = mask.double() * (ka * known.double() + kz * z.double()) + (1 - mask.double()) * plain.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x0m, x0)  # x0-hat is the update's
    assert (got[mask == 0] == plain[mask == 0]).all()


def test_mask_draws_noise_where_sigma_is_zero():
    """A deterministic sampler's row (SIGMA = 0): the known region still gets KZ * z from the seed's stream."""
    x, out, coefs, known, mask, hist, _ = _inputs()
    coefs[:, 6] = 0.0
    step, seed = torch.tensor([1]), torch.tensor([11])
    got, _ = sampler_step(x, out, coefs, step, None, None, seed, 0, False, False, None, None, mask, known)
    z = philox_normal(seed, tuple(x.shape), step, stream=0)
    want = coefs[1, 11] * known + coefs[1, 12] * z
    torch.testing.assert_close(got[mask == 1], want[mask == 1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("learned,num_hist,given", [(False, 0, True), (True, 0, False), (False, 3, False),
                                                    (False, 1, True)])
def test_kernel_matches_reference(triton_on_cpu, learned, num_hist, given):
    x, out, coefs, known, mask, hist, z = _inputs(learned=learned, h=9, w=11)
    step, seed = torch.tensor([3]), torch.tensor([5])
    h = hist[:num_hist] + [None] * (3 - num_hist)
    noise, sd = (z, None) if given else (None, seed)
    args = (x, out, coefs, step, h[0], noise, sd, 0, True, learned, h[1], h[2], mask, known)
    with use_backend("reference"):
        ref = sampler_step(*args)
    with use_backend("triton"):
        tri = sampler_step(*args)
    for a, b in zip(tri, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_hist", [0, 2])
def test_inplace_kernel_matches_reference(triton_on_cpu, num_hist):
    x, out, coefs, known, mask, hist, _ = _inputs(h=6, w=6)
    model_t = torch.tensor([30, 20, 10, 0])
    seed = torch.tensor([3])
    results = {}
    for backend in ("reference", "triton"):
        xs, hs = x.clone(), [t.clone() for t in hist[:num_hist]] + [None] * (3 - num_hist)
        step, t_out = torch.tensor([1]), torch.zeros(2, dtype=torch.int64)
        with use_backend(backend):
            sampler_step_(xs, out, coefs, step, t_out, model_t, hs[0], seed, 0, True, False, None, hs[1], hs[2],
                          mask, known)
        results[backend] = (xs, [t for t in hs if t is not None], step, t_out)
    (xr, hr, sr, tr), (xt, ht, st, tt) = results["reference"], results["triton"]
    torch.testing.assert_close(xt, xr, rtol=1e-5, atol=1e-5)
    for a, b in zip(ht, hr):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert int(st) == int(sr) == 2 and tt.tolist() == tr.tolist() == [10, 10]


def test_bad_mask_arguments_are_named():
    x, out, coefs, known, mask, _, z = _inputs()
    step = torch.tensor([0])
    with pytest.raises(ValueError, match="mask and known"):
        sampler_step(x, out, coefs, step, None, z, None, 0, True, False, None, None, mask, None)
    with pytest.raises(ValueError, match="coefs must be a float32 tensor \\[S, 13\\]"):
        sampler_step(x, out, coefs[:, :11].contiguous(), step, None, z, None, 0, True, False, None, None, mask, known)
    with pytest.raises(ValueError, match="noise or seed"):
        sampler_step(x, out, coefs, step, None, None, None, 0, True, False, None, None, mask, known)
    with pytest.raises(ValueError, match="mask must be None or a floating-point tensor"):
        sampler_step(x, out, coefs, step, None, z, None, 0, True, False, None, None, mask[:1], known)


@pytest.mark.parametrize("sampler,steps", [("unipc", 5), ("ddpm", 4), ("dpm++", 4)])
def test_fast_sampler_runs_inpainting_as_fd_inpaint(sampler, steps):
    """FastSampler(known=, mask=) (the static-buffer loop a CUDA graph captures) = fd.inpaint(method='replace')."""
    pipe = fd.load(device="cpu")
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    mask = torch.ones(1, 1, 8, 8)
    mask[..., 4:, :] = 0
    eager = fd.inpaint(pipe, image, mask, method="replace", sampler=sampler, steps=steps, seed=4)
    smp = fd.make_sampler(sampler, pipe.diffusion, steps)
    fast = fd.FastSampler(pipe.unet, smp, 3, known=image, mask=mask)
    got = fast(seed=4)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[..., :4, :], image[..., :4, :], rtol=0, atol=1e-6)
    # new inputs into the same buffers
    other = fast(seed=4, known=-image)
    torch.testing.assert_close(other[..., :4, :], -image[..., :4, :], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="known and mask"):
        fd.FastSampler(pipe.unet, smp, 3, known=image)
    with pytest.raises(ValueError, match="mask must hold only 0"):
        fd.FastSampler(pipe.unet, smp, 3, known=image, mask=mask * 0.5)


def test_fast_sampler_x_start_runs_img2img_as_the_eager_loop():
    """FastSampler(...)(seed, x_start=x) (img2img on CUDA) = fastddpm.editing.run_sampler from the same x."""
    from fastddpm.editing import img2img_timesteps, noise_image, run_sampler

    pipe = fd.load(device="cpu")
    ts = img2img_timesteps(pipe.diffusion.schedule, 399, 5, "trailing")
    smp = fd.make_sampler("unipc", pipe.diffusion, spacing=ts)
    image = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x = noise_image(pipe.diffusion, image, 399, torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2)))
    got = fd.FastSampler(pipe.unet, smp, 2)(seed=6, x_start=x)
    want = run_sampler(smp, pipe.unet, x, torch.tensor([6]), None, True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, fd.FastSampler(pipe.unet, smp, 2)(seed=6))  # x_start was used


def test_fast_sampler_with_guidance_equals_eager_inpainting():
    """What fd.inpaint runs on CUDA for a guided class-conditional model (editing._fast_sampler) = its eager loop."""
    from fastddpm.editing import _fast_sampler

    unet = tiny_class_conditional_unet()
    diff = fd.GaussianDiffusion(fd.NoiseSchedule.linear(100))
    image = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    mask = torch.ones(1, 1, 8, 8)
    mask[..., :, 5:] = 0
    y = torch.tensor([2, 0])
    eager = fd.inpaint(unet, image, mask, method="replace", sampler="unipc", steps=5, seed=2, diffusion=diff,
                       labels=y, guidance_scale=2.5)
    smp = fd.make_sampler("unipc", diff, 5)
    fast = _fast_sampler(unet, smp, image, y, 2.5, True, known=image, mask=mask)
    torch.testing.assert_close(fast(seed=2), eager, rtol=1e-5, atol=1e-5)

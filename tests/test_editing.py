"""fd.img2img (SDEdit) and fd.inpaint (RePaint, few-step replacement) on the bundled digits model:
closed forms, plain sampling at strength 1, diffusers' RePaintPipeline given the same noise, input errors."""
import math

import pytest
import torch

import fastddpm as fd
from fastddpm.editing import noise_image, repaint_timesteps, strength_timestep
from fastddpm.ops.philox import philox_normal
from references import tiny_class_conditional_unet

torch.set_num_threads(1)  # a 0.7M-parameter model: one thread is fastest on a shared machine


@pytest.fixture(scope="module")
def pipe():
    return fd.load(device="cpu")


def _images(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1


def _half_mask():
    mask = torch.ones(1, 1, 8, 8)
    mask[..., 4:, :] = 0  # regenerate the bottom half
    return mask


def _philox(seed, shape, counter, stream):
    return philox_normal(torch.tensor([seed]), shape, torch.tensor([counter]), stream=stream)


# ------------------------------------------------------------------------------------------- img2img
def test_strength_names_timestep_and_noising_is_closed_form(pipe):
    T = pipe.diffusion.num_timesteps
    assert strength_timestep(1.0, T) == T - 1
    assert strength_timestep(0.5, T) == 499
    assert strength_timestep(0.3, 10) == 2
    assert strength_timestep(1e-9, T) == 0
    x0 = _images(3).double()
    z = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    for t in (0, 250, T - 1):
        ab = math.prod(1.0 - float(b) for b in pipe.diffusion.schedule.betas[: t + 1])  # product in float64
        want = math.sqrt(ab) * x0 + math.sqrt(1.0 - ab) * z
        torch.testing.assert_close(noise_image(pipe.diffusion, x0, t, z), want, rtol=1e-12, atol=1e-12)


def test_noising_equals_diffusers_add_noise(pipe):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")  # the bundled model's cosine schedule
    x0, z = _images(3), torch.randn(3, 1, 8, 8)
    for t in (0, 333, 999):
        theirs = sched.add_noise(x0, z, torch.tensor([t] * 3))
        # diffusers' alpha_bar is a float32 cumprod of t + 1 terms (relative error up to ~(t + 1) * 6e-8)
        torch.testing.assert_close(noise_image(pipe.diffusion, x0, t, z), theirs, rtol=0, atol=2e-5)


@pytest.mark.parametrize("sampler,steps", [("ddim", 8), ("ddpm", 6), ("unipc", 6), ("dpm++", 5)])
def test_img2img_strength_one_equals_plain_sampling(pipe, sampler, steps):
    """Strength 1: the plain sampler's timesteps, started from the image noised to T-1, same noise."""
    image, seed = _images(2), 3
    ours = fd.img2img(pipe, image, 1.0, steps=steps, sampler=sampler, seed=seed)
    smp = fd.make_sampler(sampler, pipe.diffusion, steps)  # plain sampling's sampler
    T = pipe.diffusion.num_timesteps
    x = noise_image(pipe.diffusion, image, T - 1, _philox(seed, image.shape, 0, 1))
    with torch.no_grad():
        for s, t in enumerate(smp.timesteps.tolist()):
            z = _philox(seed, image.shape, s, 0)
            x = smp.step(pipe.unet(x, torch.full((2,), t)), t, x, noise=z)
    assert (ours - image).abs().max() > 0.1  # regenerated, not copied
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_img2img_spends_steps_model_calls_from_the_strength_timestep(pipe):
    seen = []

    def model(x, t):
        seen.append(int(t[0]))
        return pipe.unet(x, t)

    for strength, steps in ((0.3, 7), (0.05, 4), (1.0, 5)):
        seen.clear()
        fd.img2img(model, _images(1), strength, steps=steps, sampler="unipc", diffusion=pipe.diffusion)
        assert len(seen) == steps
        assert seen[0] == strength_timestep(strength, 1000) and seen == sorted(seen, reverse=True)
    with pytest.raises(ValueError, match="steps"):
        fd.img2img(pipe, _images(1), 0.002, steps=3)  # t_s = 1: at most 2 model calls


def test_img2img_low_strength_stays_near_the_image(pipe):
    image = fd.img2img(pipe, _images(2), 1.0, steps=6, sampler="unipc", seed=0)  # a model sample
    low = fd.img2img(pipe, image, 0.05, steps=4, sampler="ddim", seed=1)
    high = fd.img2img(pipe, image, 0.9, steps=4, sampler="ddim", seed=1)
    assert (low - image).abs().mean() < 0.5 * (high - image).abs().mean()


# ------------------------------------------------------------------------------------------- inpainting
@pytest.mark.parametrize("args", [(1000, 250, 10, 10), (1000, 20, 3, 3), (1000, 17, 4, 2), (50, 100, 5, 1)])
def test_repaint_timesteps_are_diffusers(args):
    diffusers = pytest.importorskip("diffusers")
    T, steps, jl, jn = args
    sched = diffusers.RePaintScheduler(num_train_timesteps=T)
    sched.set_timesteps(steps, jl, jn)
    assert repaint_timesteps(T, steps, jl, jn) == sched.timesteps.tolist()


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_repaint_equals_diffusers_repaint_pipeline_for_the_same_noise(pipe, tmp_path, eta):
    """The exported bundled model in diffusers' RePaintPipeline vs fd.inpaint, both with one torch generator."""
    diffusers = pytest.importorskip("diffusers")
    out = fd.export_diffusers(pipe, str(tmp_path / "digits"))
    unet = diffusers.UNet2DModel.from_pretrained(out, subfolder="unet", low_cpu_mem_usage=False)
    sched = diffusers.RePaintScheduler.from_config(diffusers.DDPMScheduler.load_config(out, subfolder="scheduler"))
    rp = diffusers.RePaintPipeline(unet=unet, scheduler=sched)
    rp.set_progress_bar_config(disable=True)
    image, mask = _images(2, seed=4), _half_mask()
    kw = dict(num_inference_steps=20, jump_length=3, jump_n_sample=2, eta=eta)
    theirs = rp(image, mask, generator=torch.Generator().manual_seed(7), output_type="np", **kw).images
    ours = fd.inpaint(pipe, image, mask, steps=20, jump_length=3, jump_n_sample=2, eta=eta,
                      generator=torch.Generator().manual_seed(7))
    ours_np = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours_np - theirs).max() < 1e-4
    assert (ours[..., 4:, :] - image[..., 4:, :]).abs().max() > 0.1  # generated there
    torch.testing.assert_close(ours[..., :4, :], image[..., :4, :], rtol=0, atol=1e-6)  # kept


def test_repaint_seed_is_per_image(pipe):
    image, mask = _images(3), _half_mask()
    both = fd.inpaint(pipe, image, mask, steps=10, jump_length=2, jump_n_sample=2, seed=5)
    first = fd.inpaint(pipe, image[:2], mask, steps=10, jump_length=2, jump_n_sample=2, seed=5)
    torch.testing.assert_close(both[:2], first, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["unipc", "ddim", "ddpm", "dpm++"])
def test_replace_mode_keeps_the_known_region_and_calls_the_model_steps_times(pipe, sampler):
    calls = []

    def model(x, t):
        calls.append(1)
        return pipe.unet(x, t)

    image, mask = _images(2), _half_mask()
    x = fd.inpaint(model, image, mask, method="replace", sampler=sampler, steps=6, seed=0, diffusion=pipe.diffusion)
    assert len(calls) == 6
    torch.testing.assert_close(x[..., :4, :], image[..., :4, :], rtol=0, atol=0)
    assert (x[..., 4:, :] - image[..., 4:, :]).abs().max() > 0.1


def test_replace_mode_noises_known_region_to_next_timestep(pipe):
    """After step s the known region holds the image noised to timesteps[s+1] with the step's z (stream 0)."""
    from fastddpm.editing import run_sampler

    smp = fd.make_sampler("ddim", pipe.diffusion, 3)
    image, mask = _images(1), _half_mask().expand(1, 1, 8, 8)
    x = torch.randn(1, 1, 8, 8)
    seen = []

    def model(xt, t):
        seen.append(xt.clone())
        return pipe.unet(xt, t)

    run_sampler(smp, model, x, torch.tensor([9]), None, True, known=image, mask=mask)
    ts = smp.timesteps.tolist()
    for s in (0, 1):
        want = noise_image(pipe.diffusion, image, ts[s + 1], _philox(9, image.shape, s, 0))
        torch.testing.assert_close(seen[s + 1][..., :4, :], want[..., :4, :], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------- errors
def test_bad_inputs_name_the_argument(pipe):
    image, mask = _images(2), _half_mask()
    cases = [
        (lambda: fd.img2img(pipe, image, 0.0), "strength"),
        (lambda: fd.img2img(pipe, image, 1.5), "strength"),
        (lambda: fd.img2img(pipe, image, True), "strength"),
        (lambda: fd.img2img(pipe, image, 0.5, sampler="euler"), "sampler"),
        (lambda: fd.img2img(pipe, torch.zeros(2, 3, 8, 8), 0.5), "channels"),
        (lambda: fd.img2img(pipe, torch.zeros(2, 1, 16, 16), 0.5), "image_size"),
        (lambda: fd.img2img(pipe, image * 3, 0.5), r"\[-1, 1\]"),
        (lambda: fd.img2img(pipe, image[0], 0.5), "image must"),
        (lambda: fd.img2img(pipe.unet, image, 0.5), "diffusion"),
        (lambda: fd.img2img(pipe, image, 0.5, seed=1, generator=torch.Generator()), "seed or generator"),
        (lambda: fd.inpaint(pipe, image, mask * 0.5), "mask must hold only 0"),
        (lambda: fd.inpaint(pipe, image, torch.ones(1, 1, 4, 4)), "mask must be a tensor"),
        (lambda: fd.inpaint(pipe, image, torch.ones(3, 1, 8, 8)), "mask must be a tensor"),
        (lambda: fd.inpaint(pipe, image, mask, method="blend"), "method"),
        (lambda: fd.inpaint(pipe, image, mask, sampler="unipc"), "sampler"),
        (lambda: fd.inpaint(pipe, image, mask, eta=2.0), "eta"),
        # eta is refused, not ignored, by a sampler that takes none
        (lambda: fd.img2img(pipe, image, 0.5, sampler="unipc", eta=0.5), r"eta applies to the samplers \('ddim',\)"),
        (lambda: fd.img2img(pipe, image, 0.5, sampler="dpm++sde", eta=0.1), "sampler 'dpm\\+\\+sde' has no eta"),
        (lambda: fd.inpaint(pipe, image, mask, method="replace", eta=1.0), "sampler 'unipc' has no eta"),
        (lambda: fd.inpaint(pipe, image, mask, method="replace", sampler="ddpm", eta=1.0), "eta applies"),
        (lambda: fd.inpaint(pipe, image, mask, jump_length=0), "jump_length"),
        (lambda: fd.inpaint(pipe, image, mask, labels=torch.tensor([0, 1])), "not class-conditional"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            call()


def test_eta_reaches_ddim(pipe):
    """eta, refused (non-zero) by the samplers without one (above), is DDIM's: eta=1 is another sample than 0."""
    image, mask = _images(2), _half_mask()
    kw = dict(sampler="ddim", steps=3, seed=0)
    assert torch.equal(fd.img2img(pipe, image, 0.5, **kw), fd.img2img(pipe, image, 0.5, eta=0.0, **kw))
    assert (fd.img2img(pipe, image, 0.5, eta=1.0, **kw) - fd.img2img(pipe, image, 0.5, **kw)).abs().max() > 1e-2
    u = dict(sampler="unipc", steps=3, seed=0)  # eta = 0 is every sampler's (as `fastddpm sample --eta 0`)
    assert torch.equal(fd.img2img(pipe, image, 0.5, eta=0.0, **u), fd.img2img(pipe, image, 0.5, **u))
    a = fd.inpaint(pipe, image, mask, method="replace", eta=1.0, **kw)
    assert (a - fd.inpaint(pipe, image, mask, method="replace", **kw)).abs().max() > 1e-2


def test_editing_uses_only_the_samplers_public_api(pipe):
    """editing.py reads no `_`-prefixed attribute (of a sampler or anything else); the sampler methods it
    uses instead give what `Sampler.step` computes."""
    import ast
    from pathlib import Path

    import fastddpm.editing as editing

    tree = ast.parse(Path(editing.__file__).read_text(encoding="utf-8"))
    private = [f"{ast.unparse(n)} (line {n.lineno})" for n in ast.walk(tree) if isinstance(n, ast.Attribute)
               and n.attr.startswith("_") and not n.attr.startswith("__")]
    assert private == []
    smp = fd.make_sampler("ddim", pipe.diffusion, 5, eta=1.0)
    x, z = _images(2, seed=1), _images(2, seed=2)
    t = int(smp.timesteps[2])
    with torch.no_grad():
        out = pipe.unet(x, torch.full((2,), t))
    s = smp.row(t)
    assert s == 2 and smp.adds_noise(s) and not fd.make_sampler("ddim", pipe.diffusion, 5).adds_noise(s)
    coefs, rows, _ = smp.device_tables(x.device)
    got, _ = smp.fused_step(x, smp.checked_output(out, x), coefs, rows[s:s + 1], None, z, None, 0, True)
    torch.testing.assert_close(got, smp.step(out, t, x, z), rtol=0, atol=0)
    with pytest.raises(ValueError, match="model_output must have shape"):
        smp.checked_output(out[:, :0], x)
    with pytest.raises(ValueError, match="t must be one of"):
        smp.row(t + 1)


def test_class_conditional_labels_and_guidance(tmp_path):
    """A class-conditional model: labels reach the model; guidance = the GuidedModel combination."""
    unet = tiny_class_conditional_unet()
    diff = fd.GaussianDiffusion(fd.NoiseSchedule.linear(100))
    image, mask = _images(2), _half_mask()
    y = torch.tensor([0, 2])
    a = fd.inpaint(unet, image, mask, method="replace", sampler="ddim", steps=4, diffusion=diff, labels=y)
    b = fd.inpaint(unet, image, mask, method="replace", sampler="ddim", steps=4, diffusion=diff,
                   labels=torch.tensor([1, 1]))
    g1 = fd.inpaint(unet, image, mask, method="replace", sampler="ddim", steps=4, diffusion=diff, labels=y,
                    guidance_scale=1.0)
    assert (a - b).abs().max() > 1e-3  # the labels matter
    torch.testing.assert_close(g1, a, rtol=1e-5, atol=1e-5)  # w = 1 is the conditional model


# ------------------------------------------------------------------------------------------- CLI
def _write_npz(path, images):
    import numpy as np

    from fastddpm.images import to_uint8

    np.savez(path, images=to_uint8(images))
    return str(path)


def test_cli_inpaint_keeps_the_kept_region_and_img2img_writes(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from fastddpm.cli import main
    from fastddpm.images import to_uint8

    image = fd.img2img(fd.load(device="cpu"), _images(3), 1.0, steps=4, sampler="unipc", seed=0)
    src = _write_npz(tmp_path / "in.npz", image)
    out = tmp_path / "out.npz"
    assert main(["inpaint", "--image", src, "--mask", "bottom-half", "--method", "replace", "--steps", "4",
                 "--out", str(out)]) == 0
    got = np.load(out)["images"]
    want = to_uint8(image)
    assert got.shape == want.shape and (got[:, :4] == want[:, :4]).all() and (got[:, 4:] != want[:, 4:]).any()
    # a mask image: white keeps, black is generated
    m = np.full((8, 8), 255, np.uint8)
    m[:, :3] = 0
    Image.fromarray(m).save(tmp_path / "mask.png")
    assert main(["inpaint", "--image", src, "--mask", str(tmp_path / "mask.png"), "--steps", "6", "--jump-length",
                 "2", "--jump-n-sample", "2", "--num", "1", "--out", str(out)]) == 0
    got = np.load(out)["images"]
    assert got.shape[0] == 1 and (got[0, :, 3:] == want[0, :, 3:]).all()
    Image.fromarray(want[0, :, :, 0]).save(tmp_path / "one.png")
    assert main(["img2img", "--image", str(tmp_path / "one.png"), "--strength", "0.3", "--steps", "3",
                 "--out", str(tmp_path / "e.png")]) == 0
    assert Image.open(tmp_path / "e.png").size == (4 * (8 + 2), 4 * (8 + 2))  # one image, padding 1, --scale 4


@pytest.mark.parametrize("argv,flag", [
    (["img2img", "--strength", "0"], "--strength"),
    (["img2img", "--strength", "0.5", "--eta", "3"], "--eta"),
    (["img2img", "--sampler", "unipc", "--eta", "0.5"], "--eta"),
    (["inpaint", "--mask", "bottom-half", "--method", "replace", "--eta", "0.5"], "--eta"),
    (["inpaint", "--mask", "middle"], "--mask"),
    (["inpaint", "--mask", "bottom-half", "--steps", "0"], "--steps"),
    (["inpaint", "--mask", "bottom-half", "--out", "x.unknown"], "--out"),
    (["inpaint", "--mask", "bottom-half", "--jump-length", "0"], "--jump-length"),
])
def test_cli_bad_flags_one_line(tmp_path, capsys, argv, flag):
    from fastddpm.cli import main

    src = _write_npz(tmp_path / "in.npz", _images(1))
    args = argv + ["--image", src] + ([] if "--out" in argv else ["--out", str(tmp_path / "o.png")])
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]


def test_cli_image_of_wrong_size_is_named(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from fastddpm.cli import main

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "big.png")
    assert main(["img2img", "--image", str(tmp_path / "big.png"), "--out", str(tmp_path / "o.png")]) == 1
    err = capsys.readouterr().err
    assert "--image" in err and "16x16" in err and "8x8" in err

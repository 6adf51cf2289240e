"""Image editing with any trained DDPM: img2img (SDEdit) and inpainting (RePaint, and a few-step mode).

    import fastddpm as fd
    pipe = fd.load()                                        # or (model, diffusion=...) for any model(x, t)
    x = fd.img2img(pipe, image, strength=0.5, steps=20, sampler="unipc", seed=0)
    x = fd.inpaint(pipe, image, mask, seed=0)                               # RePaint, 250 steps, r = j = 10
    x = fd.inpaint(pipe, image, mask, method="replace", sampler="unipc", steps=20, seed=0)   # few-step

Images are float NCHW tensors in [-1, 1] with the model's channels and size; masks are 1 where the image
is kept and 0 where it is generated (diffusers' convention), shaped [N or 1, 1 or C, H, W], values 0 / 1.

img2img (SDEdit, Meng et al. 2022). `strength` s in (0, 1] names the start timestep t_s = ceil(s T) - 1
(diffusers' convention: s = 1 starts at the last training timestep, i.e. from (nearly) pure noise: x_{T-1}
keeps sqrt(alpha_bar_{T-1}) of the image, 0.006 on DDPM's linear schedule); the image is noised there in
closed form, x_{t_s} = sqrt(ab[t_s]) x0 + sqrt(1 - ab[t_s]) z, and sampled down to x_0 with the sampler's
spacing applied to the timesteps 0..t_s, so exactly `steps` model calls are spent whatever the strength
(diffusers spends int(steps * s) of them). At s = 1 the timesteps are those of plain sampling.

Inpainting, method="repaint" (Lugmayr et al. 2022): diffusers' RePaintScheduler loop, step for step:
timesteps from `RePaintScheduler.set_timesteps(steps, jump_length, jump_n_sample)` (back-jumps of
`jump_length` steps, `jump_n_sample` - 1 times each), each model step the DDIM(eta) update of the unknown
region and sqrt(ab_prev) x0 + sqrt(1 - ab_prev) z for the known one (the same z), each back-jump the
forward noising x <- sqrt(1 - beta) x + sqrt(beta) z over the T / steps training betas above the timestep.
eta = 1 (the default here, the paper's DDPM sampler: the DDIM(1) update on the respaced schedule is DDPM's
posterior step) or 0 (diffusers' pipeline default). With `generator=` the noise is drawn with torch.randn
in diffusers' order, so the result equals `RePaintPipeline` for the same generator (tests/test_editing.py);
with `seed=` it comes from Philox streams per image (image i does not depend on the batch).

Inpainting, method="replace" (few-step): any sampler; each step also replaces the known region of x by the
image noised to the timestep the step lands on (with the step's own z, as RePaint), and by the image itself
at the end, inside the fused step op (its mask input: `fastddpm.ops.sampler_step`), so `FastSampler(...,
known=, mask=)` and its CUDA graph run it too. One model call per step, no back-jumps: it keeps the known
region exact and the generated one consistent with it only as far as the sampler's few steps allow
(docs/editing.md measures it on the bundled model).

Class-conditional models take `labels` (and `guidance_scale` for classifier-free guidance), as sampling.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from ._names import DEFAULT_STEPS, ETA_SAMPLERS, SAMPLER_NAMES
from .ops.sampler_step import sampler_step
from .schedule import NoiseSchedule
from .spacing import make_timesteps

__all__ = ["img2img", "inpaint", "strength_timestep", "img2img_timesteps", "repaint_timesteps", "noise_image",
           "run_sampler", "known_table", "METHODS"]

METHODS = ("repaint", "replace")
REPLACE_SAMPLER = "unipc"  # method="replace"'s default sampler
# Philox streams (fastddpm.ops.philox): 0 step noise (also the known region's), 1 x_T, as sampling; and
_STREAM_UNDO = 3   # RePaint's back-jumps


# ---------------------------------------------------------------------------------------------- inputs
def _resolve(model_or_pipeline: Any, diffusion: Any) -> Tuple[Any, Any]:
    """(model, diffusion) of a Pipeline, or of a model given with `diffusion`."""
    if hasattr(model_or_pipeline, "unet") and hasattr(model_or_pipeline, "diffusion"):
        return model_or_pipeline.unet, diffusion if diffusion is not None else model_or_pipeline.diffusion
    if not callable(model_or_pipeline):
        raise ValueError(f"model_or_pipeline must be a fastddpm Pipeline (fd.load) or a model(x, t), got "
                         f"{type(model_or_pipeline).__name__}")
    if diffusion is None:
        raise ValueError("diffusion must be given with a bare model (a fastddpm GaussianDiffusion), or pass a Pipeline")
    return model_or_pipeline, diffusion


def _check_image(model: Any, image: Any) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or not image.dtype.is_floating_point:
        raise ValueError(f"image must be a float tensor [N, C, H, W] in [-1, 1], got "
                         f"{getattr(image, 'dtype', type(image).__name__)} {tuple(getattr(image, 'shape', ()))}")
    c, size = getattr(model, "in_channels", None), getattr(model, "image_size", None)
    if c is not None and image.shape[1] != c:
        raise ValueError(f"image must have the model's {c} channels, got {image.shape[1]} (shape {tuple(image.shape)})")
    if size is not None and tuple(image.shape[2:]) != (size, size):
        raise ValueError(f"image must be {size}x{size} (the model's image_size), got {image.shape[2]}x{image.shape[3]}")
    if image.numel() == 0 or not bool(torch.isfinite(image).all()) or float(image.abs().max()) > 1.0 + 1e-6:
        raise ValueError("image must hold finite values in [-1, 1] (fd.images / to_tensor scale 8-bit images so)")
    return image


def _check_mask(mask: Any, image: torch.Tensor) -> torch.Tensor:
    n, c, h, w = image.shape
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4 or mask.shape[0] not in (1, n) \
            or mask.shape[1] not in (1, c) or tuple(mask.shape[2:]) != (h, w):
        raise ValueError(f"mask must be a tensor [{n} or 1, 1 or {c}, {h}, {w}] (1 = keep, 0 = generate), got "
                         f"{tuple(getattr(mask, 'shape', ())) or type(mask).__name__}")
    m = mask.to(torch.float32)
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("mask must hold only 0 (generate) and 1 (keep); threshold a soft mask first (mask > 0.5)")
    return m.expand(n, c, h, w).to(image.device)


def _check_choice(name: str, value: Any, accepted: Sequence[str]) -> str:
    if value not in accepted:
        raise ValueError(f"{name} must be one of {tuple(accepted)}, got {value!r}")
    return value


def _check_eta(eta: Any, sampler: str) -> float:
    """`eta` as a float (0 if None); a non-zero eta is refused, rather than ignored, by a sampler that takes
    none (as `fastddpm sample --eta`)."""
    if eta is None:
        return 0.0
    if eta != 0 and sampler not in ETA_SAMPLERS:
        raise ValueError(f"eta applies to the samplers {ETA_SAMPLERS} (and inpaint's method='repaint') only; "
                         f"sampler {sampler!r} has no eta, got eta={eta!r}")
    return float(eta)


def _check_int(name: str, value: Any, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo or (hi is not None and value > hi):
        accepted = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an int {accepted}, got {value!r}")
    return int(value)


def _check_seed(seed: Any, generator: Any) -> None:
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None:
        _check_int("seed", seed, 0, 2**63 - 1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def _conditioned(model: Any, labels: Any, guidance_scale: Any, n: int, device: torch.device) -> Callable:
    """model(x, t) with the class labels (and classifier-free guidance) of sampling."""
    if labels is None:
        if guidance_scale is not None:
            raise ValueError("guidance_scale needs labels (classifier-free guidance of a class-conditional model)")
        return model
    num_classes = getattr(model, "num_classes", None)
    if not num_classes:
        raise ValueError("labels were given but the model is not class-conditional (num_classes is None)")
    from .guards import check_labels

    labels = torch.as_tensor(labels, device=device)
    check_labels(labels, num_classes, "labels")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) (one per image), got {tuple(labels.shape)}")
    if guidance_scale is None:
        return lambda x, t: model(x, t, y=labels)
    from .guidance import GuidedModel

    return GuidedModel(model, labels, guidance_scale, num_classes, int(model.in_channels)).to(device)


def _output(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else getattr(out, "sample", out)


# ---------------------------------------------------------------------------------------------- img2img
def strength_timestep(strength: Any, num_timesteps: int) -> int:
    """The start timestep ceil(strength * T) - 1 that `strength` in (0, 1] names (1: T - 1)."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"strength must be a number in (0, 1] (1 = from pure noise), got {strength!r}")
    return max(0, min(num_timesteps - 1, math.ceil(float(strength) * num_timesteps - 1e-9) - 1))


def img2img_timesteps(schedule: NoiseSchedule, t_start: int, steps: int, spacing: str) -> List[int]:
    """`steps` descending timesteps from `t_start` down: `spacing` applied to the timesteps 0..t_start."""
    head = NoiseSchedule(schedule.betas[: t_start + 1])  # same alpha_bar on 0..t_start
    _check_int("steps", steps, 1, t_start + 1)
    return make_timesteps(head, steps, spacing)


def noise_image(diffusion: Any, image: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ab[t]) image + sqrt(1 - ab[t]) noise (coefficients in float64, cast once)."""
    ab = diffusion.schedule.alphas_cumprod[t]
    a, b = float(ab.sqrt()), float((1.0 - ab).sqrt())
    wdt = torch.promote_types(image.dtype, torch.float32)  # fp32 math, fp64 for fp64 inputs
    return (a * image.to(wdt) + b * noise.to(device=image.device, dtype=wdt)).to(image.dtype)


def _draw(shape: Sequence[int], seed_t: Optional[torch.Tensor], generator: Optional[torch.Generator], counter: int,
          stream: int, device: torch.device, image_offset: int = 0) -> torch.Tensor:
    """Standard normals: Philox (seed, image, counter, stream) or torch.randn(generator)."""
    if seed_t is None:
        return torch.randn(tuple(shape), generator=generator, device=generator.device).to(device)
    from .ops.philox import philox_normal

    step = torch.tensor([counter], dtype=torch.int64, device=device)
    return philox_normal(seed_t, tuple(shape), step, stream=stream, image_offset=image_offset, device=device)


@torch.no_grad()
def img2img(model_or_pipeline: Any, image: torch.Tensor, strength: float = 0.5, *, steps: Optional[int] = None,
            sampler: str = "ddim", spacing: Optional[str] = None, eta: Optional[float] = None,
            seed: Optional[int] = None, generator: Optional[torch.Generator] = None, diffusion: Any = None,
            clip_denoised: bool = True, labels: Any = None, guidance_scale: Any = None) -> torch.Tensor:
    """SDEdit: noise `image` to the timestep `strength` names and sample back with `steps` model calls.

    Args:
        model_or_pipeline: a `fastddpm.Pipeline` (fd.load) or a model(x, t) given with `diffusion`.
        image: [N, C, H, W] in [-1, 1], the model's channels and size.
        strength: in (0, 1]: how much is regenerated (1: from pure noise, see the module docstring).
        steps: model calls (default: the sampler's default, at most the start timestep + 1).
        sampler: a name of `fd.make_sampler` ("ddpm", "ddim", "dpm++", "unipc", ...).
        eta: DDIM's stochasticity in [0, 1] (default 0); a non-zero eta is refused by the other samplers.
        spacing: the timestep spacing (default: the sampler's).
        seed / generator: Philox seed (default 0; image i depends only on (seed, i)) or a torch.Generator.
        clip_denoised: clamp x0-hat to [-1, 1] at every step.
        labels, guidance_scale: class labels (and classifier-free guidance) of a class-conditional model.

    Returns the edited images, [N, C, H, W] in image's dtype.
    """
    from ._names import DEFAULT_SPACING
    from .samplers import make_sampler

    model, diffusion = _resolve(model_or_pipeline, diffusion)
    image = _check_image(model, image)
    _check_choice("sampler", sampler, SAMPLER_NAMES)
    eta = _check_eta(eta, sampler)
    _check_seed(seed, generator)
    T = diffusion.num_timesteps
    t_start = strength_timestep(strength, T)
    n_steps = steps if steps is not None else min(DEFAULT_STEPS[sampler] or T, t_start + 1)
    ts = img2img_timesteps(diffusion.schedule, t_start, n_steps, spacing or DEFAULT_SPACING[sampler])
    smp = make_sampler(sampler, diffusion, eta=eta, spacing=ts)
    seed_t = _seed_tensor(seed, generator, image.device)
    x = noise_image(diffusion, image, t_start, _draw(image.shape, seed_t, generator, 0, 1, image.device))
    if _graphable(image, generator, labels, guidance_scale, model):
        fast = _fast_sampler(model, smp, image, labels, guidance_scale, clip_denoised)
        return fast(seed=int(seed or 0), x_start=x).to(image.dtype)
    fn = _conditioned(model, labels, guidance_scale, image.shape[0], image.device)
    return run_sampler(smp, fn, x, seed_t, generator, clip_denoised)


def _graphable(image: torch.Tensor, generator: Any, labels: Any, guidance_scale: Any, model: Any) -> bool:
    """Whether editing runs FastSampler (a CUDA graph per step): CUDA, Philox seeds, an nn.Module, and no
    labels or labels with guidance (FastSampler's class conditioning is classifier-free guidance)."""
    return (image.device.type == "cuda" and generator is None and isinstance(model, torch.nn.Module)
            and (labels is None or guidance_scale is not None))


def _fast_sampler(model: Any, smp: Any, image: torch.Tensor, labels: Any, guidance_scale: Any, clip: bool,
                  **known: Any) -> Any:
    """A FastSampler running what `run_sampler` runs (tests: the two agree), with labels / guidance."""
    from .graphs import FastSampler

    _conditioned(model, labels, guidance_scale, image.shape[0], image.device)  # the same label checks
    return FastSampler(model, smp, image.shape[0], clip_denoised=clip, labels=labels, guidance_scale=guidance_scale,
                       **known)


def _seed_tensor(seed: Optional[int], generator: Optional[torch.Generator], device: torch.device):
    if generator is not None:
        return None
    return torch.tensor([0 if seed is None else int(seed)], dtype=torch.int64, device=device)


def known_table(smp: Any, device: torch.device) -> torch.Tensor:
    """The sampler's float32 table with the known-region columns KA, KZ appended ([S, 13], the op's layout)."""
    from .samplers import known_region_coefs

    coefs = smp.coefs.to(torch.float64)
    return torch.cat([coefs, known_region_coefs(smp)], dim=1).to(device=device, dtype=torch.float32)


@torch.no_grad()
def run_sampler(smp: Any, model: Callable, x: torch.Tensor, seed_t: Optional[torch.Tensor],
                generator: Optional[torch.Generator], clip: bool, known: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`smp`'s loop from a given x (its first timestep's), one model call and one fused step per timestep.

    Step noise as `Sampler.sample`: Philox stream 0 of `seed_t` (or torch.randn with `generator`). With
    `known` and `mask`, the fused step also replaces the known region by `known` noised to the timestep
    the step lands on, with the step's own z (the op's mask input; `known` itself after the last step).
    """
    coefs, steps, model_t = smp.device_tables(x.device)
    masked = known is not None
    if masked:
        if getattr(smp, "thresholding", None) is not None or getattr(smp, "clip_range", 1.0) != 1.0:
            raise ValueError("sampler: known-region replacement runs the plain fused step; a sampler with "
                             "thresholding or clip_sample_range != 1 is not supported")
        coefs = known_table(smp, x.device)
        known, mask = known.to(x.dtype).contiguous(), mask.to(x.dtype).contiguous()
    n, S, k = x.shape[0], smp.num_steps, smp.num_history
    hist: List[Optional[torch.Tensor]] = [torch.zeros_like(x) for _ in range(k)] + [None] * (3 - k)
    for s in range(S):
        out = smp.checked_output(_output(model(x, model_t[s].expand(n))), x)
        noise, seed_arg = None, None
        if smp.adds_noise(s) or masked:
            if generator is not None:
                noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
            else:
                seed_arg = seed_t
        if masked:
            x, x0 = sampler_step(x, out, coefs, steps[s:s + 1], hist[0], noise, seed_arg, 0, bool(clip),
                                 smp.learned_range, hist[1], hist[2], mask, known)
        else:
            x, x0 = smp.fused_step(x, out, coefs, steps[s:s + 1], hist[0], noise, seed_arg, 0, bool(clip),
                                   *hist[1:k])
        if k:
            hist = [x0] + hist[:k - 1] + [None] * (3 - k)
    return x


# ---------------------------------------------------------------------------------------------- inpainting
def repaint_timesteps(num_timesteps: int, steps: int, jump_length: int = 10, jump_n_sample: int = 10) -> List[int]:
    """The timesteps of diffusers' `RePaintScheduler.set_timesteps(steps, jump_length, jump_n_sample)`: the
    walk down in units of T // steps, going back up `jump_length` units `jump_n_sample` - 1 times at every
    multiple of `jump_length` (a repeated, larger timestep is a back-jump, not a model call)."""
    steps = min(num_timesteps, _check_int("steps", steps, 1))
    jump_length = _check_int("jump_length", jump_length, 1)
    jump_n_sample = _check_int("jump_n_sample", jump_n_sample, 1)
    jumps = {j: jump_n_sample - 1 for j in range(0, steps - jump_length, jump_length)}
    out: List[int] = []
    t = steps
    while t >= 1:
        t -= 1
        out.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                out.append(t)
    stride = num_timesteps // steps
    return [v * stride for v in out]


def _repaint_loop(model: Callable, diffusion: Any, image: torch.Tensor, mask: torch.Tensor, ts: List[int],
                  stride: int, eta: float, seed_t: Optional[torch.Tensor], generator: Optional[torch.Generator],
                  clip: bool) -> torch.Tensor:
    """RePaint as diffusers' RePaintPipeline runs it (see the module docstring), noise in its order."""
    from .samplers import DDIMSampler

    smp = DDIMSampler(diffusion, steps=sorted(set(ts), reverse=True), eta=eta)
    coefs, rows, _ = smp.device_tables(image.device)
    ab = diffusion.schedule.alphas_cumprod
    betas = diffusion.schedule.betas
    n, dev = image.shape[0], image.device
    x = _draw(image.shape, seed_t, generator, 0, 1, dev).to(image.dtype)
    t_last = ts[0] + 1
    for i, t in enumerate(ts):
        if t < t_last:  # a model step from t to t - stride
            out = smp.checked_output(_output(model(x, torch.full((n,), t, dtype=torch.int64, device=dev))), x)
            z = _draw(image.shape, seed_t, generator, i, 0, dev)
            s = smp.row(t)
            unknown, _ = smp.fused_step(x, out, coefs, rows[s:s + 1], None, z if smp.adds_noise(s) else None, None, 0,
                                        bool(clip))
            ab_prev = float(ab[t - stride]) if t - stride >= 0 else 1.0
            known = (math.sqrt(ab_prev) * image.float() + math.sqrt(1.0 - ab_prev) * z).to(x.dtype)
            x = torch.lerp(unknown, known, mask.to(x.dtype))
        else:  # a back-jump: forward noising over the `stride` training steps above t_last
            for j in range(stride):
                beta = float(betas[t_last + j])
                z = _draw(image.shape, seed_t, generator, i * stride + j, _STREAM_UNDO, dev)
                x = (math.sqrt(1.0 - beta) * x.float() + math.sqrt(beta) * z).to(x.dtype)
        t_last = t
    return x


@torch.no_grad()
def inpaint(model_or_pipeline: Any, image: torch.Tensor, mask: torch.Tensor, *, method: str = "repaint",
            steps: Optional[int] = None, sampler: Optional[str] = None, spacing: Optional[str] = None,
            jump_length: int = 10, jump_n_sample: int = 10, eta: Optional[float] = None, seed: Optional[int] = None,
            generator: Optional[torch.Generator] = None, diffusion: Any = None, clip_denoised: bool = True,
            labels: Any = None, guidance_scale: Any = None) -> torch.Tensor:
    """Fill the region where `mask` is 0 with what the model generates around the kept region (mask 1).

    Args:
        model_or_pipeline: a `fastddpm.Pipeline` (fd.load) or a model(x, t) given with `diffusion`.
        image: [N, C, H, W] in [-1, 1] (the model's channels and size); only its kept region is read.
        mask: [N or 1, 1 or C, H, W] of 0 / 1, 1 = keep (diffusers' convention).
        method: "repaint" (diffusers' RePaintScheduler loop; `steps` default 250, `jump_length`,
            `jump_n_sample`, `eta` default 1.0 = DDPM) or "replace" (few-step: `sampler` default "unipc",
            `steps` its default, `spacing`, `eta` default 0, only for "ddim").
        seed / generator: Philox seed (default 0; image i depends only on (seed, i)) or a torch.Generator
            (RePaint then draws its noise in diffusers' order: equal to RePaintPipeline's result).
        clip_denoised: clamp x0-hat to [-1, 1] (diffusers' clip_sample).
        labels, guidance_scale: class labels (and classifier-free guidance) of a class-conditional model.

    Returns the inpainted images [N, C, H, W]; the kept region equals `image` there (to float rounding).
    """
    model, diffusion = _resolve(model_or_pipeline, diffusion)
    image = _check_image(model, image)
    mask = _check_mask(mask, image)
    _check_choice("method", method, METHODS)
    _check_seed(seed, generator)
    seed_t = _seed_tensor(seed, generator, image.device)
    fn = _conditioned(model, labels, guidance_scale, image.shape[0], image.device)
    if method == "repaint":
        if sampler not in (None, "ddpm"):
            raise ValueError(f"sampler must be None or 'ddpm' with method='repaint' (its own DDPM/DDIM(eta) loop), "
                             f"got {sampler!r}; method='replace' runs any sampler")
        eta = 1.0 if eta is None else float(eta)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        T = diffusion.num_timesteps
        n_steps = 250 if steps is None else steps
        ts = repaint_timesteps(T, n_steps, jump_length, jump_n_sample)
        return _repaint_loop(fn, diffusion, image, mask, ts, T // min(T, n_steps), eta, seed_t, generator,
                             clip_denoised)
    from ._names import DEFAULT_SPACING
    from .samplers import make_sampler

    name = _check_choice("sampler", sampler or REPLACE_SAMPLER, SAMPLER_NAMES)
    smp = make_sampler(name, diffusion, steps, _check_eta(eta, name), spacing=spacing or DEFAULT_SPACING[name])
    if _graphable(image, generator, labels, guidance_scale, model):
        fast = _fast_sampler(model, smp, image, labels, guidance_scale, clip_denoised, known=image, mask=mask)
        return fast(seed=int(seed or 0)).to(image.dtype)
    x = _draw(image.shape, seed_t, generator, 0, 1, image.device).to(image.dtype)
    return run_sampler(smp, fn, x, seed_t, generator, clip_denoised, known=image, mask=mask)

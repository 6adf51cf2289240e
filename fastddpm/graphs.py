"""FastSampler: the sampling loop on static device buffers, replayed from a captured CUDA graph.

Everything a step touches is allocated once on the model's device: x, the previous x0-hats
(multistep solvers: one to three), the per-step coefficient table [S, 11], the model-timestep table [S], the step counter
and the Philox seed (int64 [1] tensors), the model's timestep input t (int64 [N]) and the fused
kernel's completion counter (int32 [1]). One step is the model call and ONE op:

    out = model(x, t)
    fastddpm.ops.sampler_step_(x, out, coefs, step, t, model_timesteps, x0_prev, seed=seed, x0_prev2=..., x0_prev3=...)
        # in place: x <- x_{t-1}, x0_prev3 <- x0_prev2 <- x0_prev <- x0-hat, step += 1,
        # t[:] = model_timesteps[min(step, S-1)]

so no kernel argument that changes between steps is a Python number: the same launches replayed S
times walk through the S rows of the tables with fresh Philox noise at every step. `t` is set to the
first model timestep by `_reset`, outside the graph. On CUDA the step is
warmed up on a side stream (Triton compilation and autotuning happen there, before capture), captured
once in a `torch.cuda.CUDAGraph` and replayed once per timestep (`capture="step"`), or the whole loop is
captured as one graph (`capture="loop"`). On the CPU the same static-buffer loop runs eagerly.

Sampling never records an autograd graph (`__call__` runs under ``torch.no_grad()``) and always runs
the model in eval mode: a model in train mode is switched to eval for the call (dropout would
otherwise be captured into the graph) and every submodule's mode is restored afterwards. Capture,
the side stream, the graph's memory pool and every replay run under the model device's guard
(``torch.cuda.device``), so a model on a non-current GPU is captured on its own device's stream.
Before capturing, a configuration that cannot be captured is refused with a ValueError: warmup=0
(Triton would compile and autotune inside the capture) and a model compiled with CUDA graphs of its
own (``torch.compile(mode="reduce-overhead" | "max-autotune")``: graphs cannot nest).

Image i of seed s is a pure function of (s, i): x_T and every step's noise come from Philox counters
(element, image, step, stream), so the result does not depend on the batch size, and equals
`sampler.sample(model, shape, seed=s)` to float rounding.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence, Union

import torch

from .guards import check_labels, raise_if_nonfinite
from .guidance import GuidedModel
from .ops.sampler_step import sampler_step_
from .ops.philox import philox_normal
from .threads import call_threads

CAPTURE_MODES = ("auto", "step", "loop", "none")


class CudaGraphAPI:
    """The CUDA calls FastSampler makes to capture and replay; tests swap in a recording stand-in."""

    def side_stream(self, device: torch.device) -> Any:
        return torch.cuda.Stream(device=device)

    def on_stream(self, stream: Any) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream)

    def join(self, stream: Any, device: torch.device) -> None:
        """Make the current stream wait for `stream` (and the side stream for the current one)."""
        torch.cuda.current_stream(device).wait_stream(stream)

    def fork(self, stream: Any, device: torch.device) -> None:
        stream.wait_stream(torch.cuda.current_stream(device))

    def capture(self, fn: Callable[[], None], device: torch.device) -> Any:
        """Record `fn`'s launches into a CUDA graph and return it (has .replay())."""
        graph = torch.cuda.CUDAGraph()
        # torch.cuda.graph captures on a stream (and a memory pool) of the *current* device
        with torch.cuda.device(device), torch.cuda.graph(graph):
            fn()
        return graph

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)


def _modules(model: Any) -> list:
    return list(model.modules()) if isinstance(model, torch.nn.Module) else []


@contextlib.contextmanager
def _eval_mode(model: Any):
    """Every submodule in eval mode inside the block, each one's own mode restored after."""
    modes = [(m, m.training) for m in _modules(model)]
    for m, _ in modes:
        m.training = False
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was


def _check_capturable(model: Any, warmup: int, capture: str) -> None:
    """ValueError for what cannot be captured into FastSampler's CUDA graph."""
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 with capture={capture!r}: Triton compiles and autotunes its "
                         "kernels on first use, which must happen before the capture, not inside it")
    # torch.compile(module) / torch.compile(fn) objects, and modules compiled in place (module.compile())
    compiled = [model] + _modules(model)
    compiled += [getattr(m, "_compiled_call_impl", None) for m in _modules(model)]
    for c in compiled:
        get_config = getattr(c, "get_compiler_config", None) if c is not None else None
        config = get_config() if callable(get_config) else None
        if isinstance(config, dict) and config.get("triton.cudagraphs"):
            raise ValueError("the model was compiled with CUDA graphs of its own (torch.compile mode "
                             "'reduce-overhead' or 'max-autotune'), which cannot be captured inside "
                             f"FastSampler's graph (capture={capture!r}): compile with mode=None or "
                             "'max-autotune-no-cudagraphs', or use capture='none'")


class FastSampler:
    """A sampler bound to one model, batch size and image shape, with all buffers allocated once.

    Args:
        model: model(x, t) -> output (or a class-conditional model(x, t, y=...) with `labels`).
        sampler: a fastddpm sampler (DDPM, DDIM, DPM-Solver++ 2M / 3M, UniPC; its tables are reused).
        batch_size: images per call.
        image_shape: (C, H, W); default (model.in_channels, model.image_size, model.image_size).
        dtype: the dtype the model runs in ("fp32", "bf16", "fp16" or a torch dtype; default: its
            parameters' dtype): the weights are cast once (a copy) and each call's output comes back as
            fp32; x, the previous x0-hat and the coefficient tables always stay fp32
            (fastddpm.precision).
        labels: int64 [batch_size] class labels for classifier-free guidance (needs `guidance_scale`).
        guidance_scale: the guidance weight w; one batched model call per step evaluates both branches.
        null_label: the unconditional class (default model.num_classes, fd.UNet's null class).
        clip_denoised: clamp x0-hat to [-1, 1] at every step.
        capture: "auto" (a per-step CUDA graph on CUDA, eager elsewhere), "step", "loop" (the whole
            loop in one graph) or "none".
        warmup: eager steps run on a side stream before capture (compilation, autotuning, allocator);
            at least 1 when capturing.
        graph_api: the object that performs stream/graph calls (default: real CUDA).
        progress: show a tqdm bar over the steps of each call (updated on the host between replays,
            outside any captured graph; with capture="loop" the one replay is one update).
        known, mask: inpainting's known-region replacement (`fd.inpaint(method="replace")`): the image
            [batch_size or 1, C, H, W] in [-1, 1] and a 0/1 mask (1 = keep) broadcastable to it. Every fused
            step also replaces the kept region by the image noised to the timestep it lands on (the op's mask
            input), inside the captured graph; `__call__(seed, known=..., mask=...)` swaps new ones in.
    """

    def __init__(self, model: Callable[..., Any], sampler: Any, batch_size: int,
                 image_shape: Optional[Sequence[int]] = None, dtype: Optional[torch.dtype] = None, *,
                 labels: Optional[torch.Tensor] = None, guidance_scale: Union[float, torch.Tensor, None] = None,
                 null_label: Optional[int] = None, clip_denoised: bool = True, capture: str = "auto",
                 warmup: int = 2, graph_api: Optional[CudaGraphAPI] = None, progress: bool = False,
                 known: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if capture not in CAPTURE_MODES:
            raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {capture!r}")
        if getattr(sampler, "thresholding", None) is not None:
            raise ValueError("the sampler applies dynamic thresholding (thresholding=True in the scheduler config), "
                             "a per-image quantile that FastSampler does not capture: use sampler.sample(model, shape)")
        if not hasattr(sampler, "device_tables"):
            raise ValueError(f"sampler must be a fastddpm sampler (DDPMSampler, DDIMSampler, DPMSolverSampler), "
                             f"got {type(sampler).__name__}")
        param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        self.device = param.device if param is not None else torch.device("cpu")
        from .precision import parse_dtype, reduced_precision

        self.model_dtype = parse_dtype(dtype) or (param.dtype if param is not None else torch.float32)
        self.dtype = torch.float32  # the sampler state; only the model runs in model_dtype
        model = reduced_precision(model, self.model_dtype)
        if image_shape is None:
            try:
                image_shape = (model.in_channels, model.image_size, model.image_size)
            except AttributeError:
                raise ValueError("image_shape is required for a model without in_channels/image_size") from None
        self.shape = (batch_size, *(int(v) for v in image_shape))
        self.sampler = sampler
        self.clip = bool(clip_denoised)
        if (labels is None) != (guidance_scale is None):
            raise ValueError("labels and guidance_scale must be given together (classifier-free guidance)")
        if labels is not None:
            null_label = getattr(model, "num_classes", None) if null_label is None else null_label
            if null_label is None:
                raise ValueError("null_label is required for a model without num_classes")
            labels = torch.as_tensor(labels, device=self.device)
            check_labels(labels, null_label, "labels")
            if labels.shape != (batch_size,):
                raise ValueError(f"labels must have shape ({batch_size},) (one per image), got {tuple(labels.shape)}")
            model = GuidedModel(model, labels, guidance_scale, null_label, self.shape[1]).to(self.device)
        self.model = model

        # ---- static buffers: nothing below is reallocated per call or per step
        self.coefs, _, self.model_timesteps = sampler.device_tables(self.device)
        self.num_steps = int(self.coefs.shape[0])
        self.step = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.seed = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.x = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        k = sampler.num_history
        # the previous x0-hats, most recent first (None beyond the sampler's history)
        self.history = [torch.zeros_like(self.x) if i < k else None for i in range(3)]
        # the model's timestep input, rewritten by the fused step for the next step
        self.t = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        # completion counter of the fused in-place kernel (0 between launches)
        self.done = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.known = self.mask = None
        if (known is None) != (mask is None):
            raise ValueError("known and mask must be given together (inpainting), or neither")
        if known is not None:
            self._init_known(sampler, known, mask)

        use_cuda = self.device.type == "cuda"
        if capture == "auto":
            capture = "step" if use_cuda else "none"
        if capture != "none" and not use_cuda and graph_api is None:
            raise ValueError(f"capture={capture!r} needs a CUDA model; use capture='none' or 'auto' on {self.device}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
        if capture != "none":
            _check_capturable(model, warmup, capture)
        self.capture_mode = capture
        self.graph_api = graph_api or (CudaGraphAPI() if capture != "none" else None)
        self.warmup = warmup
        self.progress = bool(progress)
        self.graph: Any = None

    def _init_known(self, sampler: Any, known: torch.Tensor, mask: torch.Tensor) -> None:
        """Static known / mask buffers and the [S, 13] table with the known-region columns."""
        from .samplers import known_region_coefs

        if getattr(sampler, "clip_range", 1.0) != 1.0:
            raise ValueError("known/mask: the sampler's clip_sample_range != 1 is not supported with inpainting")
        self.known = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        self.mask = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        self._set_known(known, mask)
        table = torch.cat([sampler.coefs.to(torch.float64), known_region_coefs(sampler)], dim=1)
        self.coefs = table.to(device=self.device, dtype=torch.float32)

    def _set_known(self, known: torch.Tensor, mask: torch.Tensor) -> None:
        for name, t in (("known", known), ("mask", mask)):
            if not isinstance(t, torch.Tensor) or t.ndim != len(self.shape):
                raise ValueError(f"{name} must be a tensor broadcastable to {self.shape}, got {getattr(t, 'shape', t)}")
            try:
                torch.broadcast_shapes(tuple(t.shape), self.shape)
            except RuntimeError:
                raise ValueError(f"{name} must be broadcastable to {self.shape}, got {tuple(t.shape)}") from None
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must hold only 0 (generate) and 1 (keep)")
        self.known.copy_(known.expand(self.shape))
        self.mask.copy_(mask.expand(self.shape))

    # ------------------------------------------------------------------------------ one step
    def _reset(self, seed: int) -> None:
        self.seed.fill_(int(seed))
        self.step.zero_()
        self.t.fill_(self.model_timesteps[0])
        self.done.zero_()
        self.x.copy_(philox_normal(self.seed, self.shape, self.step, stream=1, device=self.device))
        for h in self.history:
            if h is not None:
                h.zero_()

    def _step(self) -> None:
        out = self.model(self.x, self.t)
        if not isinstance(out, torch.Tensor):
            out = out.sample  # diffusers' UNet2DModel output (an attribute: dispatches nothing)
        # one op: reads only the first C channels of a 2C output unless learned_range
        h = self.history
        sampler_step_(self.x, out, self.coefs, self.step, self.t, self.model_timesteps, h[0], self.seed, 0,
                      self.clip, self.sampler.learned_range, self.done, h[1], h[2], self.mask, self.known)

    def _loop(self) -> None:
        for _ in range(self.num_steps):
            self._step()

    # ------------------------------------------------------------------------------ capture
    def _capture(self) -> None:
        api, dev = self.graph_api, self.device
        body = self._step if self.capture_mode == "step" else self._loop
        side = api.side_stream(dev)
        api.fork(side, dev)
        with api.on_stream(side):  # warm-up: compiles/autotunes every kernel before capture
            self._reset(0)
            for _ in range(self.warmup):
                self._step()
        api.join(side, dev)
        self._reset(0)
        self.graph = api.capture(body, dev)

    @torch.no_grad()
    def __call__(self, seed: int = 0, *, known: Optional[torch.Tensor] = None,
                 mask: Optional[torch.Tensor] = None, x_start: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Draw `batch_size` images for `seed` (image i is the same for any batch size).

        No autograd graph is recorded; the model runs in eval mode (its modes are restored after).
        `known` / `mask`: new inpainting inputs for a FastSampler built with them (copied into its buffers).
        `x_start`: start from this x (the sampler's first timestep's, e.g. img2img's noised image) instead
        of the seed's x_T; the step noise still comes from `seed`.
        """
        if x_start is not None and (not isinstance(x_start, torch.Tensor) or tuple(x_start.shape) != self.shape):
            raise ValueError(f"x_start must be a tensor of shape {self.shape}, got {getattr(x_start, 'shape', x_start)}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        if known is not None or mask is not None:
            if self.known is None:
                raise ValueError("known/mask: this FastSampler was built without them (pass them to the constructor)")
            self._set_known(known if known is not None else self.known, mask if mask is not None else self.mask)
        # the model's device current (streams, graph pool, Triton launches use the current device)
        guard = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with guard, _eval_mode(self.model), call_threads(self.model, self.device):
            return self._run(seed, x_start)

    def _run(self, seed: int, x_start: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.capture_mode != "none" and self.graph is None:
            self._capture()
        self._reset(seed)
        if x_start is not None:
            self.x.copy_(x_start)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.num_steps, desc=f"{type(self.sampler).__name__} (FastSampler)", unit="step")
        if self.graph is None or self.capture_mode == "step":
            step = self._step if self.graph is None else self.graph.replay
            for _ in range(self.num_steps):
                step()
                if bar is not None:  # on the host, between replays: never inside a captured graph
                    bar.update(1)
        else:
            self.graph.replay()
            if bar is not None:
                bar.update(self.num_steps)
        if bar is not None:
            bar.close()
        # one check after the loop (the steps stay one op each); only a failure replays them to find the step
        raise_if_nonfinite(self.x, lambda: self._eager_steps(seed, x_start), type(self).__name__,
                           self.sampler._model_timesteps.tolist())
        return self.x.clone()

    def _eager_steps(self, seed: int, x_start: Optional[torch.Tensor] = None):
        self._reset(seed)
        if x_start is not None:
            self.x.copy_(x_start)
        for _ in range(self.num_steps):
            self._step()
            yield self.x

    @classmethod
    def from_checkpoint(cls, checkpoint: Optional[str] = None, sampler: Optional[str] = None,
                        steps: Optional[int] = None, *, spacing: Optional[str] = None, eta: float = 0.0,
                        batch_size: int = 16, use_ema: bool = True, device: Any = "cpu",
                        **kwargs: Any) -> "FastSampler":
        """A FastSampler for a checkpoint (None: the bundled digits model) with what `fastddpm sample`
        uses by default: the default sampler and steps, and the checkpoint's tuned schedule for them
        when one is stored (`fastddpm tune-steps`; see `fastddpm.tune.sampler_for_checkpoint`)."""
        from . import build
        from . import checkpoint as ckpt
        from .student import is_distilled, student_for
        from .tune import sampler_for_checkpoint

        path = ckpt.resolve_checkpoint(checkpoint)
        model, diffusion, config = build.load_model(path, use_ema=use_ema, device=device)
        if is_distilled(config):  # a `fastddpm distill` student set: `steps` = the student's model calls
            model, smp = student_for(model, diffusion, config, steps)
            return cls(model, smp, batch_size, **kwargs)
        smp = sampler_for_checkpoint(path, diffusion, sampler, steps, spacing, eta)
        return cls(model, smp, batch_size, **kwargs)

    @classmethod
    def from_diffusers(cls, pipeline_or_unet: Any, scheduler: Any = None, *, sampler: Optional[str] = None,
                       steps: Optional[int] = None, eta: float = 0.0, batch_size: int = 16, convert: bool = True,
                       **kwargs: Any) -> "FastSampler":
        """Build a FastSampler from a diffusers pipeline (or a UNet2DModel and its scheduler).

        `pipeline_or_unet` may be a pipeline, a UNet2DModel (with `scheduler`), or the path of a local
        pipeline folder (what `pipeline.save_pretrained` writes; a Hub id is passed to diffusers).
        The diffusion (betas in float64, prediction and variance types), the timesteps and clip_sample
        come from the scheduler (see `fastddpm.interop.schedulers`: every DDPM/DDIM config option is
        reproduced or refused). With `convert` a UNet2DModel is
        mapped into fd.UNet so its GroupNorms and attentions run the fused ops; otherwise (or for any
        other eps-model callable) the model is called as it is and only the step is fused.
        """
        import os

        from .interop.schedulers import sampler_from_scheduler

        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"steps must be a positive int or None, got {steps!r}")
        if isinstance(pipeline_or_unet, (str, os.PathLike)):  # a pipeline folder (or a Hub id)
            from .interop.diffusers import load_diffusers_pipeline

            pipeline_or_unet = load_diffusers_pipeline(pipeline_or_unet)
        unet = getattr(pipeline_or_unet, "unet", pipeline_or_unet)
        scheduler = scheduler if scheduler is not None else getattr(pipeline_or_unet, "scheduler", None)
        if scheduler is None:
            raise ValueError(f"scheduler is required with a bare model ({type(unet).__name__}); a pipeline "
                             "(or a pipeline folder's path) brings its own")
        smp, clip = sampler_from_scheduler(scheduler, sampler, steps, eta)
        kwargs.setdefault("clip_denoised", clip)
        config = getattr(unet, "config", None)
        if convert and type(unet).__name__ == "UNet2DModel":
            from .interop.diffusers import unet_from_diffusers

            param = next(unet.parameters())
            unet = unet_from_diffusers(unet).to(device=param.device, dtype=param.dtype).eval()
        elif config is not None and "image_shape" not in kwargs:
            size = config.sample_size
            size = size if isinstance(size, int) else size[0]
            kwargs["image_shape"] = (config.in_channels, size, size)
        return cls(unet, smp, batch_size, **kwargs)

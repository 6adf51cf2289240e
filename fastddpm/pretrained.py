"""`fd.load(path)`: a trained model ready to sample in one line, like diffusers' `DDPMPipeline.from_pretrained`.

    import fastddpm as fd
    pipe = fd.load("runs/cifar")                 # a run directory (its newest checkpoint), a checkpoint
                                                 # directory, a .safetensors export, a diffusers pipeline
                                                 # folder, or None: the bundled digits model
    images = pipe(batch_size=16, seed=0).images  # PIL images, as a diffusers pipeline returns
    x = pipe(16, sampler="ddim", num_inference_steps=50, output_type="pt").images   # tensor in [-1, 1]
    pipe.unet, pipe.diffusion, pipe.sampler("dpm++", 20)

`fd.load` is the one entry point for pretrained weights. There is no `UNet.from_pretrained`: the
loaders (`fastddpm.checkpoint`, `fastddpm.interop`) import the U-Net, so a U-Net method that reached
them would close an import circle (tests/test_layering.py counts lazy imports too); and a U-Net alone
does not sample: a checkpoint's diffusion (schedule, prediction, variance) comes with it. `pipe.unet`
is the `fd.UNet`.

Sampling: `FastSampler` (static buffers; a CUDA graph on CUDA), one per (sampler, steps, eta, batch
size), built on first use and reused. Image i of a seed is the same whatever the batch size. For a
diffusers folder the default sampler reproduces its scheduler's config (`fastddpm.interop.schedulers`);
for fastddpm checkpoints it is DPM-Solver++(2M), 20 steps, as `fastddpm sample`. For a distilled checkpoint
(`fastddpm distill`, e.g. `fd.load("digits-distilled")`) `num_inference_steps` is the student's model calls K
(default: the most it holds) and the sampler is that student's deterministic DDIM.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from . import build
from . import checkpoint as ckpt
from ._names import SAMPLER_NAMES
from .graphs import FastSampler
from .images import to_pil, to_uint8
from .samplers import make_sampler
from .student import is_distilled, student_for
from .threads import call_threads

__all__ = ["load", "Pipeline", "PipelineOutput", "OUTPUT_TYPES"]

OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class PipelineOutput:
    """What a pipeline call returns: `images` as PIL images ("pil"), uint8 NHWC numpy ("np") or a float
    [-1, 1] NCHW tensor ("pt")."""

    images: Union[List[Any], Any, torch.Tensor]


class Pipeline:
    """A model, its diffusion and a default sampler; call it to draw images.

    Attributes:
        unet: the model (an `fd.UNet`, in eval mode).
        diffusion: its `GaussianDiffusion`.
        config: the checkpoint config ({"model": ..., "diffusion": ...}) or, for a diffusers folder,
            {"model": UNet kwargs, "scheduler": the scheduler config}.
        source: the file or folder it was loaded from.
    """

    def __init__(self, unet: torch.nn.Module, diffusion: Any, config: Dict[str, Any], source: str,
                 scheduler: Any = None):
        self.unet = unet
        self.diffusion = diffusion
        self.config = config
        self.source = source
        self.scheduler = scheduler  # a diffusers folder's scheduler: its config sets the default sampler
        self._fast: Dict[Tuple[Any, ...], FastSampler] = {}

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return (int(self.unet.in_channels), int(self.unet.image_size), int(self.unet.image_size))

    def to(self, device: Union[str, torch.device]) -> "Pipeline":
        """Move the model (and future samplers) to `device`."""
        self.unet.to(device)
        self._fast.clear()
        return self

    def sampler(self, name: Optional[str] = None, steps: Optional[int] = None, eta: float = 0.0) -> Tuple[Any, bool]:
        """(sampler, clip_denoised) by name (:data:`fastddpm._names.SAMPLER_NAMES`); None: the default (a
        diffusers folder's scheduler, else ``DEFAULT_SAMPLER``, as ``fastddpm sample``). steps None: the
        sampler's default. A fastddpm checkpoint's tuned schedule for (name, steps) is used when it stores
        one (``fastddpm tune-steps``), as ``fastddpm sample`` does: the same images for the same seed."""
        if name is not None and name not in SAMPLER_NAMES:
            raise ValueError(f"sampler must be one of {SAMPLER_NAMES} or None, got {name!r}")
        if self.scheduler is not None:
            from .interop.schedulers import sampler_from_scheduler

            return sampler_from_scheduler(self.scheduler, name, steps, eta)
        from .tune import sampler_for_checkpoint

        return sampler_for_checkpoint(self.source, self.diffusion, name, steps, eta=eta), True

    def __call__(self, batch_size: int = 1, *, seed: int = 0, sampler: Optional[str] = None,
                 num_inference_steps: Optional[int] = None, eta: float = 0.0, output_type: str = "pil",
                 progress: bool = False) -> PipelineOutput:
        """Draw `batch_size` images for `seed` (image i depends only on (seed, i)).

        Args:
            batch_size: number of images.
            seed: Philox seed.
            sampler, num_inference_steps, eta: see :meth:`sampler`.
            output_type: "pil" (a list of PIL images), "np" (uint8 NHWC) or "pt" (float [-1, 1] NCHW).
            progress: a progress bar over the steps.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if getattr(self.unet, "num_classes", None):
            raise ValueError("this model is class-conditional: sample it with fd.FastSampler(pipe.unet, sampler, "
                             "batch_size, labels=..., guidance_scale=...) or `fastddpm sample --class-label`")
        net = self.unet
        if is_distilled(self.config):  # a `fastddpm distill` student set: num_inference_steps = its model calls
            net, smp = student_for(self.unet, self.diffusion, self.config, num_inference_steps)
            clip = True
        else:
            smp, clip = self.sampler(sampler, num_inference_steps, eta)
        with call_threads(self.unet, self.device):  # one thread for a small CPU model, as the CLI chooses
            x = self._sample(net, smp, clip, batch_size, seed, sampler, num_inference_steps, eta, progress)
        if output_type == "pt":
            return PipelineOutput(x)
        return PipelineOutput(to_pil(x) if output_type == "pil" else to_uint8(x))

    def _sample(self, net: Any, smp: Any, clip: bool, batch_size: int, seed: int, sampler: Optional[str],
                num_inference_steps: Optional[int], eta: float, progress: bool) -> torch.Tensor:
        if getattr(smp, "thresholding", None) is not None:  # dynamic thresholding: the eager loop
            with torch.no_grad():
                x = smp.sample(self.unet, (batch_size, *self.image_shape), seed=seed, clip_denoised=clip,
                               progress=progress, device=self.device)
        else:
            key = (sampler, num_inference_steps, float(eta), batch_size)
            fast = self._fast.get(key)
            if fast is None:
                fast = self._fast[key] = FastSampler(net, smp, batch_size, clip_denoised=clip)
            fast.progress = bool(progress)
            x = fast(seed=seed)
        return x

    def __repr__(self) -> str:
        return f"Pipeline(source={self.source!r}, unet={type(self.unet).__name__}, diffusion={self.diffusion!r})"


def _is_diffusers_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json"))


def load(path: Optional[str] = None, *, device: Union[str, torch.device, None] = None, use_ema: bool = True,
         dtype: Optional[torch.dtype] = None) -> Pipeline:
    """A :class:`Pipeline` from a fastddpm checkpoint, run directory, .safetensors export or a diffusers
    pipeline folder (its UNet2DModel converted to `fd.UNet`, its scheduler's config reproduced).

    Args:
        path: the checkpoint / run directory / file / diffusers folder; None: the bundled digits model.
        device: where to put the model (default: CUDA when available, else the CPU).
        use_ema: fastddpm checkpoints: the EMA weights (default) or the raw ones.
        dtype: cast the model (e.g. torch.bfloat16); default float32.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available here (use device='cpu')")
    if path is not None and _is_diffusers_folder(os.path.expanduser(os.fspath(path))):
        from .interop.diffusers import load_diffusers_pipeline, unet_config_from_diffusers, unet_from_diffusers
        from .interop.schedulers import diffusion_from_scheduler

        folder = os.path.expanduser(os.fspath(path))
        pipe = load_diffusers_pipeline(folder)
        if getattr(pipe, "unet", None) is None or getattr(pipe, "scheduler", None) is None:
            raise ValueError(f"{folder!r}: a diffusers pipeline without a unet and a scheduler")
        unet = unet_from_diffusers(pipe.unet).float().eval()
        diffusion = diffusion_from_scheduler(pipe.scheduler)
        config = {"model": unet_config_from_diffusers(pipe.unet.config), "scheduler": dict(pipe.scheduler.config)}
        out = Pipeline(unet, diffusion, config, folder, scheduler=pipe.scheduler)
    else:
        model, diffusion, config = build.load_model(path, use_ema=use_ema, device="cpu")
        out = Pipeline(model, diffusion, config, ckpt.resolve_checkpoint(path))
    out.unet.to(device=device, dtype=dtype or torch.float32).eval()
    return out

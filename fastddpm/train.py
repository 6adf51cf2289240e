"""Training: :class:`TrainConfig`, :func:`train`, and the loop (:class:`TrainLoop`, :class:`DiffusionTrainLoop`):
AdamW + warm-up, grad clipping, EMA, bf16 autocast, torch.compile, DDP, exact resume.

    from fastddpm.train import TrainConfig, train
    result = train(TrainConfig(dataset="digits", base_channels=32, channel_mults=(1, 2),
                               attention_resolutions=(4,), steps=2000, out_dir="runs/digits"))

or ``fastddpm train --dataset digits ...`` (flags mirror :class:`TrainConfig`), or under
``torchrun --nproc_per_node N -m fastddpm train ...`` for data-parallel training (gloo on CPU, nccl on
CUDA; each process gets ``batch_size / N`` images of every step's global batch).

Reproducibility and exact resume. A "step" consumes one global batch, whether the update is applied
or skipped (non-finite loss or gradient norm: decided on the device, no host sync in a step; see the
comment in the loop). Everything random in a step is a function of (seed, rank, step):
the data order is DistributedSampler's (seed, epoch) permutation, and the flips, timesteps, noise
and label dropout are drawn from generators seeded from (seed, rank, step). Dropout uses torch's
global RNG, whose state is saved in every checkpoint and restored on resume. So a run resumed from
its checkpoint at step s takes exactly the same steps s+1, s+2, ... as the uninterrupted run
(bit for bit on the same machine and thread count).

Outputs in ``out_dir``: ``checkpoints/step_*/`` (see :mod:`fastddpm.checkpoint`; the last ``keep``
are kept), ``log.jsonl`` (one JSON object per ``log_every`` steps: step, loss, lr, grad_norm, skipped,
it_per_s, time; cut back to the resumed step on resume), ``samples/step_*.png`` (EMA samples every
``sample_every`` steps), ``train.lock`` (pid and host of the process training there; empty when none).

Resuming (``resume``): :func:`resume_config` merges a saved run's settings with the ones given (the
CLI's ``--resume``); :func:`train` prints ``resuming from step N (path)`` and each changed setting,
refuses model/diffusion changes by name, and with ``resume_fallback`` falls back to the newest older
checkpoint that loads. Under DDP every collective waits at most ``ddp_timeout`` seconds; a failed or
stalled rank ends every rank with a :class:`DistributedError` naming it.

Where things live: the loop here (:class:`TrainLoop` takes another objective and batch source by
overriding ``get_batch`` and ``compute_loss``; see its docstring), the run directory's lock, resume
and config comparison in :mod:`fastddpm.run_dir`, the torchrun plumbing in :mod:`fastddpm.dist_util`,
checkpoint files in :mod:`fastddpm.checkpoint`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from ._names import DEFAULT_DDP_TIMEOUT, SAMPLER_NAMES
from .build import build_diffusion
from .data import ImageDataset, load_dataset
from .dist_util import DistributedError, ddp_failure, dist_info, join_process_group, resolve_device
from .guidance import Conditioned
from .images import save_grid
from . import run_files
from .run_dir import (CHECKPOINT_FIELDS, RunLockError, check_resumable, config_changes, format_changes,
                      load_for_resume, lock_run, resume_checkpoint, resume_message, run_dir_of, saved_run_config)
from .run_files import InterruptFlag, TrainInterrupted
from .samplers import make_sampler

__all__ = ["TrainConfig", "TrainResult", "TrainLoop", "DiffusionTrainLoop", "NonFiniteLossError", "RunLockError",
           "DistributedError", "TrainInterrupted", "train", "run_training", "resume_config", "saved_run_config", "config_changes", "format_changes",
           "dataset_defaults", "dataset_shape", "model_config", "diffusion_config", "resolve_device"]


class NonFiniteLossError(RuntimeError):
    """Raised when the loss was non-finite for ``max_nonfinite`` consecutive steps."""


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as JSON ("train") in every checkpoint.

    Data: dataset (spec for :func:`fastddpm.data.load_dataset`: "digits", a folder, an .npz, ...),
    image_size (None: the dataset's), random_flip, channels (None: infer), class_cond (train a
    class-conditional model on the dataset's labels), p_uncond (probability of replacing a label by
    the null class, for classifier-free guidance).
    Model (fastddpm.UNet): base_channels, channel_mults, num_res_blocks, attention_resolutions,
    dropout, num_heads, head_channels, time_embedding ("add" | "scale_shift"), groups, learn_sigma.
    Diffusion: schedule ("linear" | "cosine"), num_timesteps, prediction ("eps" | "x0" | "v"),
    variance ("fixed_small" | "fixed_large" | "learned_range"; learn_sigma=True requires
    "learned_range"), loss ("simple" | "vlb" | "hybrid").
    Optimisation: steps (total), batch_size (global, divided among DDP processes), lr, weight_decay,
    adam_beta1/2, warmup_steps (linear LR warm-up from lr/warmup_steps), grad_clip (max global norm;
    0 disables), ema_decay (0 disables the EMA), ema_warmup (decay min(ema_decay, (1+n)/(10+n)) after
    n updates), amp ("auto": bf16 autocast on CUDA; "bf16"; "none"), compile (None: on when CUDA
    is present), seed, device ("auto", "cpu", "cuda", "cuda:1").
    Outputs: out_dir, save_every, keep (last K checkpoints; 0 keeps all), sample_every (0: never),
    sample_num, sample_sampler (a name of `samplers.SAMPLER_NAMES`), sample_steps, log_every, progress (tqdm
    bar on rank 0).
    Robustness: resume (False; True: continue from out_dir's newest checkpoint, or start afresh if
    there is none; or a checkpoint path), resume_fallback (when the newest checkpoint does not load,
    resume from the newest older one that does, instead of stopping), max_nonfinite (stop after this
    many non-finite losses in a row; seen at the next log, checkpoint or sample step, since a step
    does not read the device), ddp_timeout (seconds a data-parallel process waits for its peers
    before the run stops, naming the rank that failed), overwrite (replace the run out_dir holds: its
    config.json, log.jsonl, checkpoints/ and samples/ are removed first; without it a fresh run refuses a
    directory holding any of them).
    Nothing of the user's is lost: the first Ctrl-C / SIGTERM saves a checkpoint of the current step and
    stops (TrainInterrupted, a KeyboardInterrupt, says where; a second one stops at once); resuming an
    older checkpoint moves the run's newer checkpoints to ``superseded/`` and the log lines past it to
    ``log.superseded.jsonl``; the lock file, config.json and log are never written through a link.
    """

    # data
    dataset: str = "digits"
    image_size: Optional[int] = None
    random_flip: bool = False
    channels: Optional[int] = None
    class_cond: bool = False
    p_uncond: float = 0.1
    # model
    base_channels: int = 64
    channel_mults: Tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: Tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_heads: int = 1
    head_channels: Optional[int] = None
    time_embedding: str = "add"
    groups: int = 32
    learn_sigma: bool = False
    # diffusion
    schedule: str = "linear"
    num_timesteps: int = 1000
    prediction: str = "eps"
    variance: str = "fixed_small"
    loss: str = "simple"
    # optimisation
    steps: int = 10000
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_steps: int = 500
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    amp: str = "auto"
    compile: Optional[bool] = None
    seed: int = 0
    device: str = "auto"
    # outputs
    out_dir: str = "runs/fastddpm"
    save_every: int = 1000
    keep: int = 3
    sample_every: int = 0
    sample_num: int = 64
    sample_sampler: str = "dpm++"
    sample_steps: int = 20
    log_every: int = 10
    progress: bool = True
    # robustness
    resume: Union[bool, str] = False
    resume_fallback: bool = False
    overwrite: bool = False
    max_nonfinite: int = 10
    ddp_timeout: float = DEFAULT_DDP_TIMEOUT

    def validate(self) -> "TrainConfig":
        """Check every field; raise ValueError naming the field and the accepted values."""
        def pos_int(name: str, minimum: int = 1) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")

        def choice(name: str, options: Sequence[str]) -> None:
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {tuple(options)}, got {getattr(self, name)!r}")

        def nonneg_float(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")

        for n in ("steps", "batch_size", "base_channels", "num_res_blocks", "num_timesteps", "num_heads", "groups",
                  "sample_num", "sample_steps", "log_every", "max_nonfinite"):
            pos_int(n)
        for n in ("warmup_steps", "save_every", "keep", "sample_every", "seed"):
            pos_int(n, 0)
        for n in ("lr", "weight_decay", "grad_clip", "ddp_timeout"):
            nonneg_float(n)
        if self.ddp_timeout <= 0:
            raise ValueError(f"ddp_timeout must be > 0 seconds, got {self.ddp_timeout!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        for n in ("p_uncond", "ema_decay", "adam_beta1", "adam_beta2"):
            v = getattr(self, n)
            if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ValueError(f"{n} must be in [0, 1), got {v!r}")
        choice("schedule", ("linear", "cosine"))
        choice("prediction", ("eps", "x0", "v"))
        choice("variance", ("fixed_small", "fixed_large", "learned_range"))
        choice("loss", ("simple", "vlb", "hybrid"))
        choice("time_embedding", ("add", "scale_shift"))
        choice("amp", ("auto", "bf16", "none"))
        choice("sample_sampler", SAMPLER_NAMES)
        if (self.variance == "learned_range") != bool(self.learn_sigma):
            raise ValueError("learn_sigma=True goes with variance='learned_range' (and only with it); got "
                             f"learn_sigma={self.learn_sigma!r}, variance={self.variance!r}")
        if self.compile not in (None, True, False):
            raise ValueError(f"compile must be None, True or False, got {self.compile!r}")
        if not isinstance(self.resume, (bool, str)):
            raise ValueError(f"resume must be a bool or a checkpoint path, got {self.resume!r}")
        if not isinstance(self.overwrite, bool):
            raise ValueError(f"overwrite must be True or False, got {self.overwrite!r}")
        if self.overwrite and self.resume:
            raise ValueError("overwrite=True (--overwrite) replaces the run in out_dir and resume (--resume) continues "
                             "it: give one of them")
        if not self.seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.out_dir, str) or not self.out_dir.strip():
            raise ValueError(f"out_dir must be a folder path, got {self.out_dir!r}")
        if not isinstance(self.channel_mults, (list, tuple)) or not self.channel_mults:
            raise ValueError(f"channel_mults must be a non-empty list of positive ints, got {self.channel_mults!r}")
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        return self

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mults"] = list(self.channel_mults)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; accepted: {sorted(names)}")
        return cls(**d)


# The bundled digits model's recipe (docs/training.md, "The bundled model"): what `fastddpm train --dataset digits`
# trains without further flags.
DIGITS_RECIPE: Dict[str, Any] = dict(
    base_channels=32, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,), groups=8, dropout=0.0,
    schedule="cosine", num_timesteps=1000, steps=14000, batch_size=64, lr=1e-3, warmup_steps=100, ema_decay=0.999,
    save_every=1000, keep=3, sample_every=2000, log_every=50)
# Ho et al.'s CIFAR-10 model (35.7M parameters), the TrainConfig defaults' architecture, with its
# optimisation settings (their run took 800k steps; `steps` keeps TrainConfig's default).
DDPM_CIFAR10_RECIPE: Dict[str, Any] = dict(
    base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,), groups=32,
    dropout=0.1, schedule="linear", num_timesteps=1000, batch_size=128, lr=2e-4, warmup_steps=5000,
    ema_decay=0.9999)
# channel multipliers for larger images (one level per halving down to 4-8 pixels; the widths of
# Improved DDPM's ImageNet 64 / LSUN 128-256 models), attention at 16x16, no dropout, smaller lr and batch
_LARGE_MULTS = ((64, (1, 2, 3, 4)), (128, (1, 1, 2, 3, 4)), (256, (1, 1, 2, 2, 4, 4)))


def _fit_levels(image_size: int, mults: Tuple[int, ...], attention: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """`mults` cut to as many levels as `image_size` halves into (the U-Net needs it divisible by
    2**(levels - 1)), and the attention resolution moved to the level nearest `attention`."""
    levels = len(mults)
    while levels > 1 and image_size % 2 ** (levels - 1):
        levels -= 1
    resolutions = [image_size // 2 ** lvl for lvl in range(levels)]
    nearest = min(resolutions, key=lambda r: (abs(r - attention), r))
    return tuple(mults[:levels]), (nearest,)


def dataset_defaults(spec: str, channels: int, image_size: int) -> Dict[str, Any]:
    """The TrainConfig settings that fit a dataset of `channels` x `image_size`^2 images (`spec`: its
    dataset spec), applied over TrainConfig's defaults and under the user's own settings:

    * up to 16 pixels (the bundled 8x8 digits): the bundled model's recipe (:data:`DIGITS_RECIPE`,
      0.7M parameters), attention at half the image size;
    * 17-32 pixels (CIFAR-10, MNIST resized to 32): Ho et al.'s CIFAR-10 model (:data:`DDPM_CIFAR10_RECIPE`);
    * larger: the same blocks with one more level per doubling (channel multipliers (1, 2, 3, 4) at
      64, (1, 1, 2, 3, 4) at 128, (1, 1, 2, 2, 4, 4) from 256), attention at 16x16, no dropout,
      lr 1e-4, batch 64.

    Sizes that do not halve evenly keep fewer levels (28 -> 28, 14, 7). A dict of TrainConfig fields.
    """
    del spec, channels  # the architecture depends on the size alone; kept for the caller's record
    if image_size <= 16:
        d = dict(DIGITS_RECIPE)
        d["channel_mults"], d["attention_resolutions"] = _fit_levels(image_size, (1, 2), max(1, image_size // 2))
    elif image_size <= 32:
        d = dict(DDPM_CIFAR10_RECIPE)
        d["channel_mults"], d["attention_resolutions"] = _fit_levels(image_size, (1, 2, 2, 2), 16)
    else:
        mults = next((m for size, m in _LARGE_MULTS if image_size <= size), _LARGE_MULTS[-1][1])
        d = dict(DDPM_CIFAR10_RECIPE, dropout=0.0, lr=1e-4, batch_size=64)
        d["channel_mults"], d["attention_resolutions"] = _fit_levels(image_size, mults, 16)
    return d


def dataset_shape(spec: str, image_size: Optional[int] = None, channels: Optional[int] = None) -> Tuple[int, int]:
    """(channels, image_size) of the images `fastddpm train --dataset spec` trains on, after the
    ``image_size`` / ``channels`` conversions (the digits without loading them)."""
    if spec == "digits" and image_size is not None and channels is not None:
        return channels, image_size
    if spec == "digits":
        return channels or 1, image_size or 8
    ds = load_dataset(spec, image_size=image_size, channels=channels)
    return ds.channels, ds.image_size


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank)."""

    step: int
    losses: List[float] = field(default_factory=list)  # this process's run, one per step (NaN when skipped)
    skipped: int = 0
    checkpoint: Optional[str] = None
    out_dir: str = ""
    model: Optional[torch.nn.Module] = None  # the trained model (unwrapped: no DDP / compile)
    ema: Optional[torch.nn.Module] = None  # its EMA copy (None when ema_decay = 0)


def model_config(cfg: TrainConfig, image_size: int, channels: int, num_classes: Optional[int]) -> Dict[str, Any]:
    """UNet keyword arguments of a training config."""
    return dict(image_size=image_size, in_channels=channels, base_channels=cfg.base_channels,
                channel_mults=list(cfg.channel_mults), num_res_blocks=cfg.num_res_blocks,
                attention_resolutions=list(cfg.attention_resolutions), dropout=float(cfg.dropout),
                num_heads=cfg.num_heads, head_channels=cfg.head_channels, time_embedding=cfg.time_embedding,
                learn_sigma=bool(cfg.learn_sigma), num_classes=num_classes, groups=cfg.groups)


def diffusion_config(cfg: TrainConfig) -> Dict[str, Any]:
    """The checkpoint's "diffusion" entry of a training config (see :func:`fastddpm.build.build_diffusion`)."""
    return dict(schedule=cfg.schedule, num_timesteps=cfg.num_timesteps, prediction=cfg.prediction,
                variance=cfg.variance, loss=cfg.loss)


def resume_config(saved: Dict[str, Any], explicit: Dict[str, Any]) -> Tuple[TrainConfig, List[Tuple[str, Any, Any]]]:
    """The configuration of a resumed run: the saved run's settings, overridden by those given (``explicit``).

    Returns (config, changes) with changes = [(name, saved value, new value)] for every setting that
    differs; :func:`train` prints them when it resumes. Raises ValueError naming the settings when
    a change would make the checkpoint unusable (model architecture or diffusion: CHECKPOINT_FIELDS).
    Saved fields this version does not know are dropped.
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    base = {k: v for k, v in saved.items() if k in names and k != "overwrite"}  # a run control, never carried on
    cfg = TrainConfig.from_dict({**base, **explicit}).validate()
    changes = config_changes(base, cfg.to_dict())
    refused = [c for c in changes if c[0] in CHECKPOINT_FIELDS and c[1] is not None]
    if refused:
        raise ValueError(f"cannot resume with other model/diffusion settings than the checkpoint's ("
                         f"{format_changes(refused)}): its weights need the saved ones. Drop these flags, or "
                         "start a new run in another --out-dir")
    return cfg, changes


# ------------------------------------------------------------------------------------------ helpers
def _mix(*xs: int) -> int:
    """A 63-bit seed from integers (splitmix64 style), so (seed, rank, step) streams do not collide."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h ^= (int(x) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def _load_optimizer_state(opt: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """``opt.load_state_dict(state)``, keeping ``opt``'s implementation ("fused", "foreach", "capturable").

    load_state_dict takes every group setting from the saved dict: a checkpoint of the foreach AdamW
    (written before training used the fused one) would turn the optimizer back into foreach, which
    cannot skip an update on the device. With our flags in the groups, torch also moves the saved step
    counts (CPU tensors under foreach) to the parameters' device as float32, the fused layout."""
    saved = state["param_groups"]
    if len(saved) == len(opt.param_groups):  # else load_state_dict raises its own error
        flags = ("fused", "foreach", "capturable")
        saved = [{**g, **{k: ours[k] for k in flags if k in ours}} for g, ours in zip(saved, opt.param_groups)]
    opt.load_state_dict({**state, "param_groups": saved})


def _ema_update(ema_params: List[torch.Tensor], params: List[torch.Tensor], updates: torch.Tensor,
                finite: torch.Tensor, ema_decay: float, warmup: bool) -> None:
    """ema += (1 - decay) * finite * (param - ema), decay = min(ema_decay, (1 + n) / (10 + n)) after n
    updates (``warmup``) or ema_decay; all on the device, so a skipped step (finite False) leaves the EMA
    as it was without a host sync. Three multi-tensor launches: torch's foreach lerp takes a tensor weight
    only as one tensor per parameter, which is a kernel per parameter."""
    decay = torch.full((), ema_decay, dtype=torch.float64, device=updates.device)
    if warmup:
        n = updates.to(torch.float64)
        decay = torch.minimum(decay, (1 + n) / (10 + n))
    weight = ((1.0 - decay) * finite).to(ema_params[0].dtype)
    with torch.no_grad():
        delta = torch._foreach_sub(params, ema_params)
        torch._foreach_mul_(delta, weight)
        torch._foreach_add_(ema_params, delta)


def _rng_state(device: torch.device) -> Dict[str, Any]:
    st: Dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(st["cpu"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


# ------------------------------------------------------------------------------------------ the loop
class TrainLoop:
    """The optimisation loop shared by every trainer: AdamW with linear warm-up, gradient clipping,
    non-finite steps skipped on the device, EMA, bf16 autocast, torch.compile, DDP (under torchrun),
    JSONL log and progress bar, sample grids, atomic checkpoints and exact resume in ``cfg.out_dir``.

    Extension point. A subclass supplies the objective and the data by overriding two methods:

    * ``get_batch(step) -> batch``: this process's batch for the step about to run (``step`` counts the
      steps already taken, 0 at the start). Called once per step, in order, outside autocast; the
      batch is any object ``compute_loss`` understands. For exact resume it must be a function of
      ``(cfg.seed, self.rank, step)`` and fixed data only, never of how many batches came before:
      draw its randomness from :meth:`generators` (``step``) and index data by ``step``.
    * ``compute_loss(batch) -> Tensor``: the scalar loss to minimise, under autocast when amp is on.
      Call ``self.train_model`` (the model as wrapped in DDP / torch.compile: its gradients are the
      ones all-reduced), not ``self.model``. Do not read the device (``.item()``, ``bool(t)``): a step
      has no host sync; the loop judges finiteness on the device and reads losses at log steps.

    :class:`DiffusionTrainLoop` is the DDPM one (images from a dataset, ``diffusion.training_losses``).
    The rest is shared and can be used as it is: build the model (on ``device``, its initial weights
    the same on every rank), its diffusion and the run's config dict (``"model"``: the model's keyword
    arguments, ``"diffusion"``, ``"train"``: ``cfg.to_dict()``, anything else), then
    ``Loop(cfg, model, diffusion, config, rank=..., world=..., device=..., distributed=...).run()`` inside
    :func:`run_training` (device, process group under torchrun, run lock, peer failures), as :func:`train`
    does. Resuming refuses a checkpoint whose "model" or "diffusion" entry differs from ``config``'s.
    Sample grids (``cfg.sample_every``) sample ``diffusion`` with the EMA model at the shape of
    ``config["model"]`` (``in_channels``, ``image_size``, ``num_classes``). Hooks with a default that a
    subclass may also override: :meth:`lr_at` (the schedule), :meth:`sample_grid`, :meth:`train_module` (what
    DDP / torch.compile wrap: a module around the model whose forward is the loss keeps DDP at one forward
    per step), :meth:`log_extras` (more fields per log record), :meth:`saved_train_config` (where a
    checkpoint keeps its TrainConfig), and the attributes ``command`` (the CLI name messages use) and
    ``train_mode`` (False keeps dropout off while training). :class:`fastddpm.distillation.DistillLoop` is
    the other subclass. Of ``cfg`` the loop
    reads the optimisation, output and robustness fields (steps, lr, weight_decay, adam_beta1/2,
    warmup_steps, grad_clip, ema_decay, ema_warmup, amp, compile, seed, out_dir, save_every, keep,
    sample_*, log_every, progress, resume, resume_fallback, max_nonfinite); the data and model fields
    are the subclass's and its builder's.
    """

    command = "train"  # the CLI command its messages name
    train_mode = True  # the model's mode while training (False: dropout off, e.g. distilling a deterministic map)

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, diffusion: Any, config: Dict[str, Any], *,
                 rank: int = 0, world: int = 1, device: torch.device = torch.device("cpu"),
                 distributed: bool = False):
        self.cfg, self.model, self.diffusion, self.config = cfg, model, diffusion, config
        self.rank, self.world, self.device, self.distributed = rank, world, device, distributed
        self.is_main = rank == 0
        self.run_dir = os.path.abspath(cfg.out_dir)
        self.log_path = os.path.join(self.run_dir, "log.jsonl")
        self.ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema_decay > 0 else None
        # fused: the one AdamW of torch that skips an update on the device (`found_inf`, see train_step); it
        # has CPU and CUDA kernels for the float32 parameters used here (the CPU one since torch 2.4, below
        # setup.py's bound), so both devices take one path
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                     weight_decay=cfg.weight_decay, fused=True)
        self.params = list(model.parameters())
        self.ema_params = list(self.ema.parameters()) if self.ema is not None else []
        self.train_model: torch.nn.Module = model
        self.amp = (cfg.amp == "auto" and device.type == "cuda") or cfg.amp == "bf16"
        self.step = self.skipped = 0
        self.lr = cfg.lr
        self.resumed_from: Optional[str] = None
        self.last_ckpt: Optional[str] = None
        self.losses: List[float] = []  # this process's run, one per step (NaN when skipped)
        self.consecutive = 0  # non-finite steps in a row, up to the last step read back
        self.bar: Any = None
        self.log_file: Any = None
        self.win_t0, self.win_step0 = 0.0, 0  # the log window: its start time and step
        self._init_device_state(0)

    # ------------------------------------------------------------------ the extension point
    def get_batch(self, step: int) -> Any:
        """This process's batch for the step after ``step`` steps (see the class docstring)."""
        raise NotImplementedError

    def compute_loss(self, batch: Any) -> torch.Tensor:
        """The scalar loss of ``batch``, computed with ``self.train_model`` (see the class docstring)."""
        raise NotImplementedError

    def generators(self, step: int) -> Tuple[torch.Generator, torch.Generator]:
        """(CPU generator, device generator) seeded from (cfg.seed, rank, step): a step's randomness."""
        g_cpu = torch.Generator().manual_seed(_mix(self.cfg.seed, self.rank, step, 1))
        g_dev = torch.Generator(device=self.device).manual_seed(_mix(self.cfg.seed, self.rank, step, 2))
        return g_cpu, g_dev

    # ------------------------------------------------------------------ the run
    def run(self) -> TrainResult:
        """Resume (when asked), train up to ``cfg.steps`` and end with a checkpoint of the last step."""
        rng = self.resume()
        self.wrap()
        if rng is not None:
            _set_rng_state(rng, self.device)
        else:
            torch.manual_seed(_mix(self.cfg.seed, self.rank, 0x5EED))  # dropout stream, distinct per rank
        self.open_outputs()
        start_step = self.step
        self.win_t0, self.win_step0 = time.perf_counter(), self.step
        self.model.train(self.train_mode)
        try:
            self.log_file = run_files.open_owned(self.log_path, "log", append=True) if self.is_main else None
            with InterruptFlag(self._interrupt_notice) as interrupt:
                while self.step < self.cfg.steps:
                    self.train_step(self.get_batch(self.step))
                    self.after_step()
                    if self.interrupted(interrupt):
                        self.stop_interrupted(interrupt.signal or "an interrupt on another rank")
            # always end with a checkpoint of the final step (unless a resumed run had nothing left to do)
            if self.step > start_step or self.resumed_from is None:
                self.last_ckpt = self.save() or self.last_ckpt
            else:
                self.last_ckpt = self.resumed_from
            if self.is_main and self.cfg.sample_every and self.step > start_step and self.step % self.cfg.sample_every:
                self.sample_grid()  # a run shorter than sample_every (or ending between grids) still shows one
        finally:
            self.close_outputs()
        return TrainResult(step=self.step, losses=self.losses, skipped=self.skipped, checkpoint=self.last_ckpt,
                           out_dir=self.run_dir, model=self.model, ema=self.ema)

    # ------------------------------------------------------------------ Ctrl-C / SIGTERM
    def _interrupt_notice(self, name: str) -> None:
        if self.is_main:
            print(f"\nfastddpm {self.command}: {name}: saving a checkpoint of the current step, then stopping "
                  "(press Ctrl-C again to stop at once, without it)", file=sys.stderr, flush=True)

    def interrupted(self, flag: InterruptFlag) -> bool:
        """Whether to stop now: this process got SIGINT/SIGTERM (one process), or any rank did (DDP: asked at
        the log steps, which sync anyway, so that every rank stops at the same step)."""
        if not self.distributed:
            return flag.signal is not None
        if self.step % self.cfg.log_every and self.step != self.cfg.steps:
            return False
        box = torch.tensor([1.0 if flag.signal else 0.0], device=self.device)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        return bool(box.item() > 0)

    def stop_interrupted(self, name: str) -> None:
        """Save this step (atomically, as every save), log it, and raise TrainInterrupted saying where."""
        cfg, step = self.cfg, self.step
        self.read_pending()
        if not (step % cfg.log_every == 0 or step == cfg.steps):
            self.log_step()  # the log holds exactly the steps the checkpoint holds
        saved_now = bool(cfg.save_every) and step % cfg.save_every == 0 and step != cfg.steps
        path = self.last_ckpt if saved_now else self.save()
        raise TrainInterrupted(f"at step {step}: saved {path}; continue with --resume")

    def train_module(self) -> torch.nn.Module:
        """What ``wrap`` wraps into ``train_model``: the model (a subclass may return a module around it whose
        forward computes its loss, so that DDP sees one forward per step)."""
        return self.model

    def wrap(self) -> None:
        """``train_model``: :meth:`train_module` in DistributedDataParallel (DDP) and torch.compile
        (``cfg.compile``; None: on CUDA)."""
        self.train_model = self.train_module()
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            dev = self.device
            self.train_model = DDP(self.train_model, device_ids=[dev.index] if dev.type == "cuda" else None)
        use_compile = self.cfg.compile if self.cfg.compile is not None else self.device.type == "cuda"
        if use_compile:
            self.train_model = torch.compile(self.train_model)

    def open_outputs(self) -> None:
        """Rank 0: the run directory, its config.json, and the progress bar."""
        if self.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            run_files.write_owned_json(os.path.join(self.run_dir, "config.json"), self.config)
        if self.is_main and self.cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.cfg.steps, initial=self.step, desc=self.command, dynamic_ncols=True, file=sys.stderr)

    def close_outputs(self) -> None:
        """Close the progress bar and the log file."""
        if self.bar is not None:
            self.bar.close()
        if self.log_file is not None:
            self.log_file.close()

    # ------------------------------------------------------------------ one step
    # No host sync inside a step: what a step produces stays on the device and is read at sync points
    # only, the log steps and the checkpoint and sample steps (which sync anyway). The skip of a
    # non-finite step is decided on the device too: fused AdamW skips its update and its step count
    # where `found_inf` is 1, the EMA's weight is multiplied by the finite flag, and `updates_t` (the EMA
    # warm-up's count) only counts finite steps. So the skip messages and the max_nonfinite stop come at
    # the next sync point, up to log_every - 1 steps late; the stop still names the exact steps, and it
    # comes before that point's checkpoint (no checkpoint holds a step after the stop).
    def _init_device_state(self, updates: int) -> None:
        dev = self.device
        self.updates_t = torch.tensor(updates, dtype=torch.int64, device=dev)  # finite steps: the EMA warm-up
        self.win_sum = torch.zeros((), dtype=torch.float64, device=dev)  # the log window's finite losses
        self.win_n = torch.zeros((), dtype=torch.float64, device=dev)
        self.grad_norm = torch.full((), float("nan"), device=dev)  # of the last applied update
        self.pending_loss: List[torch.Tensor] = []  # the per-step losses and finite flags since the last sync
        self.pending_finite: List[torch.Tensor] = []

    def lr_at(self, step: int) -> float:
        """The learning rate of the step after ``step`` steps: linear warm-up over ``warmup_steps``, then ``lr``."""
        cfg = self.cfg
        return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr

    def train_step(self, batch: Any) -> None:
        """One step: forward and backward, then the update, skipped on the device when not finite."""
        self.lr = self.lr_at(self.step)
        for group in self.opt.param_groups:
            group["lr"] = self.lr  # a Python float: fused AdamW passes it to its kernel as an argument
        loss, gn = self.forward_backward(batch)
        finite = torch.isfinite(loss) & torch.isfinite(gn)
        if self.distributed:  # one rank's non-finite step is every rank's
            flag = (~finite).to(torch.float32).reshape(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            finite = flag[0] == 0
        self.step += 1
        self.optimizer_step(finite)
        self.win_sum += torch.where(finite, loss.detach().double(), 0.0)
        self.win_n += finite
        self.grad_norm = torch.where(finite, gn.detach().float(), self.grad_norm)
        self.pending_loss.append(loss.detach().float())
        self.pending_finite.append(finite)

    def forward_backward(self, batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """(loss, global gradient norm before clipping); the gradients clipped to ``grad_clip``."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = self.compute_loss(batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        return loss, torch.nn.utils.clip_grad_norm_(self.params, clip)

    def optimizer_step(self, finite: torch.Tensor) -> None:
        """AdamW and the EMA, both leaving everything as it was where ``finite`` is False."""
        self.opt.found_inf = (~finite).to(torch.float32)  # 1.0: the fused kernel leaves params and state alone
        self.opt.step()
        self.updates_t += finite
        if self.ema is not None:
            _ema_update(self.ema_params, self.params, self.updates_t, finite, self.cfg.ema_decay, self.cfg.ema_warmup)

    # ------------------------------------------------------------------ sync points: log, checkpoint, samples
    def after_step(self) -> None:
        """The log, checkpoint and sample grid due at this step (each a sync point)."""
        cfg, step = self.cfg, self.step
        log_now = step % cfg.log_every == 0 or step == cfg.steps
        save_now = bool(cfg.save_every) and step % cfg.save_every == 0 and step != cfg.steps
        sample_now = bool(cfg.sample_every) and step % cfg.sample_every == 0
        if log_now or save_now or sample_now:
            self.read_pending()  # the stop check comes before its checkpoint
        if log_now:
            self.log_step()
        elif self.bar is not None and step < cfg.log_every and step & (step - 1) == 0:
            # the first steps (1, 2, 4, 8, ...) show their loss in the bar: feedback before the first log
            # step (a host read, only here and only with the bar)
            last = self.pending_loss[-1] if self.pending_loss else self.losses[-1]
            self.bar.set_postfix(loss=f"{float(last):.4f}", lr=f"{self.lr:.2e}", refresh=False)
        if self.bar is not None:
            self.bar.update(1)
        if save_now:
            self.last_ckpt = self.save() or self.last_ckpt
        if sample_now and self.is_main:
            self.sample_grid()

    def read_pending(self) -> None:
        """The steps since the last sync point into ``losses``, their skip messages, and the
        NonFiniteLossError after ``max_nonfinite`` non-finite steps in a row."""
        if not self.pending_loss:
            return
        losses, flags = torch.stack([torch.stack(self.pending_loss), torch.stack(self.pending_finite).float()]).tolist()
        self.pending_loss.clear()
        self.pending_finite.clear()
        self.losses.extend(losses)
        for s, (value, ok) in enumerate(zip(losses, flags), start=self.step - len(flags) + 1):
            if ok:
                self.consecutive = 0
                continue
            self.skipped += 1
            self.consecutive += 1
            if self.is_main:
                self.say(f"step {s}: non-finite loss ({value}), update skipped ({self.consecutive} in a row, "
                         f"{self.skipped} in all)")
            if self.consecutive >= self.cfg.max_nonfinite:
                raise self._nonfinite_stop(s)

    def _nonfinite_stop(self, s: int) -> NonFiniteLossError:
        n, step = self.consecutive, self.step
        late = f" (seen at step {step}: losses are read at log, checkpoint and sample steps)" if s < step else ""
        return NonFiniteLossError(
            f"the loss was non-finite for {n} consecutive steps (steps {s - n + 1}..{s}){late}; stopping. "
            f"The last checkpoint is {self.last_ckpt or ckpt.latest_checkpoint(self.run_dir)}. "
            "Try a lower lr, a longer warmup_steps, grad_clip, or amp='none'.")

    def say(self, msg: str) -> None:
        """A line on stderr that leaves the progress bar intact."""
        (self.bar.write(msg, file=sys.stderr) if self.bar is not None else print(msg, file=sys.stderr))

    def log_step(self) -> None:
        """One log.jsonl record: the mean finite loss over the window (all ranks), lr, grad_norm, skipped, it/s."""
        buf = torch.stack([self.win_sum, self.win_n])
        if self.distributed:
            dist.all_reduce(buf)
        total, count, grad_norm = torch.cat([buf, self.grad_norm.double().reshape(1)]).tolist()
        extras = self.log_extras()  # every rank: it may all-reduce
        mean_loss = total / count if count > 0 else float("nan")
        now = time.perf_counter()
        ips = (self.step - self.win_step0) / max(now - self.win_t0, 1e-9)
        if self.is_main:
            rec = {"step": self.step, "loss": mean_loss, "lr": self.lr, "grad_norm": grad_norm,
                   "skipped": self.skipped, "it_per_s": ips, "time": time.time(), **extras}
            self.log_file.write(json.dumps(rec) + "\n")
            self.log_file.flush()
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{self.lr:.2e}", skipped=self.skipped, refresh=False)
        self.win_sum.zero_()
        self.win_n.zero_()
        self.win_t0, self.win_step0 = now, self.step

    def log_extras(self) -> Dict[str, Any]:
        """More fields of this log record (a subclass's window statistics); called on every rank at each log step."""
        return {}

    def save(self) -> Optional[str]:
        """A checkpoint of this step (rank 0 writes it, with every rank's RNG state); its path on rank 0."""
        rng = _rng_state(self.device)
        if self.distributed:
            gathered: List[Any] = [None] * self.world
            dist.all_gather_object(gathered, {k: v.cpu() for k, v in rng.items()})
            rng_all: Any = gathered
        else:
            rng_all = [rng]
        path = None
        if self.is_main:
            state = {"optimizer": self.opt.state_dict(), "step": self.step, "skipped": self.skipped,
                     "updates": int(self.updates_t), "rng": rng_all, "world_size": self.world}
            ema = self.ema.state_dict() if self.ema is not None else None
            path = ckpt.save_checkpoint(self.run_dir, self.step, self.config, self.model.state_dict(), ema, state,
                                        keep=self.cfg.keep)
        if self.distributed:
            dist.barrier()
        return path

    def sample_grid(self) -> None:
        """``samples/step_N.png``: ``sample_num`` samples of the EMA model (labels cycling through the classes)."""
        from .guards import NonFiniteSampleError

        cfg, m = self.cfg, self.config["model"]
        net = self.ema if self.ema is not None else self.model
        was_training = net.training
        net.eval()
        num_classes, size = m.get("num_classes"), m["image_size"]
        y = torch.arange(cfg.sample_num, device=self.device) % num_classes if num_classes else None
        s = make_sampler(cfg.sample_sampler, self.diffusion, cfg.sample_steps)
        try:
            with torch.no_grad():
                x = s.sample(Conditioned(net, y), (cfg.sample_num, m["in_channels"], size, size), seed=cfg.seed)
        except NonFiniteSampleError as e:  # a grid is a by-product: say so and keep training
            print(f"fastddpm {self.command}: step {self.step}: no sample grid: {e}", file=sys.stderr)
            net.train(was_training)
            return
        save_grid(x, os.path.join(self.run_dir, "samples", f"step_{self.step:08d}.png"), scale=max(1, 64 // size))
        net.train(was_training)

    # ------------------------------------------------------------------ resume
    def resume(self) -> Optional[Dict[str, Any]]:
        """Continue the checkpoint ``cfg.resume`` asks for, if any (see :func:`fastddpm.run_dir.resume_checkpoint`):
        weights, EMA, optimizer and counters restored; this rank's RNG state returned (None: a fresh run).
        Then rank 0 cuts log.jsonl back to the resumed step."""
        cfg, rng = self.cfg, None
        self.claim_run_dir()
        path = resume_checkpoint(cfg.resume, self.run_dir, announce=self.is_main, command=self.command)
        if path is not None:
            explicit = isinstance(cfg.resume, str)
            ck = load_for_resume(path, run_dir_of(path) or self.run_dir, cfg.resume_fallback, explicit)
            self.resumed_from = ck.path
            check_resumable(ck, self.config)
            rng = self.restore(ck)
        if self.is_main:
            self.set_aside_superseded()
        return rng

    def claim_run_dir(self) -> None:
        """A fresh run (no ``resume``) refuses a run directory that holds a run (config.json, a log,
        checkpoints) unless ``overwrite``, which removes them first (rank 0; the others wait). Any run
        refuses a config.json or log that is a symbolic link."""
        if self.cfg.resume:
            run_files.check_links(self.run_dir)
            return
        if self.cfg.overwrite:
            if self.is_main:
                removed = run_files.clear_run(self.run_dir)
                if removed:
                    print(f"fastddpm {self.command}: --overwrite: removed the previous run's {', '.join(removed)} from "
                          f"{self.run_dir}", file=sys.stderr)
            if self.distributed:
                dist.barrier()
        elif not ckpt.latest_checkpoint(self.run_dir):  # with checkpoints, resume_checkpoint says so
            run_files.check_fresh_run_dir(self.run_dir)

    def set_aside_superseded(self) -> None:
        """What the resumed step supersedes, kept aside and said: the log lines past it (a dead run's lines
        past its last checkpoint, or an abandoned branch's) and the run directory's newer checkpoints."""
        moved = run_files.set_aside_log_lines(self.log_path, self.step)
        if moved:
            print(f"fastddpm {self.command}: {moved} log lines past step {self.step} moved to "
                  f"{os.path.join(self.run_dir, run_files.SUPERSEDED_LOG)}", file=sys.stderr)
        names, dest = run_files.set_aside_newer_checkpoints(self.run_dir, self.step)
        if names:
            print(f"fastddpm {self.command}: resuming from step {self.step}: the newer checkpoints {', '.join(names)} moved "
                  f"to {dest} (they belong to the run this one branches off; a later --resume continues this one)",
                  file=sys.stderr)

    def saved_train_config(self, ck: ckpt.Checkpoint) -> Dict[str, Any]:
        """The TrainConfig (as a dict) checkpoint ``ck`` was trained with: the resume message lists what changed."""
        return ck.config.get("train") or {}

    def restore(self, ck: ckpt.Checkpoint) -> Dict[str, Any]:
        """Load checkpoint ``ck``'s weights, EMA, optimizer state and counters; return this rank's RNG state."""
        ckpt.check_state_dict(self.model, ck.model, ck.path)
        self.model.load_state_dict(ck.model)
        if self.ema is not None:
            if ck.ema is None:
                raise ValueError(f"{ck.path}: the checkpoint has no EMA weights but ema_decay={self.cfg.ema_decay}")
            self.ema.load_state_dict(ck.ema)
        st = ck.state
        try:
            _load_optimizer_state(self.opt, st["optimizer"])
            self.step, self.skipped, updates = int(st["step"]), int(st["skipped"]), int(st["updates"])
            rngs = st["rng"]
            if isinstance(rngs, list):
                rng = rngs[self.rank] if self.rank < len(rngs) else rngs[0]
            else:
                rng = rngs
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
            raise ckpt.CheckpointError(f"{ck.path}/state.pt: incomplete or incompatible training state ({e})") from e
        self._init_device_state(updates)
        if self.is_main:
            saved_world = st.get("world_size", len(rngs) if isinstance(rngs, list) else 1)
            print(resume_message(ck.path, self.step, self.saved_train_config(ck), self.cfg, saved_world, self.world,
                                 command=self.command), file=sys.stderr)
        return rng


# ------------------------------------------------------------------------------------------ the DDPM objective
@dataclass
class _ImageData:
    """A dataset and this process's share of every step's global batch."""

    ds: ImageDataset
    sampler: torch.utils.data.DistributedSampler
    local_batch: int
    steps_per_epoch: int
    num_classes: Optional[int]


def _load_data(cfg: TrainConfig, rank: int, world: int) -> _ImageData:
    if cfg.batch_size % world:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the number of processes ({world})")
    local_batch = cfg.batch_size // world
    ds = load_dataset(cfg.dataset, image_size=cfg.image_size, random_flip=cfg.random_flip, channels=cfg.channels)
    num_classes = None
    if cfg.class_cond:
        if ds.labels is None:
            raise ValueError(f"class_cond=True but the dataset {cfg.dataset!r} has no labels")
        num_classes = ds.num_classes
    if ds.images.shape[2] != ds.images.shape[3]:
        raise ValueError(f"the U-Net needs square images; {cfg.dataset!r} has {ds.images.shape[2]}x{ds.images.shape[3]} "
                         "(pass image_size to crop and resize)")
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                                  drop_last=True)
    steps_per_epoch = len(sampler) // local_batch
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the dataset ({len(ds)} images)")
    return _ImageData(ds, sampler, local_batch, steps_per_epoch, num_classes)


def _build(cfg: TrainConfig, data: _ImageData, device: torch.device) -> Tuple[torch.nn.Module, Any, Dict[str, Any]]:
    """(model, diffusion, the run's config) for a training config and its data."""
    from .unet import UNet

    ds, num_classes = data.ds, data.num_classes
    mcfg = model_config(cfg, ds.image_size, ds.channels, num_classes)
    config = {"model": mcfg, "diffusion": diffusion_config(cfg), "train": cfg.to_dict(),
              "data": {"dataset": cfg.dataset, "image_size": ds.image_size, "channels": ds.channels,
                       "num_classes": num_classes, "classes": ds.classes if num_classes else None,
                       "num_images": len(ds)}}
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)
    model = UNet(**mcfg).to(device)
    # the model's complete keyword arguments (defaults included), so a checkpoint never depends on defaults
    config["model"] = json.loads(json.dumps(getattr(model, "config", mcfg)))
    return model, build_diffusion(config), config


_Batch = Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]  # x0, labels, t, noise


class DiffusionTrainLoop(TrainLoop):
    """The DDPM objective (``diffusion.training_losses``) on a dataset's images.

    The data order is DistributedSampler's (seed, epoch) permutation, each process taking its share of
    every global batch; the flips, label dropout (``p_uncond``, to the null class), timesteps and noise
    come from the step's :meth:`generators`.
    """

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, diffusion: Any, config: Dict[str, Any],
                 data: _ImageData, **kw: Any):
        super().__init__(cfg, model, diffusion, config, **kw)
        self.data = data
        self._epoch: Tuple[int, Optional[torch.Tensor]] = (-1, None)  # (epoch, its permutation)

    def get_batch(self, step: int) -> _Batch:
        """(x0, labels or None, timesteps, noise) of this process for step ``step``."""
        d, device = self.data, self.device
        epoch, pos = divmod(step, d.steps_per_epoch)
        if self._epoch[0] != epoch:
            d.sampler.set_epoch(epoch)
            self._epoch = (epoch, torch.tensor(list(iter(d.sampler)), dtype=torch.int64))
        idx = self._epoch[1][pos * d.local_batch : (pos + 1) * d.local_batch]
        g_cpu, g_dev = self.generators(step)
        x0, y = d.ds.batch(idx, generator=g_cpu, device=device)
        if d.num_classes:
            drop = torch.rand(y.shape[0], generator=g_cpu) < self.cfg.p_uncond
            y = torch.where(drop.to(device, non_blocking=True), torch.full_like(y, d.num_classes), y)
        else:
            y = None
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), generator=g_dev, device=device)
        noise = torch.randn(x0.shape, generator=g_dev, device=device)
        return x0, y, t, noise

    def compute_loss(self, batch: _Batch) -> torch.Tensor:
        """The batch mean of ``diffusion.training_losses``' "loss" term."""
        x0, y, t, noise = batch
        terms = self.diffusion.training_losses(Conditioned(self.train_model, y), x0, t=t, noise=noise)
        return terms["loss"].float().mean()


# ------------------------------------------------------------------------------------------ train
def train(config: Union[TrainConfig, Dict[str, Any]]) -> TrainResult:
    """Train a U-Net with the DDPM objective; see :class:`TrainConfig` and the module docstring.

    Under torchrun (WORLD_SIZE > 1) it initialises the process group (nccl on CUDA, gloo on CPU)
    when not already initialised, wraps the model in DistributedDataParallel, shards the data with
    DistributedSampler, and only rank 0 writes checkpoints, logs and sample grids.

    Raises:
        ValueError: a bad config, or out_dir already holding checkpoints without ``resume``, or a
            resume that changes the model/diffusion settings (CheckpointError: one that does not load).
        NonFiniteLossError: ``max_nonfinite`` consecutive non-finite losses (raised at the next log,
            checkpoint or sample step: up to ``log_every - 1`` steps later, before that step's checkpoint).
        RunLockError: another live process trains in out_dir.
        DistributedError: (DDP) another rank failed or stalled for ``ddp_timeout`` seconds.
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig or a dict, got {type(config).__name__}")
    cfg = dataclasses.replace(config).validate()
    return run_training(cfg, _train)


def run_training(cfg: TrainConfig, body: Callable[[TrainConfig, int, int, torch.device, bool], TrainResult]
                 ) -> TrainResult:
    """``body(cfg, rank, world, device, distributed)`` inside a training process's set-up: the device, the
    process group under torchrun (left as found), the run lock of ``cfg.out_dir``, and (DDP) a peer's
    failure turned into one DistributedError naming it. What :func:`train` runs its loop in."""
    rank, world, local_rank = dist_info()
    device = resolve_device(cfg.device, local_rank)
    own_group = join_process_group(world, device, cfg.ddp_timeout)
    distributed = world > 1 and dist.is_initialized()
    rank, world = (rank, world) if distributed else (0, 1)
    lock = None
    try:
        lock = lock_run(os.path.abspath(cfg.out_dir), rank, distributed)
        return body(cfg, rank, world, device, distributed)
    except Exception as e:
        # a RunLockError is every rank's own (rank 0 broadcast it): no peer failed
        err = ddp_failure(e, rank, world, cfg.ddp_timeout) if distributed and not isinstance(e, RunLockError) else e
        if err is not e:
            raise err from e
        raise
    finally:
        if lock is not None:
            lock.release()
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device, distributed: bool) -> TrainResult:
    data = _load_data(cfg, rank, world)
    model, diffusion, config = _build(cfg, data, device)
    loop = DiffusionTrainLoop(cfg, model, diffusion, config, data, rank=rank, world=world, device=device,
                              distributed=distributed)
    return loop.run()

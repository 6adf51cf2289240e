"""The training loop: AdamW + warm-up, grad clipping, EMA, bf16 autocast, torch.compile, DDP, exact resume.

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
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from ._names import DEFAULT_DDP_TIMEOUT, SAMPLER_NAMES
from .data import load_dataset
from .images import save_grid

__all__ = ["TrainConfig", "TrainResult", "NonFiniteLossError", "RunLockError", "DistributedError", "train",
           "resume_config", "saved_run_config", "config_changes", "dataset_defaults", "dataset_shape"]


class NonFiniteLossError(RuntimeError):
    """Raised when the loss was non-finite for ``max_nonfinite`` consecutive steps."""


class RunLockError(RuntimeError):
    """Another live training process owns the run directory (its ``train.lock``)."""


class DistributedError(RuntimeError):
    """A peer process of a data-parallel run failed or stalled; the message says which rank."""


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
    before the run stops, naming the rank that failed).
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


# ------------------------------------------------------------------------------------------ helpers
def _mix(*xs: int) -> int:
    """A 63-bit seed from integers (splitmix64 style), so (seed, rank, step) streams do not collide."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h ^= (int(x) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def _dist_info() -> Tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment (1 process without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """`spec` ('auto', 'cpu', 'cuda' or 'cuda:N') as a torch.device; 'auto' and a bare 'cuda' take the
    process's local rank (torchrun). ValueError naming the accepted values when it cannot be used."""
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} asked for, but CUDA is not available")
    if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {spec!r} asked for, but there are {torch.cuda.device_count()} CUDA devices")
    return dev


def _join_process_group(world: int, device: torch.device, timeout: float) -> bool:
    """Join torchrun's process group when world > 1 (nccl on CUDA, gloo on the CPU).

    ``timeout`` (seconds) bounds every collective: a dead or stalled peer ends the run after it
    instead of torch's default 30 minutes. Returns whether this call created the group (the caller
    then destroys it when done).
    """
    if world <= 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=float(timeout)))
    return True


def model_config(cfg: TrainConfig, image_size: int, channels: int, num_classes: Optional[int]) -> Dict[str, Any]:
    """UNet keyword arguments of a training config."""
    return dict(image_size=image_size, in_channels=channels, base_channels=cfg.base_channels,
                channel_mults=list(cfg.channel_mults), num_res_blocks=cfg.num_res_blocks,
                attention_resolutions=list(cfg.attention_resolutions), dropout=float(cfg.dropout),
                num_heads=cfg.num_heads, head_channels=cfg.head_channels, time_embedding=cfg.time_embedding,
                learn_sigma=bool(cfg.learn_sigma), num_classes=num_classes, groups=cfg.groups)


def diffusion_config(cfg: TrainConfig) -> Dict[str, Any]:
    return dict(schedule=cfg.schedule, num_timesteps=cfg.num_timesteps, prediction=cfg.prediction,
                variance=cfg.variance, loss=cfg.loss)


from .samplers import make_sampler as _make_sampler  # noqa: E402  (name kept for callers)


class _Conditioned(torch.nn.Module):
    """model(x, t) -> model(x, t, y) with fixed labels (None: unconditional / null class)."""

    def __init__(self, model: torch.nn.Module, y: Optional[torch.Tensor]):
        super().__init__()
        self.model = model
        self.y = y

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.y is None:
            return self.model(x, t)
        return self.model(x, t, self.y[: x.shape[0]])


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


def _truncate_log(path: str, step: int) -> None:
    """Drop log lines past ``step`` (written by an interrupted run after its last checkpoint)."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if int(json.loads(line).get("step", 0)) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, AttributeError):
                continue  # a torn last line
    ckpt.atomic_write_bytes(path, "".join(keep).encode())



# ------------------------------------------------------------------------------------------ resume
# settings the weights depend on: a resumed run may not change them (the train() check of the built model
# and diffusion configs is the final word; this list refuses the obvious cases before any work)
CHECKPOINT_FIELDS = ("image_size", "channels", "class_cond", "base_channels", "channel_mults", "num_res_blocks",
                     "attention_resolutions", "num_heads", "head_channels", "time_embedding", "groups",
                     "learn_sigma", "schedule", "num_timesteps", "prediction", "variance", "loss")
# run-control settings that are not part of what a run "is" (never reported as changes)
_NOT_SETTINGS = ("resume", "resume_fallback")


def _same(name: str, old: Any, new: Any) -> bool:
    if name == "out_dir" and isinstance(old, str) and isinstance(new, str):
        return os.path.abspath(old) == os.path.abspath(new)
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return list(old) == list(new)
    return old == new


def config_changes(old: Dict[str, Any], new: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """(name, old, new) for every setting whose value differs between two TrainConfig dicts."""
    out = []
    for name, value in new.items():
        if name in _NOT_SETTINGS or name not in old:
            continue
        if not _same(name, old[name], value):
            out.append((name, old[name], value))
    return out


def _show(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def format_changes(changes: Sequence[Tuple[str, Any, Any]]) -> str:
    """``name: old -> new`` for each change, comma-separated."""
    return ", ".join(f"{n}: {_show(a)} -> {_show(b)}" for n, a, b in changes)


def _run_dir_of(checkpoint_path: str) -> Optional[str]:
    """RUN for RUN/checkpoints/step_N, else None."""
    parent = os.path.dirname(os.path.abspath(checkpoint_path))
    if ckpt._STEP_RE.match(os.path.basename(os.path.abspath(checkpoint_path))) and \
            os.path.basename(parent) == ckpt.CKPT_SUBDIR:
        return os.path.dirname(parent)
    return None


def saved_run_config(resume: Union[bool, str], out_dir: str) -> Optional[Tuple[Dict[str, Any], str]]:
    """The saved TrainConfig dict ("train" entry) of the checkpoint ``resume`` would continue, and its path.

    None when there is nothing to resume (``resume`` false, or no checkpoint in ``out_dir``). Only the
    config is read (no weights). If the checkpoint's own config.json does not load, the run directory's
    config.json (written when the run started) is used.
    """
    if not resume:
        return None
    path = ckpt.resolve_checkpoint(resume) if isinstance(resume, str) else ckpt.latest_checkpoint(out_dir)
    if path is None:
        return None
    try:
        saved = ckpt.load_checkpoint(path, load_state=False, load_model=False, load_ema=False).config.get("train")
    except ckpt.CheckpointError:
        saved = None
        run = _run_dir_of(path) or (out_dir if not isinstance(resume, str) else None)
        run_cfg = os.path.join(run, "config.json") if run else None
        if run_cfg and os.path.isfile(run_cfg):
            try:
                with open(run_cfg, encoding="utf-8") as f:
                    saved = json.load(f).get("train")
            except (OSError, ValueError, AttributeError):
                saved = None
    if not isinstance(saved, dict):
        return None
    return saved, path


def resume_config(saved: Dict[str, Any], explicit: Dict[str, Any]) -> Tuple[TrainConfig, List[Tuple[str, Any, Any]]]:
    """The configuration of a resumed run: the saved run's settings, overridden by those given (``explicit``).

    Returns (config, changes) with changes = [(name, saved value, new value)] for every setting that
    differs; :func:`train` prints them when it resumes. Raises ValueError naming the settings when
    a change would make the checkpoint unusable (model architecture or diffusion: CHECKPOINT_FIELDS).
    Saved fields this version does not know are dropped.
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    base = {k: v for k, v in saved.items() if k in names}
    cfg = TrainConfig.from_dict({**base, **explicit}).validate()
    changes = config_changes(base, cfg.to_dict())
    refused = [c for c in changes if c[0] in CHECKPOINT_FIELDS and c[1] is not None]
    if refused:
        raise ValueError(f"cannot resume with other model/diffusion settings than the checkpoint's ("
                         f"{format_changes(refused)}): its weights need the saved ones. Drop these flags, or "
                         "start a new run in another --out-dir")
    return cfg, changes


def _resume_message(path: str, step: int, saved: Dict[str, Any], cfg: TrainConfig, saved_world: int,
                    world: int) -> str:
    lines = [f"fastddpm train: resuming from step {step} ({path})"]
    for name, old, new in config_changes(saved, cfg.to_dict()):
        lines.append(f"  {name}: {_show(old)} -> {_show(new)}")
    if saved_world != world:
        lines.append(f"  world size: {saved_world} -> {world} processes: the global batch stays batch_size="
                     f"{cfg.batch_size} images per step ({cfg.batch_size // max(saved_world, 1)} -> "
                     f"{cfg.batch_size // world} per process); the data order and noise from here on differ "
                     "from the uninterrupted run")
    if step >= cfg.steps:
        lines.append(f"  the run already reached step {step} >= steps={cfg.steps}: nothing to train (pass a "
                     "larger --steps to continue)")
    return "\n".join(lines)


def _load_for_resume(path: str, run_dir: str, fallback: bool, explicit_path: bool) -> ckpt.Checkpoint:
    """Load checkpoint ``path`` with its training state, checked. When it does not load, name the newest
    older checkpoint of the run that does, and resume from that one only with ``fallback``."""
    try:
        return _load_checked(path)
    except ckpt.CheckpointError as e:
        error = e
    older = [p for st, p in reversed(ckpt.list_checkpoints(run_dir))
             if os.path.abspath(p) != os.path.abspath(path) and st < _step_of(path)]
    for p in older:
        try:
            ck = _load_checked(p)
        except ckpt.CheckpointError:
            continue
        if fallback and not explicit_path:
            print(f"fastddpm train: warning: {error}\n  falling back to the newest checkpoint that loads: {p}",
                  file=sys.stderr)
            return ck
        raise ckpt.CheckpointError(f"{error}\n  the newest older checkpoint that loads is {p} (step {ck.step}): "
                                   f"resume from it with --resume {p}, or add --resume-fallback "
                                   "(resume_fallback=True) to fall back to it") from error
    raise ckpt.CheckpointError(f"{error}\n  no older checkpoint of {run_dir} loads either") from error


def _step_of(path: str) -> int:
    m = ckpt._STEP_RE.match(os.path.basename(os.path.abspath(path)))
    return int(m.group(1)) if m else 1 << 62


def _load_checked(path: str) -> ckpt.Checkpoint:
    ck = ckpt.load_checkpoint(path, load_state=True)
    ckpt.check_train_state(ck.state, os.path.join(ck.path, "state.pt"), ck.step)
    return ck


# ------------------------------------------------------------------------------------------ run lock
LOCK_FILE = "train.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class _RunLock:
    """One training process per run directory: ``train.lock`` holds the owner's pid and host.

    The lock is an flock on that file (released by the kernel when the owner dies, even by kill -9);
    a file left with a dead owner's record is a stale lock, taken over with a message. Where flock is
    unavailable, the pid/host record decides (a live pid on this host, or any other host, refuses).
    """

    def __init__(self, run_dir: str):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.fh = open(self.path, "a+", encoding="utf-8")
        try:
            self._acquire()
        except BaseException:
            self.fh.close()
            raise

    def _owner(self) -> Dict[str, Any]:
        self.fh.seek(0)
        try:
            rec = json.loads(self.fh.read() or "{}")
        except ValueError:
            return {}
        return rec if isinstance(rec, dict) else {}

    def _acquire(self) -> None:
        host = socket.gethostname()
        try:
            import fcntl

            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except (BlockingIOError, PermissionError):
            raise self._busy(self._owner()) from None
        except (ImportError, OSError):  # no flock here (Windows, some network file systems)
            locked = False
        owner = self._owner()
        if owner.get("pid") is not None:
            same_host = owner.get("host") == host
            if not locked and (not same_host or _pid_alive(int(owner["pid"]))) and owner.get("pid") != os.getpid():
                raise self._busy(owner)
            print(f"fastddpm train: taking over the stale lock {self.path} of pid {owner.get('pid')} on "
                  f"{owner.get('host')} (that process is gone)", file=sys.stderr)
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(json.dumps({"pid": os.getpid(), "host": host,
                                  "started": datetime.datetime.now().isoformat(timespec="seconds")}) + "\n")
        self.fh.flush()

    def _busy(self, owner: Dict[str, Any]) -> RunLockError:
        return RunLockError(
            f"{os.path.dirname(self.path)} is in use by another training process (pid {owner.get('pid', '?')} on "
            f"{owner.get('host', '?')}, since {owner.get('started', '?')}; lock file {self.path}): wait for it to "
            "end or choose another --out-dir")

    def release(self) -> None:
        # empty the record but keep the file: unlinking would let a waiting opener lock a dead inode
        try:
            self.fh.seek(0)
            self.fh.truncate()
            self.fh.flush()
        finally:
            self.fh.close()


def _lock_run(run_dir: str, rank: int, distributed: bool) -> Optional[_RunLock]:
    """Rank 0 takes the run lock; under DDP every rank learns the outcome (and raises the same error)."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = _RunLock(run_dir)
        except RunLockError as e:
            error = str(e)
    if distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise RunLockError(error)
    return lock


# ------------------------------------------------------------------------------------------ DDP faults
_FAILED_KEY = "fastddpm/failed/{}"
_ALIVE_KEY = "fastddpm/alive/{}"


def _is_peer_failure(e: BaseException) -> bool:
    """An error of a collective or the rendezvous store (a peer died or stalled), not of this process's work."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(k in text for k in (
        "gloo", "Gloo", "NCCL", "Connection closed by peer", "Connection reset by peer", "Broken pipe",
        "Timed out", "timed out", "Socket Timeout", "recvBytes", "sendBytes"))


def _peer_failure(e: BaseException, rank: int, world: int, timeout: float) -> DistributedError:
    """One line naming the failed rank(s), from the records the ranks leave in the rendezvous store."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(_ALIVE_KEY.format(rank), "1")
        start = time.monotonic()
        failed: Dict[int, str] = {}
        silent: Optional[List[int]] = None
        while True:
            failed = {r: store.get(_FAILED_KEY.format(r)).decode("utf-8", "replace") for r in range(world)
                      if r != rank and store.check([_FAILED_KEY.format(r)])}
            if silent is None and time.monotonic() - start > 0.5:
                # healthy peers hit the same broken collective and check in at about the same time; a rank
                # still silent then is the dead or stalled one (one that wakes up later does not count)
                silent = [r for r in range(world) if r != rank and not store.check([_ALIVE_KEY.format(r)])]
            if failed or time.monotonic() - start > min(2.0, timeout):
                break
            time.sleep(0.1)
    except Exception:  # the store lives in rank 0's process: unreachable means rank 0 is gone
        return DistributedError(f"rank {rank}: stopping: lost contact with rank 0 (it died, or stalled for more than "
                                f"ddp_timeout={timeout:g} s)")
    if failed:
        what = "; ".join(f"rank {r} failed: {m}" for r, m in sorted(failed.items()))
        return DistributedError(f"rank {rank}: stopping because {what}")
    who = ("rank " + ", ".join(map(str, silent))) if silent else "a peer"
    return DistributedError(f"rank {rank}: stopping: {who} stopped responding (died, or stalled for more than "
                            f"ddp_timeout={timeout:g} s)")


def _ddp_failure(e: BaseException, rank: int, world: int, timeout: float) -> BaseException:
    """What a data-parallel process raises for ``e``: a peer's failure becomes one DistributedError
    naming that rank; this process's own error is left in the store for the peers and raised as it is."""
    if isinstance(e, (RunLockError, DistributedError)):
        return e
    if _is_peer_failure(e):
        return _peer_failure(e, rank, world, timeout)
    _record_failure(e, rank)
    return e


def _record_failure(e: BaseException, rank: int) -> None:
    """Leave this rank's error in the store for its peers (best effort: the store may be gone)."""
    try:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        dist.distributed_c10d._get_default_store().set(_FAILED_KEY.format(rank), f"{type(e).__name__}: {first}")
    except Exception:
        pass

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

    rank, world, local_rank = _dist_info()
    device = resolve_device(cfg.device, local_rank)
    own_group = _join_process_group(world, device, cfg.ddp_timeout)
    distributed = world > 1 and dist.is_initialized()
    rank, world = (rank, world) if distributed else (0, 1)
    lock = None
    try:
        lock = _lock_run(os.path.abspath(cfg.out_dir), rank, distributed)
        return _train(cfg, rank, world, device, distributed)
    except Exception as e:
        err = _ddp_failure(e, rank, world, cfg.ddp_timeout) if distributed else e
        if err is not e:
            raise err from e
        raise
    finally:
        if lock is not None:
            lock.release()
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device, distributed: bool) -> TrainResult:
    from .unet import UNet

    is_main = rank == 0
    if cfg.batch_size % world:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the number of processes ({world})")
    local_batch = cfg.batch_size // world

    # ---------------------------------------------------------------- data
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

    # ---------------------------------------------------------------- model, diffusion, optimizer
    mcfg = model_config(cfg, ds.image_size, ds.channels, num_classes)
    full_config = {"model": mcfg, "diffusion": diffusion_config(cfg), "train": cfg.to_dict(),
                   "data": {"dataset": cfg.dataset, "image_size": ds.image_size, "channels": ds.channels,
                            "num_classes": num_classes, "classes": ds.classes if num_classes else None,
                            "num_images": len(ds)}}
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)
    model = UNet(**mcfg).to(device)
    # the model's complete keyword arguments (defaults included), so a checkpoint never depends on defaults
    mcfg = json.loads(json.dumps(getattr(model, "config", mcfg)))
    full_config["model"] = mcfg
    diffusion = ckpt.build_diffusion(full_config)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema_decay > 0 else None
    # fused: the one AdamW of torch that skips an update on the device (`found_inf`, see the loop); it has
    # CPU and CUDA kernels for the float32 parameters used here (torch >= 2.13), so both take one path
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.weight_decay, fused=True)

    # ---------------------------------------------------------------- resume
    step, skipped, updates = 0, 0, 0
    run_dir = os.path.abspath(cfg.out_dir)
    log_path = os.path.join(run_dir, "log.jsonl")
    existing = ckpt.latest_checkpoint(run_dir)
    resume_path: Optional[str] = None
    if isinstance(cfg.resume, str):
        resume_path = ckpt.resolve_checkpoint(cfg.resume)
    elif cfg.resume:
        resume_path = existing
        if resume_path is None and is_main:
            print(f"fastddpm train: no checkpoint in {run_dir}; starting from scratch", file=sys.stderr)
    elif existing is not None:
        raise ValueError(f"out_dir {run_dir} already holds checkpoints ({existing}); pass resume=True (--resume) "
                         "to continue that run, or choose another out_dir")
    rng_restore = None
    if resume_path is not None:
        ck = _load_for_resume(resume_path, _run_dir_of(resume_path) or run_dir, cfg.resume_fallback,
                              isinstance(cfg.resume, str))
        resume_path = ck.path
        try:
            ck_model = json.loads(json.dumps(getattr(ckpt.build_model(ck.config), "config", ck.config["model"])))
        except ckpt.CheckpointError:
            ck_model = ck.config.get("model")
        # dropout changes no weight: a resumed run may change it (fine-tuning); everything else must match
        same_arch = {k: v for k, v in mcfg.items() if k != "dropout"}
        ck_arch = {k: v for k, v in ck_model.items() if k != "dropout"} if isinstance(ck_model, dict) else {}
        differ = config_changes(ck_arch, same_arch) + \
            config_changes(ck.config.get("diffusion") or {}, full_config["diffusion"])
        if ck_arch != same_arch or ck.config.get("diffusion") != full_config["diffusion"]:  # differ: the message
            raise ValueError(f"{resume_path}: the checkpoint's model/diffusion config differs from this run's "
                             f"({format_changes(differ) or 'entries differ'}); these must match to resume. Drop "
                             "the flags that change them, or start a new run in another --out-dir")
        ckpt.check_state_dict(model, ck.model, resume_path)
        model.load_state_dict(ck.model)
        if ema is not None:
            if ck.ema is None:
                raise ValueError(f"{resume_path}: the checkpoint has no EMA weights but ema_decay={cfg.ema_decay}")
            ema.load_state_dict(ck.ema)
        st = ck.state
        try:
            _load_optimizer_state(opt, st["optimizer"])
            step, skipped, updates = int(st["step"]), int(st["skipped"]), int(st["updates"])
            rngs = st["rng"]
            rng_restore = rngs[rank] if isinstance(rngs, list) and rank < len(rngs) else rngs[0] if isinstance(rngs, list) else rngs
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
            raise ckpt.CheckpointError(f"{resume_path}/state.pt: incomplete or incompatible training state ({e})") from e
        if is_main:
            saved_world = st.get("world_size", len(rngs) if isinstance(rngs, list) else 1)
            print(_resume_message(resume_path, step, ck.config.get("train") or {}, cfg, saved_world, world),
                  file=sys.stderr)
    if is_main:
        # the log holds exactly the steps before this one: a dead run's lines past its last checkpoint
        # (all of them, when it died before the first) would otherwise appear twice
        _truncate_log(log_path, step)

    # ---------------------------------------------------------------- wrap: DDP, compile, autocast
    train_model: torch.nn.Module = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    if use_compile:
        train_model = torch.compile(train_model)
    amp = (cfg.amp == "auto" and device.type == "cuda") or cfg.amp == "bf16"
    if rng_restore is not None:
        _set_rng_state(rng_restore, device)
    else:
        torch.manual_seed(_mix(cfg.seed, rank, 0x5EED))  # dropout stream, distinct per rank

    params = [p for p in model.parameters()]
    ema_params = [p for p in ema.parameters()] if ema is not None else []

    def save(at_step: int) -> Optional[str]:
        rng = _rng_state(device)
        if distributed:
            gathered: List[Any] = [None] * world
            dist.all_gather_object(gathered, {k: v.cpu() for k, v in rng.items()})
            rng_all: Any = gathered
        else:
            rng_all = [rng]
        path = None
        if is_main:
            state = {"optimizer": opt.state_dict(), "step": at_step, "skipped": skipped, "updates": int(updates_t),
                     "rng": rng_all, "world_size": world}
            path = ckpt.save_checkpoint(run_dir, at_step, full_config, model.state_dict(),
                                        ema.state_dict() if ema is not None else None, state, keep=cfg.keep)
        if distributed:
            dist.barrier()
        return path

    def sample_grid(at_step: int) -> None:
        net = ema if ema is not None else model
        was_training = net.training
        net.eval()
        y = None
        if num_classes:
            y = torch.arange(cfg.sample_num, device=device) % num_classes
        s = _make_sampler(cfg.sample_sampler, diffusion, cfg.sample_steps)
        shape = (cfg.sample_num, ds.channels, ds.image_size, ds.image_size)
        from .guards import NonFiniteSampleError

        try:
            with torch.no_grad():
                x = s.sample(_Conditioned(net, y), shape, seed=cfg.seed)
        except NonFiniteSampleError as e:  # a grid is a by-product: say so and keep training
            print(f"fastddpm train: step {at_step}: no sample grid: {e}", file=sys.stderr)
            net.train(was_training)
            return
        save_grid(x, os.path.join(run_dir, "samples", f"step_{at_step:08d}.png"), scale=max(1, 64 // ds.image_size))
        net.train(was_training)

    # ---------------------------------------------------------------- loop
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(full_config, f, indent=2, sort_keys=True)
    bar = None
    if is_main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr)
    losses: List[float] = []
    start_step = step
    consecutive = 0  # non-finite steps in a row, up to the last step read back
    last_ckpt: Optional[str] = None
    epoch_cache: Tuple[int, Optional[torch.Tensor]] = (-1, None)
    # No host sync inside a step: what a step produces stays on the device and is read at sync points
    # only, the log steps and the checkpoint and sample steps (which sync anyway). The skip of
    # a non-finite step is decided on the device too: fused AdamW skips its update and its step count
    # where `found_inf` is 1, the EMA's weight is multiplied by the finite flag, and `updates_t` (the EMA
    # warm-up's count) only counts finite steps. So the skip messages and the max_nonfinite stop come at
    # the next sync point, up to log_every - 1 steps late; the stop still names the exact steps, and it
    # comes before that point's checkpoint (no checkpoint holds a step after the stop).
    updates_t = torch.tensor(updates, dtype=torch.int64, device=device)
    win_sum = torch.zeros((), dtype=torch.float64, device=device)
    win_n = torch.zeros((), dtype=torch.float64, device=device)
    grad_norm = torch.full((), float("nan"), device=device)  # of the last applied update
    pending_loss: List[torch.Tensor] = []  # the per-step losses and finite flags since the last sync point
    pending_finite: List[torch.Tensor] = []

    def read_pending() -> None:
        """At a sync point: the steps since the last one into `losses`, their skip messages, the stop."""
        nonlocal skipped, consecutive
        if not pending_loss:
            return
        step_losses, flags = torch.stack([torch.stack(pending_loss), torch.stack(pending_finite).float()]).tolist()
        pending_loss.clear()
        pending_finite.clear()
        losses.extend(step_losses)
        for s, (value, ok) in enumerate(zip(step_losses, flags), start=step - len(flags) + 1):
            if ok:
                consecutive = 0
                continue
            skipped += 1
            consecutive += 1
            if is_main:
                msg = f"step {s}: non-finite loss ({value}), update skipped ({consecutive} in a row, {skipped} in all)"
                (bar.write(msg, file=sys.stderr) if bar is not None else print(msg, file=sys.stderr))
            if consecutive >= cfg.max_nonfinite:
                late = f" (seen at step {step}: losses are read at log, checkpoint and sample steps)" if s < step else ""
                raise NonFiniteLossError(
                    f"the loss was non-finite for {consecutive} consecutive steps (steps {s - consecutive + 1}..{s})"
                    f"{late}; stopping. The last checkpoint is {last_ckpt or ckpt.latest_checkpoint(run_dir)}. "
                    "Try a lower lr, a longer warmup_steps, grad_clip, or amp='none'."
                )

    win_t0, win_step0 = time.perf_counter(), step
    model.train()
    log_file = open(log_path, "a", encoding="utf-8") if is_main else None
    try:
        while step < cfg.steps:
            epoch, pos = divmod(step, steps_per_epoch)
            if epoch_cache[0] != epoch:
                sampler.set_epoch(epoch)
                epoch_cache = (epoch, torch.tensor(list(iter(sampler)), dtype=torch.int64))
            idx = epoch_cache[1][pos * local_batch : (pos + 1) * local_batch]
            g_cpu = torch.Generator().manual_seed(_mix(cfg.seed, rank, step, 1))
            g_dev = torch.Generator(device=device).manual_seed(_mix(cfg.seed, rank, step, 2))
            x0, y = ds.batch(idx, generator=g_cpu, device=device)
            if num_classes:
                drop = torch.rand(y.shape[0], generator=g_cpu) < cfg.p_uncond
                y = torch.where(drop.to(device, non_blocking=True), torch.full_like(y, num_classes), y)
            else:
                y = None
            t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), generator=g_dev, device=device)
            noise = torch.randn(x0.shape, generator=g_dev, device=device)

            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
            for group in opt.param_groups:
                group["lr"] = lr  # a Python float: fused AdamW passes it to its kernel as an argument
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                terms = diffusion.training_losses(_Conditioned(train_model, y), x0, t=t, noise=noise)
                loss = terms["loss"].float().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            finite = torch.isfinite(loss) & torch.isfinite(gn)
            if distributed:
                flag = (~finite).to(torch.float32).reshape(1)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                finite = flag[0] == 0
            step += 1
            opt.found_inf = (~finite).to(torch.float32)  # 1.0: the fused kernel leaves params and state alone
            opt.step()
            updates_t += finite
            if ema is not None:
                _ema_update(ema_params, params, updates_t, finite, cfg.ema_decay, cfg.ema_warmup)
            win_sum += torch.where(finite, loss.detach().double(), 0.0)
            win_n += finite
            grad_norm = torch.where(finite, gn.detach().float(), grad_norm)
            pending_loss.append(loss.detach().float())
            pending_finite.append(finite)

            log_now = step % cfg.log_every == 0 or step == cfg.steps
            save_now = bool(cfg.save_every) and step % cfg.save_every == 0 and step != cfg.steps
            sample_now = bool(cfg.sample_every) and step % cfg.sample_every == 0
            if log_now or save_now or sample_now:
                read_pending()  # a sync point: the stop check comes before its checkpoint
            if log_now:
                buf = torch.stack([win_sum, win_n])
                if distributed:
                    dist.all_reduce(buf)
                total, count, grad_norm_val = torch.cat([buf, grad_norm.double().reshape(1)]).tolist()
                mean_loss = total / count if count > 0 else float("nan")
                now = time.perf_counter()
                ips = (step - win_step0) / max(now - win_t0, 1e-9)
                if is_main:
                    rec = {"step": step, "loss": mean_loss, "lr": lr, "grad_norm": grad_norm_val, "skipped": skipped,
                           "it_per_s": ips, "time": time.time()}
                    log_file.write(json.dumps(rec) + "\n")
                    log_file.flush()
                    if bar is not None:
                        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", skipped=skipped, refresh=False)
                win_sum.zero_()
                win_n.zero_()
                win_t0, win_step0 = now, step
            if bar is not None:
                bar.update(1)

            if save_now:
                last_ckpt = save(step) or last_ckpt
            if sample_now and is_main:
                sample_grid(step)
        # always end with a checkpoint of the final step (unless a resumed run had nothing left to do)
        if step > start_step or resume_path is None:
            last_ckpt = save(step) or last_ckpt
        else:
            last_ckpt = resume_path
    finally:
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()
    return TrainResult(step=step, losses=losses, skipped=skipped, checkpoint=last_ckpt, out_dir=run_dir,
                       model=model, ema=ema)

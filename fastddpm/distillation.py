"""Data-free distillation: students that sample in K = 1-4 model calls from any trained fastddpm model.

    import fastddpm as fd
    result = fd.distill(calls=(1, 2, 4), out_dir="runs/distill")   # the bundled model
    pipe = fd.load("runs/distill")
    images = pipe(16, num_inference_steps=2).images                              # 2 model calls

Method (trajectory distillation, unrolled): draw x_T ~ N(0, I) (Philox, as every sampler), run the
teacher's deterministic solver (default UniPC, 20 calls, trailing spacing) to its x_0, and keep the
pairs (x_T, x_0) (no training data is read). Student K starts as a copy of the teacher and samples
with deterministic DDIM (eta = 0) at its own K timesteps (trailing spacing: 999, 499 for K = 2 on a
1000-step schedule); it is trained so that its whole K-step chain, unrolled and differentiated end to
end, lands where the teacher lands: loss = mean (student_chain_K(x_T) - x_0)^2. The chain is the fused
op's own reference (`sampler_step_reference`), so what is trained is exactly what `FastSampler` runs.

Model kinds: eps, x0 and v predictions, any schedule (the DDIM table handles all three). A
learned-range model's variance channels are ignored (kept as the teacher's: deterministic DDIM never
reads them). A class-conditional model is distilled as its guided version at `guidance_scale`: the
pairs come from the guided teacher with labels drawn per pair, and the student is called with those
labels (and samples with one call per step, no guidance branch).

The optimisation is `fastddpm.train.TrainLoop` (`DistillLoop`: the objective and the batches of pairs),
so a distillation run is a training run: AdamW with warm-up (then a cosine decay), gradient clipping,
non-finite steps skipped, EMA, atomic checkpoints with checksums, exact `--resume`, `--overwrite`, a run
lock, ``log.jsonl`` (with the loss of every K), a progress bar, a checkpoint on the first Ctrl-C, and
data-parallel under torchrun. The teacher pairs are stored once in the run directory
(``teacher_pairs.safetensors``, their x_T from `pair_seed(seed)`: never the noise a user samples with)
and reused when their settings match.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import build
from . import checkpoint as ckpt
from .fileio import atomic_write_json
from ._names import DETERMINISTIC_SAMPLERS, DISTILL_CONFIG_KEY
from .ops.sampler_step import sampler_step_reference
from .samplers import DDIMSampler, make_sampler
from .spacing import make_timesteps
from .train import TrainLoop
from .student import StudentSet, ddim_sampler, distilled_calls, is_distilled, student_prediction_of, student_timesteps_of

__all__ = ["DistillConfig", "DistillResult", "DistillLoop", "ChainObjective", "distill", "loop_config",
           "student_timesteps", "student_sampler",
           "student_prediction", "ddim_chain", "image_losses", "loss_for", "pair_seed",
           "teacher_pairs", "train_step", "export_students", "PAIRS_FILE", "VAL_PAIRS_FILE", "LOG_FILE"]

PAIRS_FILE = "teacher_pairs.safetensors"
VAL_PAIRS_FILE = "val_pairs.safetensors"  # held-out pairs: the validation loss
LOG_FILE = "log.jsonl"  # the training loop's
IMAGE_LOSSES = ("pseudo-huber", "x0")  # see image_losses
LOSSES = ("auto",) + IMAGE_LOSSES  # "auto": see loss_for
STUDENT_PREDICTIONS = ("auto", "teacher", "eps", "x0", "v")
LR_SCHEDULES = ("cosine", "constant")
AMP = ("none", "bf16", "auto")


def student_prediction(choice: str, calls: int, teacher_prediction: str) -> List[str]:
    """How student K reads its output at each of its K steps. "teacher": the teacher's everywhere (the student
    starts as the teacher's DDIM); "eps" / "x0" / "v": that everywhere; "auto": for an eps teacher "x0" at the
    first step (x_T, t = T - 1) and "eps" after it, else the teacher's. At the first step an eps output
    gives x0 = (x_T - sqrt(1 - ab) eps) / sqrt(ab) with 1 / sqrt(ab) ~ 2e4 on a cosine schedule: it cannot be
    learnt to that precision, and the clip to [-1, 1] zeroes its gradient; an x0 output is well conditioned."""
    k = int(calls)
    if choice == "auto":
        return (["x0"] + [teacher_prediction] * (k - 1)) if teacher_prediction == "eps" else [teacher_prediction] * k
    return [teacher_prediction if choice == "teacher" else choice] * k


@dataclass
class DistillConfig:
    """What `distill` runs. Every field but `keep` and `pair_batch` is a `fastddpm distill` flag of the same name.

    checkpoint: the teacher (None: the bundled digits model). calls: the K to distil (one student each).
    steps: optimizer steps (each updates every student on one batch of pairs). out_dir: the run directory.
    resume: continue the run in out_dir exactly. overwrite: replace the run out_dir holds.
    batch_size (global, divided among DDP processes), lr: AdamW's batch and peak learning rate; warmup_steps:
    linear warm-up; lr_schedule: "cosine" (to 0 at `steps`) or "constant" after it; grad_clip: max global
    gradient norm (0 disables); amp: "none" (fp32), "bf16" autocast, "auto" (bf16 on CUDA).
    num_pairs: teacher trajectories drawn (x_T, x_0). val_pairs: more of them, held out (the images after the
    training pairs' in the same noise stream; a class-conditional teacher's labels for them from a stream of their
    own): the validation loss of the sampled (EMA) students, logged at every checkpoint step that is a log step and
    at the end (0: none). pairs: read them from this file (or run directory) of
    another run with the same teacher and pair settings instead of drawing them (e.g. one run per K). teacher_sampler / teacher_steps / teacher_spacing:
    the teacher's deterministic solver. spacing: the students' timesteps ("trailing", "uniform", ...).
    guidance_scale: class-conditional teachers only (distil the guided model at this w).
    ema_decay: EMA of the student weights (what is sampled by default). clip: clamp x0-hat to [-1, 1].
    student_prediction: how each student reads its output per step (see `student_prediction`).
    loss: the distance of a student's x_0 to the teacher's, "auto", "pseudo-huber" or "x0" (see `loss_for`).
    device: "auto", "cpu", "cuda" or "cuda:N". The other fields: checkpointing and logging.
    """

    checkpoint: Optional[str] = None
    calls: Tuple[int, ...] = (1, 2, 3, 4)
    steps: int = 2000
    out_dir: str = "runs/distill"
    resume: bool = False
    batch_size: int = 64
    lr: float = 3e-4
    warmup_steps: int = 100
    lr_schedule: str = "cosine"
    grad_clip: float = 1.0
    amp: str = "none"
    overwrite: bool = False
    num_pairs: int = 32768
    val_pairs: int = 1024
    teacher_sampler: str = "unipc"
    teacher_steps: int = 20
    teacher_spacing: str = "trailing"
    spacing: str = "trailing"
    loss: str = "auto"
    guidance_scale: Optional[float] = None
    student_prediction: str = "auto"
    ema_decay: float = 0.995
    clip: bool = True
    seed: int = 0
    save_every: int = 500
    log_every: int = 25
    keep: int = 2
    pair_batch: int = 500
    pairs: Optional[str] = None
    device: str = "auto"
    progress: bool = True

    def validate(self) -> "DistillConfig":
        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")

        calls = tuple(self.calls) if not isinstance(self.calls, int) else (self.calls,)
        if not calls or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in calls):
            raise bad("calls", "one or more positive ints (model calls per image)")
        if len(set(calls)) != len(calls):
            raise bad("calls", "distinct model-call counts")
        self.calls = tuple(sorted(calls))
        for name in ("steps", "batch_size", "num_pairs", "teacher_steps", "save_every", "log_every", "pair_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, "a positive int")
        if isinstance(self.val_pairs, bool) or not isinstance(self.val_pairs, int) or self.val_pairs < 0:
            raise bad("val_pairs", "an int >= 0 (0: no validation loss)")
        if self.keep is not None and (isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 0):
            raise bad("keep", "a non-negative int")
        if max(self.calls) > self.teacher_steps:
            raise ValueError(f"calls must be at most the teacher's steps (--teacher-steps {self.teacher_steps}): a "
                             f"student cannot be distilled from a coarser solver, got {list(self.calls)}")
        if self.teacher_sampler not in DETERMINISTIC_SAMPLERS:
            raise bad("teacher_sampler", f"a deterministic sampler {DETERMINISTIC_SAMPLERS}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise bad("lr", "a learning rate in (0, 1)")
        if not (isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay < 1):
            raise bad("ema_decay", "in [0, 1)")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise bad("warmup_steps", "an int >= 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise bad("lr_schedule", f"one of {LR_SCHEDULES}")
        if isinstance(self.grad_clip, bool) or not isinstance(self.grad_clip, (int, float)) or not self.grad_clip >= 0:
            raise bad("grad_clip", "a number >= 0 (0 disables clipping)")
        if self.amp not in AMP:
            raise bad("amp", f"one of {AMP}")
        if self.overwrite and self.resume:
            raise ValueError("overwrite (--overwrite) replaces the run in out_dir and resume (--resume) continues it: "
                             "give one of them")
        if self.batch_size > self.num_pairs:
            raise bad("batch_size", f"at most num_pairs ({self.num_pairs})")
        if self.student_prediction not in STUDENT_PREDICTIONS:
            raise bad("student_prediction", f"one of {STUDENT_PREDICTIONS}")
        if self.loss not in LOSSES:
            raise bad("loss", f"one of {LOSSES}")
        if self.pairs is not None:
            found = os.path.join(self.pairs, PAIRS_FILE) if os.path.isdir(self.pairs) else self.pairs
            if not os.path.isfile(found):
                raise bad("pairs", f"a {PAIRS_FILE} file or a distillation run directory holding one")
        if self.guidance_scale is not None and not isinstance(self.guidance_scale, (int, float)):
            raise bad("guidance_scale", "a number or None")
        return self

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["calls"] = list(self.calls)
        return d


@dataclass
class DistillResult:
    """What `distill` returns: the run directory, its newest checkpoint, the students' timesteps, the losses
    of every step this invocation ran ({"step", "loss", "loss_K"}; under torchrun this process's share of
    the batch), the validation losses it logged ({"step", "loss_K", "val_loss_K"}: the log window's training loss
    and the sampled students' loss on the held-out pairs), and the wall and CPU (process) time of this invocation."""

    out_dir: str
    checkpoint: str
    timesteps: Dict[int, List[int]]
    losses: List[Dict[str, float]] = field(default_factory=list)
    val_losses: List[Dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0


# ------------------------------------------------------------------------------ the student's sampler
def student_timesteps(diffusion: Any, calls: int, spacing: str = "trailing") -> List[int]:
    """The K timesteps (descending) a K-call student samples at."""
    return [int(t) for t in make_timesteps(diffusion.schedule, int(calls), spacing)]


# deterministic DDIM at the student's timesteps, step s reading the output as predictions[s]: what a student runs
student_sampler = ddim_sampler


def ddim_chain(model: Callable[..., Any], sampler: DDIMSampler, x: torch.Tensor, clip: bool = True,
               model_kwargs: Optional[Dict[str, Any]] = None) -> torch.Tensor:
    """The sampler's deterministic chain from x (= x_T) as a differentiable function of the model.

    Each step is the fused op's reference implementation with the sampler's own coefficient table,
    so the result equals `sampler.sample` from the same x_T (tests check it).
    """
    coefs = sampler.coefs.to(device=x.device, dtype=torch.float32)
    c = x.shape[1]
    kw = model_kwargs or {}
    for s, t in enumerate(sampler._model_timesteps.tolist()):
        out = model(x, torch.full((x.shape[0],), int(t), dtype=torch.int64, device=x.device), **kw)
        out = out if isinstance(out, torch.Tensor) else out.sample
        step = torch.tensor([s], dtype=torch.int64, device=x.device)
        x, _ = sampler_step_reference(x, out[:, :c], coefs, step, clip=clip)
    return x


# ------------------------------------------------------------------------------ teacher pairs
def _labels(num: int, num_classes: int, seed: int) -> torch.Tensor:
    return torch.randint(num_classes, (num,), generator=torch.Generator().manual_seed(seed + 7919))


def pair_seed(seed: int) -> int:
    """The Philox seed of a run's x_T: a 63-bit hash of `seed`, so the training noise is never the noise a user (or a
    quality table) samples with the same small seed: a student is judged on x_T it was not trained on."""
    from .train import _mix

    return _mix(int(seed), 0xD157_1135)


@torch.no_grad()
def teacher_pairs(model: Callable[..., Any], diffusion: Any, shape: Sequence[int], num: int, seed: int = 0, *,
                  sampler: str = "unipc", steps: int = 20, spacing: str = "trailing", clip: bool = True,
                  batch: int = 500, labels: Optional[torch.Tensor] = None, guidance_scale: Optional[float] = None,
                  progress: bool = False, start: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x_T, x_0) of `num` teacher trajectories, images start .. start + num - 1: x_T from Philox `seed` (image i
    the same whatever `batch` and `start`; `distill` passes `pair_seed(cfg.seed)`), x_0 from the teacher's
    deterministic `sampler` at `steps` calls; `labels`: one per trajectory (class-conditional teachers)."""
    from .ops.philox import philox_normal

    smp = make_sampler(sampler, diffusion, steps=steps, spacing=spacing)
    xs, x0s = [], []
    rng = range(0, num, batch)
    if progress:
        from tqdm.auto import tqdm

        rng = tqdm(rng, desc=f"teacher pairs ({sampler}, {steps} calls)", unit="batch")
    zero = torch.zeros(1, dtype=torch.int64)
    for i in rng:
        n = min(batch, num - i)
        full = (n, *shape)
        at = start + i
        xs.append(philox_normal(torch.tensor([seed]), full, zero, stream=1, image_offset=at))  # CPU: stored as drawn
        if labels is None:
            x0s.append(smp.sample(model, full, seed=seed, clip_denoised=clip, image_offset=at).cpu())
        else:
            from .guidance import GuidedModel

            dev = next(model.parameters()).device
            g = GuidedModel(model, labels[i:i + n].to(dev), guidance_scale, model.num_classes, shape[0])
            x0s.append(smp.sample(g, full, seed=seed, clip_denoised=clip, image_offset=at).cpu())
    return torch.cat(xs), torch.cat(x0s)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes, values): which teacher drew a pair file."""
    import hashlib

    h = hashlib.sha256()
    for name, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------ teacher loading and checks
def _load_teacher(checkpoint: Optional[str]) -> Tuple[torch.nn.Module, Any, Dict[str, Any], str]:
    """(model, diffusion, config, path) of a teacher; ValueError naming `checkpoint` when it is not one."""
    try:
        path = ckpt.resolve_checkpoint(checkpoint)
        probe = ckpt.load_checkpoint(path, load_state=False, load_model=False, load_ema=False)
    except ckpt.CheckpointError as e:
        raise ValueError(f"checkpoint must be a trained fastddpm diffusion model: {e}") from None
    cfg = probe.config
    if not isinstance(cfg.get("model"), dict) or not isinstance(cfg.get("diffusion"), dict):
        raise ValueError(f"checkpoint must be a trained fastddpm diffusion model (a config with 'model' and "
                         f"'diffusion' entries), got {path!r}")
    if is_distilled(cfg):
        raise ValueError(f"checkpoint must be a diffusion model, not a distilled student set: {path!r}")
    model, diffusion, config = build.load_model(path, device="cpu")
    return model, diffusion, config, path


def _check_out_dir(cfg: DistillConfig) -> None:
    """ValueError when out_dir holds what this run may not continue: a training run (its checkpoints or
    config.json), or a distillation run that a fresh run (no --resume, no --overwrite) would mix with its own."""
    if cfg.overwrite or not os.path.isdir(cfg.out_dir):
        return
    latest = ckpt.latest_checkpoint(cfg.out_dir)
    config: Any = None
    if latest is not None:
        config = ckpt.load_checkpoint(latest, load_state=False, load_model=False, load_ema=False).config
    elif os.path.isfile(os.path.join(cfg.out_dir, "config.json")):
        from .jsonio import load_file

        try:
            config = load_file(os.path.join(cfg.out_dir, "config.json"))
        except ValueError:
            config = None  # unreadable: the loop's own checks of the run directory say so
    if config is not None and not is_distilled(config):
        raise ValueError(f"out_dir {cfg.out_dir!r} holds a training run, not a distillation run: --resume continues "
                         "only `fastddpm distill` runs; choose another --out-dir (or --overwrite to replace it)")
    if latest is not None and not cfg.resume:
        raise ValueError(f"out_dir {cfg.out_dir!r} already holds a distillation run: pass --resume to continue it, "
                         "--overwrite to replace it, or choose another --out-dir")
    if latest is not None:  # checked before the pairs are drawn (minutes for a large teacher)
        entry = config[DISTILL_CONFIG_KEY]
        if "train" not in entry:
            raise ValueError(f"out_dir {cfg.out_dir!r} holds a distillation run made by an older fastddpm (another "
                             "optimisation loop): it cannot be resumed; choose another --out-dir or --overwrite")
        _check_resume_config(entry.get("config") or {}, cfg)


# what a resumed run may not change (the pairs, the students' samplers, the objective, the optimisation);
# `steps` may grow (with the cosine schedule the decay then stretches to the new end)
_RESUME_FIXED = ("checkpoint", "calls", "batch_size", "num_pairs", "teacher_sampler", "teacher_steps",
                 "teacher_spacing", "spacing", "loss", "guidance_scale", "clip", "seed", "lr", "ema_decay",
                 "student_prediction", "lr_schedule", "warmup_steps")


def _check_resume_config(saved: Dict[str, Any], cfg: DistillConfig) -> None:
    now = cfg.to_dict()
    diff = [f"{k}: run {saved.get(k)!r} vs now {now[k]!r}" for k in _RESUME_FIXED if saved.get(k) != now[k]]
    if diff:
        raise ValueError("--resume: the run was made with other settings (" + "; ".join(diff) + "); pass the "
                         "same ones or choose another --out-dir")


# ------------------------------------------------------------------------------ pairs on disk
def _pairs(cfg: DistillConfig, teacher: torch.nn.Module, diffusion: Any, shape: Tuple[int, ...],
           labels: Optional[torch.Tensor], rank: int = 0, world: int = 1,
           device: torch.device = torch.device("cpu"), held_out: bool = False,
           fingerprint: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The teacher pairs of the run (`held_out`: the validation pairs, the `val_pairs` images after the training
    ones in the same noise stream): read from out_dir (or the run `cfg.pairs` names) when stored with the same
    settings, else drawn and stored (rank 0). Under torchrun each of the `world` processes draws a slice and
    they exchange them. `fingerprint`: the teacher's `weights_fingerprint`, when the caller has it."""
    from safetensors.torch import load_file, save_file

    name, num, first = (VAL_PAIRS_FILE, cfg.val_pairs, cfg.num_pairs) if held_out else (PAIRS_FILE, cfg.num_pairs, 0)
    path = os.path.join(cfg.out_dir, name)
    meta = {"num_pairs": num, "seed": cfg.seed, "philox_seed": pair_seed(cfg.seed), "sampler": cfg.teacher_sampler,
            "steps": cfg.teacher_steps, "spacing": cfg.teacher_spacing, "clip": cfg.clip,
            "guidance_scale": cfg.guidance_scale, "teacher": fingerprint or weights_fingerprint(teacher)}
    if held_out:
        meta["first_image"] = first
    meta = json.loads(json.dumps(meta))
    given = None
    if cfg.pairs is not None:
        given = os.path.join(cfg.pairs, PAIRS_FILE) if os.path.isdir(cfg.pairs) else cfg.pairs
        given = os.path.join(os.path.dirname(given), name) if held_out else given
    for p in (given, path):
        if p is None or not os.path.isfile(p):
            continue
        from safetensors import safe_open

        with safe_open(p, "pt") as f:
            stored = json.loads((f.metadata() or {}).get("fastddpm_pairs", "{}"))
        if stored == meta:
            return load_file(p)
        if not held_out and {**stored, "num_pairs": num} == meta and int(stored.get("num_pairs", 0)) > num:
            # more pairs of the same stream (image i is the same whatever the number drawn): the first `num`
            return {k: v[:num].clone() for k, v in load_file(p).items()}
        if p == given and not held_out:  # another run's held-out pairs may differ: this run draws its own
            differ = sorted(k for k in meta.keys() | stored.keys() if stored.get(k) != meta.get(k))
            raise ValueError(f"pairs {cfg.pairs!r} were drawn with other settings ({', '.join(differ)} differ): pass "
                             "the same teacher and pair settings, or leave --pairs out to draw them")
    per = -(-num // world)
    lo, hi = min(rank * per, num), min((rank + 1) * per, num)
    x_T, x_0 = teacher_pairs(teacher, diffusion, shape, hi - lo, pair_seed(cfg.seed), sampler=cfg.teacher_sampler,
                             steps=cfg.teacher_steps, spacing=cfg.teacher_spacing, clip=cfg.clip,
                             batch=cfg.pair_batch, labels=None if labels is None else labels[lo:hi],
                             guidance_scale=cfg.guidance_scale, progress=cfg.progress and rank == 0, start=first + lo)
    if world > 1:
        x_T, x_0 = (_gather_slices(v, per, num, device) for v in (x_T, x_0))
    out = {"x_T": x_T.contiguous(), "x_0": x_0.contiguous()}
    if labels is not None:
        out["y"] = labels.contiguous()
    if rank != 0:
        return out
    os.makedirs(cfg.out_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    save_file(out, tmp, metadata={"fastddpm_pairs": json.dumps(meta)})
    os.replace(tmp, path)
    return out


def _gather_slices(part: torch.Tensor, per: int, num: int, device: torch.device) -> torch.Tensor:
    """Every process's slice (`per` rows each, the last ones padded) concatenated: the first `num` rows, on CPU."""
    import torch.distributed as dist

    padded = torch.zeros((per, *part.shape[1:]), dtype=part.dtype, device=device)
    padded[:part.shape[0]] = part.to(device)
    out = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(out, padded)
    return torch.cat(out)[:num].cpu()


def loss_for(loss: str, calls: int) -> str:
    """The loss student K trains with: `loss`, or for "auto" the squared one ("x0") for K <= 2 and "pseudo-huber"
    for K >= 3 (on the bundled model the pseudo-Huber students scored a far better digits-FD at 3 and 4 calls and a
    far worse one at 1 and 2: see docs/distillation.md)."""
    if loss == "auto":
        return "x0" if int(calls) <= 2 else "pseudo-huber"
    return loss


def image_losses(pred: torch.Tensor, x_0: torch.Tensor, loss: str = "x0") -> torch.Tensor:
    """The distance of each student image to the teacher's x_0 (one value per image), e = pred - x_0 over its D values.

    "x0": mean_D e^2. "pseudo-huber": sqrt(||e||^2 + c^2) - c with c = 0.00054 sqrt(D) (Song & Dhariwal 2023,
    improved consistency training): about ||e||, so the gradient of every image has about the same size. Where
    the teacher's map x_T -> x_0 turns sharply (one x_T to a 3, a nearby one to an 8) a squared loss pulls the
    student to the average of the two digits, a blend; this one to either.
    """
    e = (pred.float() - x_0.float()).flatten(1)
    if loss == "x0":
        return e.square().mean(1)
    if loss != "pseudo-huber":
        raise ValueError(f"loss must be one of {IMAGE_LOSSES}, got {loss!r}")
    c = 0.00054 * math.sqrt(e.shape[1])
    return (e.square().sum(1) + c * c).sqrt() - c  # fp32: about ulp(c) ~ 5e-10 of rounding near e = 0


class ChainObjective(torch.nn.Module):
    """Every student's loss in one forward: forward(x_T, x_0, y=None) -> [loss_K for K in `samplers`], with
    loss_K = the mean over the batch of `image_losses(chain_K(x_T), x_0, loss_for(loss, K))` (the chain: `ddim_chain`). One
    module and one forward per step, so that DistributedDataParallel all-reduces the gradients of every student
    once."""

    def __init__(self, students: StudentSet, samplers: Dict[int, DDIMSampler], clip: bool = True, loss: str = "x0"):
        super().__init__()
        self.students, self.samplers, self.clip, self.loss = students, dict(samplers), clip, loss

    def forward(self, x_T: torch.Tensor, x_0: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.stack([v.mean() for v in self.per_image(self.students, x_T, x_0, y)])

    def per_image(self, students: StudentSet, x_T: torch.Tensor, x_0: torch.Tensor,
                  y: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """[each image's loss under student K, for K in `samplers`] with `students` (these weights or a copy of
        them, e.g. their EMA)."""
        kw = {"y": y} if y is not None else None
        return [image_losses(ddim_chain(students.for_calls(k), smp, x_T, self.clip, kw), x_0, loss_for(self.loss, k))
                for k, smp in self.samplers.items()]


def train_step(students: StudentSet, samplers: Dict[int, DDIMSampler], x_T: torch.Tensor, x_0: torch.Tensor,
               opt: torch.optim.Optimizer, clip: bool = True,
               model_kwargs: Optional[Dict[str, Any]] = None) -> Dict[int, float]:
    """One plain optimizer step of every student on (x_T, x_0) with `ChainObjective`: {K: loss_K} before the step.
    (`distill` runs the same objective inside the training loop.)"""
    opt.zero_grad(set_to_none=True)
    terms = ChainObjective(students, samplers, clip)(x_T, x_0, (model_kwargs or {}).get("y"))
    terms.sum().backward()
    opt.step()
    return dict(zip(samplers, terms.detach().tolist()))


# ------------------------------------------------------------------------------ the loop
def _run_config(cfg: DistillConfig, tcfg: Any, tconfig: Dict[str, Any], tpath: str,
                timesteps: Dict[int, List[int]], predictions: Dict[int, List[str]]) -> Dict[str, Any]:
    """The checkpoint config of a student set: the teacher's model and diffusion, plus "distill"."""
    out = {k: tconfig[k] for k in ("model", "diffusion", "data") if k in tconfig}
    out[DISTILL_CONFIG_KEY] = {
        "calls": {str(k): ts for k, ts in timesteps.items()},
        "prediction": {str(k): p for k, p in predictions.items()},  # per step
        "sampler": "ddim (eta = 0) at the timesteps of 'calls'",
        "method": "trajectory: unrolled K-step chain, distance to the teacher's x_0 from the same x_T",
        "loss": {str(k): loss_for(cfg.loss, k) for k in timesteps},
        "teacher": {"checkpoint": tpath, "sampler": cfg.teacher_sampler, "steps": cfg.teacher_steps,
                    "spacing": cfg.teacher_spacing, "guidance_scale": cfg.guidance_scale},
        "variance_channels": "ignored (the teacher's, untrained: deterministic DDIM does not read them)",
        "config": cfg.to_dict(),
        "train": tcfg.to_dict(),  # the loop's settings (fastddpm.train.TrainConfig)
    }
    return out


def loop_config(cfg: DistillConfig) -> Any:
    """The `fastddpm.train.TrainConfig` the distillation's training loop runs with (its optimisation, output
    and robustness fields; the data and model fields are unused)."""
    from .train import TrainConfig

    return TrainConfig(dataset="teacher pairs", steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                       warmup_steps=cfg.warmup_steps, grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay,
                       ema_warmup=True, amp=cfg.amp, compile=False, seed=cfg.seed, device=cfg.device,
                       out_dir=cfg.out_dir, save_every=cfg.save_every, keep=cfg.keep, sample_every=0,
                       log_every=cfg.log_every, progress=cfg.progress, resume=cfg.resume,
                       overwrite=cfg.overwrite).validate()


class DistillLoop(TrainLoop):
    """`fastddpm.train.TrainLoop` with the distillation objective: the model is the StudentSet, a batch is
    this process's share of a global batch of teacher pairs (an epoch permutation of the pairs from
    (seed, epoch): the same global batches whatever the number of processes), the loss is the sum over K
    of `ChainObjective`'s loss_K. Dropout stays off (the students learn the deterministic map they run);
    the learning rate warms up linearly, then follows `lr_schedule`. Each log record adds the window's mean
    loss_K per K, and at the checkpoint steps and the last step val_loss_K, the loss of the sampled (EMA)
    students on the held-out pairs `val` (their fit to pairs they never trained on); `per_k` holds every
    step's {"step", "loss", "loss_K"}, `val_log` the {"step", "loss_K", "val_loss_K"} records (loss_K: the log
    window's mean, the raw weights on the training pairs)."""

    command = "distill"
    train_mode = False

    def __init__(self, dcfg: DistillConfig, students: StudentSet, diffusion: Any, config: Dict[str, Any],
                 samplers: Dict[int, DDIMSampler], pairs: Dict[str, torch.Tensor],
                 val: Optional[Dict[str, torch.Tensor]] = None, **kw: Any):
        super().__init__(loop_config(dcfg), students, diffusion, config, **kw)
        self.dcfg, self.pairs, self.val, self.calls = dcfg, pairs, val, list(samplers)
        self.objective = ChainObjective(students, samplers, dcfg.clip, dcfg.loss)
        self._epoch: Tuple[int, Optional[torch.Tensor]] = (-1, None)
        self._terms = torch.zeros(len(self.calls), device=self.device)
        self.win_terms = torch.zeros(len(self.calls), dtype=torch.float64, device=self.device)  # counted by win_n
        self.pending_terms: List[torch.Tensor] = []
        self.per_k: List[Dict[str, float]] = []
        self.val_log: List[Dict[str, float]] = []

    def train_module(self) -> torch.nn.Module:
        return self.objective

    def get_batch(self, step: int) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        n, batch = self.pairs["x_T"].shape[0], self.cfg.batch_size
        epoch, pos = divmod(step, n // batch)
        if self._epoch[0] != epoch:
            from .train import _mix

            g = torch.Generator().manual_seed(_mix(self.cfg.seed, epoch, 0xBA7C4))
            self._epoch = (epoch, torch.randperm(n, generator=g))
        local = batch // self.world
        first = pos * batch + self.rank * local
        idx = self._epoch[1][first:first + local].to(self.device)
        y = self.pairs["y"][idx] if "y" in self.pairs else None
        return self.pairs["x_T"][idx], self.pairs["x_0"][idx], y

    def compute_loss(self, batch: Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]) -> torch.Tensor:
        terms = self.train_model(*batch)
        self._terms = terms.detach().float()
        return terms.sum()

    def lr_at(self, step: int) -> float:
        warm = super().lr_at(step)
        if self.dcfg.lr_schedule == "constant" or step < self.cfg.warmup_steps:
            return warm
        span = max(self.cfg.steps - self.cfg.warmup_steps, 1)
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(step - self.cfg.warmup_steps, span) / span))

    def train_step(self, batch: Any) -> None:
        super().train_step(batch)
        ok = self.pending_finite[-1]  # the loop's: loss and gradient finite on every rank
        self.win_terms += torch.where(ok, self._terms.double(), 0.0)
        self.pending_terms.append(self._terms)

    def read_pending(self) -> None:
        if self.pending_terms:
            first = self.step - len(self.pending_terms) + 1
            for s, row in enumerate(torch.stack(self.pending_terms).tolist(), start=first):
                self.per_k.append({"step": s, "loss": sum(row), **{f"loss_{k}": v for k, v in zip(self.calls, row)}})
            self.pending_terms.clear()
        super().read_pending()

    def log_extras(self) -> Dict[str, Any]:
        buf = torch.cat([self.win_terms, self.win_n.reshape(1)])
        if self.distributed:
            torch.distributed.all_reduce(buf)
        *sums, count = buf.tolist()
        self.win_terms.zero_()
        out = {f"loss_{k}": (v / count if count else float("nan")) for k, v in zip(self.calls, sums)}
        every = self.cfg.save_every
        if self.val is not None and (self.step == self.cfg.steps or (every and self.step % every == 0)):
            val = {f"val_loss_{k}": v for k, v in self.val_losses().items()}
            self.val_log.append({"step": self.step, **out, **val})  # with the log window's training loss_K
            out.update(val)
        return out

    @torch.no_grad()
    def val_losses(self, chunk: int = 256) -> Dict[int, float]:
        """{K: the training objective (`image_losses`, mean over the images)} of the sampled students (the EMA's,
        else the weights) on the held-out pairs; under torchrun each process takes a slice and they sum."""
        net = self.ema if self.ema is not None else self.model
        n = self.val["x_T"].shape[0]
        lo, hi = n * self.rank // self.world, n * (self.rank + 1) // self.world
        sums = torch.zeros(len(self.calls) + 1, dtype=torch.float64, device=self.device)
        for i in range(lo, hi, chunk):
            j = min(i + chunk, hi)
            x_T, x_0 = (self.val[key][i:j].to(self.device) for key in ("x_T", "x_0"))
            y = self.val["y"][i:j].to(self.device) if "y" in self.val else None
            for s, v in enumerate(self.objective.per_image(net, x_T, x_0, y)):
                sums[s] += v.sum()
            sums[-1] += x_0.shape[0]
        if self.distributed:
            torch.distributed.all_reduce(sums)
        *errs, count = sums.tolist()
        return {k: e / count for k, e in zip(self.calls, errs)}

    def saved_train_config(self, ck: ckpt.Checkpoint) -> Dict[str, Any]:
        return (ck.config.get(DISTILL_CONFIG_KEY) or {}).get("train") or {}

    def restore(self, ck: ckpt.Checkpoint) -> Dict[str, Any]:
        _check_resume_config((ck.config.get(DISTILL_CONFIG_KEY) or {}).get("config") or {}, self.dcfg)
        return super().restore(ck)


def distill(config: Optional[DistillConfig] = None, **kwargs: Any) -> DistillResult:
    """Distil a trained model into one K-call student per K in `calls` (see the module docstring).

    `distill(calls=(1, 2, 4), steps=2000, out_dir="runs/d")` or `distill(DistillConfig(...))`. Returns a
    :class:`DistillResult`; the students are the run's checkpoint (`fd.load(out_dir)`,
    `fastddpm sample --checkpoint out_dir --steps K`). Under torchrun (WORLD_SIZE > 1) it runs data-parallel
    as `fastddpm.train.train` does: each process its share of every global batch, rank 0 writes.
    """
    from .train import run_training

    cfg = copy.deepcopy(config) if config is not None else DistillConfig()
    for k, v in kwargs.items():
        if not hasattr(cfg, k):
            raise TypeError(f"distill() got an unexpected keyword argument {k!r}")
        setattr(cfg, k, v)
    cfg.validate()
    _check_out_dir(cfg)
    t_start, c_start = time.perf_counter(), time.process_time()
    result = run_training(loop_config(cfg), lambda tcfg, rank, world, device, distributed: _distill(
        cfg, tcfg, rank, world, device, distributed))
    result.seconds = time.perf_counter() - t_start
    result.cpu_seconds = time.process_time() - c_start
    return result


def _distill(cfg: DistillConfig, tcfg: Any, rank: int, world: int, device: torch.device,
             distributed: bool) -> DistillResult:
    """The body of `distill` inside `run_training` (device, process group, run lock)."""
    if cfg.batch_size % world:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the number of processes ({world})")
    teacher, diffusion, tconfig, tpath = _load_teacher(cfg.checkpoint)
    teacher.requires_grad_(False).to(device)
    num_classes = getattr(teacher, "num_classes", None)
    if num_classes and cfg.guidance_scale is None:
        raise ValueError("guidance_scale is required for a class-conditional teacher (--guidance-scale W: the "
                         "guided model at W is distilled)")
    if not num_classes and cfg.guidance_scale is not None:
        raise ValueError("guidance_scale applies to class-conditional teachers only; this one has no classes")
    timesteps = {k: student_timesteps(diffusion, k, cfg.spacing) for k in cfg.calls}
    predictions = {k: student_prediction(cfg.student_prediction, k, diffusion.prediction) for k in cfg.calls}
    samplers = {k: student_sampler(diffusion, ts, predictions[k]) for k, ts in timesteps.items()}
    shape = (int(teacher.in_channels), int(teacher.image_size), int(teacher.image_size))
    labels = _labels(cfg.num_pairs, num_classes, cfg.seed) if num_classes else None
    fp = weights_fingerprint(teacher)  # hashed once: both pair files name their teacher
    pairs = {k: v.to(device) for k, v in _pairs(cfg, teacher, diffusion, shape, labels, rank, world, device,
                                                 fingerprint=fp).items()}
    val = None
    if cfg.val_pairs:
        val_labels = _labels(cfg.val_pairs, num_classes, cfg.seed + 1) if num_classes else None
        val = _pairs(cfg, teacher, diffusion, shape, val_labels, rank, world, device, held_out=True, fingerprint=fp)
    students = StudentSet({k: copy.deepcopy(teacher) for k in cfg.calls}).requires_grad_(True)
    del teacher
    run_cfg = _run_config(cfg, tcfg, tconfig, tpath, timesteps, predictions)
    loop = DistillLoop(cfg, students, diffusion, run_cfg, samplers, pairs, val, rank=rank, world=world, device=device,
                       distributed=distributed)
    r = loop.run()
    return DistillResult(cfg.out_dir, r.checkpoint or "", timesteps, loop.per_k, loop.val_log)


# ------------------------------------------------------------------------------ export
def export_students(checkpoints: Sequence[str], out: str, dtype: Optional[str] = None, use_ema: bool = True,
                    calls: Optional[Sequence[int]] = None) -> str:
    """One self-contained ``.safetensors`` student set (config in its metadata, and beside it as JSON) from the
    students of one or more distillation runs, e.g. runs over different K made in parallel.

    Args:
        checkpoints: distillation run directories or checkpoints; their teachers' model and diffusion must agree
            and no K may come twice.
        out: the file to write (``.safetensors``).
        dtype: "fp16" or "bf16" stores the weights in half precision (half the size; they are loaded into the
            fp32 model), None keeps fp32.
        use_ema: the EMA weights (default) or the raw ones.
        calls: keep only these K (default: every student of every checkpoint).
    """
    if not out.endswith(".safetensors"):
        raise ValueError(f"out must end with .safetensors, got {out!r}")
    casts = {None: None, "fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in casts:
        raise ValueError(f"dtype must be one of {list(casts)}, got {dtype!r}")
    if not checkpoints:
        raise ValueError("checkpoints must name at least one distillation run")
    state: Dict[str, torch.Tensor] = {}
    config: Optional[Dict[str, Any]] = None
    sources = []
    for path in checkpoints:
        ck = ckpt.load_checkpoint(path, load_state=False, load_model=not use_ema, load_ema=use_ema)
        if not is_distilled(ck.config):
            raise ValueError(f"checkpoints must be distillation runs (`fastddpm distill`), got {ck.path!r}")
        if config is None:
            config = json.loads(json.dumps(ck.config))
            for key in ("calls", "prediction", "loss"):
                config[DISTILL_CONFIG_KEY][key] = {}
        elif any(ck.config.get(k) != config.get(k) for k in ("model", "diffusion")):
            raise ValueError(f"checkpoints must share the teacher's model and diffusion; {ck.path!r} differs")
        keep = [k for k in distilled_calls(ck.config) if calls is None or k in calls]
        for k in keep:
            if str(k) in config[DISTILL_CONFIG_KEY]["calls"]:
                raise ValueError(f"checkpoints hold student K = {k} twice")
            config[DISTILL_CONFIG_KEY]["calls"][str(k)] = student_timesteps_of(ck.config, k)
            config[DISTILL_CONFIG_KEY]["prediction"][str(k)] = student_prediction_of(ck.config, k)
            src = ck.config[DISTILL_CONFIG_KEY]
            config[DISTILL_CONFIG_KEY]["loss"][str(k)] = (src.get("loss") or {}).get(
                str(k), loss_for((src.get("config") or {}).get("loss", "x0"), k))
        cast = casts[dtype]
        for name, v in ck.weights(use_ema).items():
            if int(name.split(".")[1]) in keep:  # students.<K>.<param>
                state[name] = v.to(cast) if cast is not None and v.is_floating_point() else v
        sources.append({"checkpoint": ck.path, "step": ck.step, "calls": keep,
                        "config": ck.config[DISTILL_CONFIG_KEY].get("config")})
    if config is None or not config[DISTILL_CONFIG_KEY]["calls"]:
        raise ValueError(f"calls {list(calls or [])} selects no student of {list(checkpoints)}")
    entry = config[DISTILL_CONFIG_KEY]
    entry["calls"] = dict(sorted(entry["calls"].items(), key=lambda kv: int(kv[0])))
    config[DISTILL_CONFIG_KEY]["exported_from"] = sources  # each run's settings (the students may differ in them)
    config[DISTILL_CONFIG_KEY].pop("config", None)
    config["weights"] = ("ema" if use_ema else "raw") + (f", stored in {dtype}" if casts[dtype] is not None else "")
    ckpt.check_state_dict(build.build_model(config), state, out)
    ckpt.save_weights_file(out, state, config)
    atomic_write_json(os.path.splitext(out)[0] + ".json", config)
    return out

"""``fastddpm train``: train a DDPM; the flags mirror :class:`fastddpm.train.TrainConfig` field for field.

    fastddpm train --dataset digits --base-channels 32 --channel-mults 1,2 --attention-resolutions 4 \\
        --steps 5000 --out-dir runs/digits
    torchrun --nproc_per_node 2 -m fastddpm train ...  # data-parallel training
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from typing import Any, Callable, Dict, List, Optional

from .._names import SAMPLER_NAMES
from ._common import CLIError

HELP = "train a DDPM (flags mirror fastddpm.train.TrainConfig)"

_TRAIN_HELP = {
    "dataset": '"digits" (built in), an image folder, an .npz file, a CIFAR-10 batches folder or MNIST IDX file/folder',
    "image_size": "resize (centre crop + antialiased resize) to this side; default: the dataset's",
    "random_flip": "random horizontal flips",
    "channels": "1 or 3 to convert every image; default: inferred",
    "class_cond": "class-conditional model on the dataset's labels",
    "p_uncond": "probability of the null label (classifier-free guidance)",
    "base_channels": "U-Net channels of the first level",
    "channel_mults": "comma-separated channel multipliers per level, e.g. 1,2,2,2",
    "num_res_blocks": "ResBlocks per level",
    "attention_resolutions": "comma-separated resolutions with self-attention, e.g. 16 (empty: none)",
    "dropout": "dropout in the ResBlocks",
    "num_heads": "attention heads",
    "head_channels": "channels per attention head (instead of --num-heads)",
    "time_embedding": "add (DDPM) or scale_shift (Improved DDPM)",
    "groups": "GroupNorm groups",
    "learn_sigma": "learn the variance (needs --variance learned_range)",
    "schedule": "linear or cosine",
    "num_timesteps": "diffusion steps T",
    "prediction": "eps, x0 or v",
    "variance": "fixed_small, fixed_large or learned_range",
    "loss": "simple, vlb or hybrid",
    "steps": "total training steps",
    "batch_size": "global batch size (divided among torchrun processes)",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "adam_beta1": "AdamW beta1",
    "adam_beta2": "AdamW beta2",
    "warmup_steps": "linear learning-rate warm-up steps",
    "grad_clip": "max gradient norm (0: off)",
    "ema_decay": "EMA decay (0: no EMA)",
    "ema_warmup": "EMA decay min(decay, (1+n)/(10+n)) early on",
    "amp": "auto (bf16 autocast on CUDA), bf16 or none",
    "compile": "torch.compile the model (default: on when CUDA is present)",
    "seed": "random seed",
    "device": "auto, cpu, cuda or cuda:N",
    "out_dir": "run directory: checkpoints/, log.jsonl, samples/",
    "save_every": "checkpoint every N steps (and at the end; 0: only at the end)",
    "keep": "keep the last K checkpoints (0: all)",
    "sample_every": "write an EMA sample grid every N steps (0: never)",
    "sample_num": "images per sample grid",
    "sample_sampler": "sampler for the grids: ddpm, ddim or dpm++",
    "sample_steps": "sampler steps for the grids",
    "log_every": "log.jsonl line / progress-bar update every N steps",
    "progress": "tqdm progress bar (rank 0)",
    "resume": "continue the run in --out-dir from its newest checkpoint (or from the given checkpoint) with its "
              "saved settings; flags given override them",
    "resume_fallback": "when the newest checkpoint does not load, resume from the newest older one that does",
    "max_nonfinite": "stop after this many non-finite losses in a row",
    "ddp_timeout": "seconds a torchrun process waits for a dead or stalled peer before the run stops",
}


_TRAIN_CHOICES = {
    "time_embedding": ("add", "scale_shift"),
    "schedule": ("linear", "cosine"),
    "prediction": ("eps", "x0", "v"),
    "variance": ("fixed_small", "fixed_large", "learned_range"),
    "loss": ("simple", "vlb", "hybrid"),
    "amp": ("auto", "bf16", "none"),
    "sample_sampler": SAMPLER_NAMES,
}
_METAVAR = {int: "N", float: "X", str: "TEXT"}


def _int_list(text: str) -> List[int]:
    text = text.strip()
    if not text:
        return []
    try:
        return [int(v) for v in text.replace(" ", "").strip("()[]").split(",") if v != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _optional(conv: Callable[[str], Any]) -> Callable[[str], Any]:
    def f(text: str) -> Any:
        return None if text.lower() in ("none", "null", "") else conv(text)

    f.__name__ = getattr(conv, "__name__", "value")
    return f


def configure(p: argparse.ArgumentParser) -> None:
    from ..train import TrainConfig

    p.add_argument("--config", metavar="JSON", help="read a TrainConfig from a JSON file (a run's config.json "
                   "'train' entry works); flags given on the command line override it")
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        default = getattr(defaults, f.name)
        help_ = _TRAIN_HELP.get(f.name, "")
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_ = f"{help_} (default: {shown})"
        kw: Dict[str, Any] = dict(default=argparse.SUPPRESS, dest=f.name, help=help_)
        args_ = typing.get_args(hint)
        if f.name == "resume":
            p.add_argument(flag, nargs="?", const=True, metavar="CHECKPOINT", **kw)
        elif hint is bool or (set(args_) == {bool, type(None)}):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(hint) is tuple:
            p.add_argument(flag, type=_int_list, metavar="N,N,...", **kw)
        elif f.name in _TRAIN_CHOICES:
            p.add_argument(flag, choices=_TRAIN_CHOICES[f.name], **kw)
        elif hint in (int, float, str):
            p.add_argument(flag, type=hint, metavar=_METAVAR.get(hint, "VALUE"), **kw)
        elif set(args_) == {int, type(None)}:
            p.add_argument(flag, type=_optional(int), metavar="N|none", **kw)
        else:  # pragma: no cover - a new field type needs a branch here
            raise TypeError(f"no command-line type for TrainConfig.{f.name}: {hint}")


def _resumed_config(explicit: Dict[str, Any]) -> Optional[Any]:
    """With --resume and a checkpoint to resume: the saved run's config, overridden by the flags given
    (`explicit`); train() prints what it resumes and every changed setting. None: a fresh run."""
    from ..train import TrainConfig, resume_config, saved_run_config

    out_dir = explicit.get("out_dir", TrainConfig.out_dir)
    found = saved_run_config(explicit.get("resume", False), out_dir)
    if found is None:
        return None
    saved, path = found
    if "out_dir" not in explicit:  # --resume CHECKPOINT alone continues that checkpoint's run directory
        from ..train import _run_dir_of

        saved = dict(saved, out_dir=_run_dir_of(path) or saved.get("out_dir", out_dir))
    return resume_config(saved, explicit)[0]


def run(args: argparse.Namespace) -> int:
    from ..train import TrainConfig, train

    values: Dict[str, Any] = {}
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as fh:
                loaded = json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            raise CLIError(f"{args.config}: cannot read the config ({e})") from e
        if isinstance(loaded, dict) and "train" in loaded and isinstance(loaded["train"], dict):
            loaded = loaded["train"]  # a run's config.json
        if not isinstance(loaded, dict):
            raise CLIError(f"{args.config}: expected a JSON object")
        values.update(loaded)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    cfg = _resumed_config(values)
    if cfg is None:
        cfg = TrainConfig.from_dict(values)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {result.step} steps ({result.skipped} skipped); checkpoint: {result.checkpoint}")
    return 0

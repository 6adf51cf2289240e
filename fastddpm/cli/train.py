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
import sys
import typing
from typing import Any, Callable, Dict, List, Optional

from .._names import SAMPLER_NAMES
from ._common import CLIError, add_threads_option, apply_threads

HELP = ("train a DDPM (flags mirror fastddpm.train.TrainConfig; model and optimisation defaults follow the "
        "dataset's image size, see fastddpm.train.dataset_defaults)")

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
    "sample_sampler": "sampler for the grids: " + ", ".join(SAMPLER_NAMES),
    "sample_steps": "sampler steps for the grids",
    "log_every": "log.jsonl line / progress-bar update every N steps",
    "progress": "tqdm progress bar (rank 0)",
    "resume": "continue the run in --out-dir from its newest checkpoint (or from the given checkpoint) with its "
              "saved settings; flags given override them",
    "resume_fallback": "when the newest checkpoint does not load, resume from the newest older one that does",
    "overwrite": "replace the run --out-dir holds (its config.json, log.jsonl, checkpoints/ and samples/ are "
                 "removed first); without it a new run refuses a directory that holds one",
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
    from ..run_dir import show_value
    from ..train import DDPM_CIFAR10_RECIPE, DIGITS_RECIPE, TrainConfig

    p.add_argument("--config", metavar="JSON", help="read a TrainConfig from a JSON file (a run's config.json "
                   "'train' entry works); flags given on the command line override it")
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        default = getattr(defaults, f.name)
        help_ = _TRAIN_HELP.get(f.name, "")
        if f.name in DIGITS_RECIPE or f.name in DDPM_CIFAR10_RECIPE:  # follows the dataset's image size
            help_ = (f"{help_} (default by image size: {show_value(DIGITS_RECIPE.get(f.name, default))} up to 16 px "
                     f"as the bundled digits model, {show_value(DDPM_CIFAR10_RECIPE.get(f.name, default))} at 32 px as "
                     "DDPM CIFAR-10)")
        elif "default" not in help_:  # a help that already says its default is not followed by a second one
            help_ = f"{help_} (default: {show_value(default)})"
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
    add_threads_option(p)


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a JSON `value` fits the TrainConfig type `hint` (bool is not an int; an int is a float)."""
    if hint is Any:
        return True
    args_ = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union:
        return any(_type_ok(value, a) for a in args_)
    if typing.get_origin(hint) is tuple:
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args_[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def check_config_types(values: Dict[str, Any], where: str) -> None:
    """CLIError naming `where` and the entry when a value of a JSON TrainConfig has the wrong type
    (``"num_res_blocks": [1]``, ``"random_flip": "yes"``); unknown entries are left to TrainConfig."""
    from ..train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for name, value in values.items():
        hint = hints.get(name)
        if hint is not None and not _type_ok(value, hint):
            raise CLIError(f"{where}: {name} must be {_describe_type(hint)}, got {json.dumps(value)[:80]}")


def check_values(values: Dict[str, Any]) -> None:
    """CLIError naming the flag for the values the later steps would misreport: an empty --channel-mults
    (the image-size arithmetic would complain instead), an empty --out-dir, a --seed beyond 2**63."""
    if "channel_mults" in values and not values["channel_mults"]:
        raise CLIError("--channel-mults must be a non-empty list of positive ints (one per level), e.g. 1,2,2,2")
    if "out_dir" in values and isinstance(values["out_dir"], str) and not values["out_dir"].strip():
        raise CLIError("--out-dir must be a folder path, got an empty string")
    seed = values.get("seed")
    if isinstance(seed, int) and not 0 <= seed < 2**63:
        raise CLIError(f"--seed must be an int in [0, 2**63), got {seed}")


def _describe_type(hint: Any) -> str:
    """`hint` in words: "an int", "a list of ints", "an int or null", ..."""
    words = {bool: "true or false", int: "an int", float: "a number", str: "a string", type(None): "null"}
    if typing.get_origin(hint) is tuple:
        return "a list of ints"
    if typing.get_origin(hint) is typing.Union:
        return " or ".join(_describe_type(a) for a in typing.get_args(hint))
    return words.get(hint, str(hint))


def _num_params(cfg: Any) -> int:
    """The U-Net's parameter count for `cfg` (built on the meta device: no memory, no time), without its
    few attention parameters, which need the image size: enough to choose the thread count."""
    import torch

    from ..train import model_config
    from ..unet import UNet

    mc = model_config(cfg, 2 ** (len(cfg.channel_mults) - 1), 1, None)
    mc["attention_resolutions"] = []
    with torch.device("meta"):
        return sum(p.numel() for p in UNet(**mc).parameters())


def fresh_config(explicit: Dict[str, Any]) -> Any:
    """TrainConfig defaults <- :func:`fastddpm.train.dataset_defaults` for the dataset's image shape <-
    `explicit` (the flags given and --config's values); prints the configuration (rank 0)."""
    from ..train import TrainConfig, dataset_defaults, dataset_shape

    spec = explicit.get("dataset", TrainConfig.dataset)
    channels, size = dataset_shape(spec, explicit.get("image_size"), explicit.get("channels"))
    chosen = dataset_defaults(spec, channels, size)
    cfg = TrainConfig.from_dict({**chosen, **explicit})
    if int(os.environ.get("RANK", "0")) == 0:
        print(describe_config(cfg, f"{spec} ({channels}x{size}x{size})", chosen, explicit), flush=True)
    return cfg


_SHOWN = ("base_channels", "channel_mults", "num_res_blocks", "attention_resolutions", "groups", "dropout",
          "time_embedding", "learn_sigma", "schedule", "num_timesteps", "prediction", "variance", "loss",
          "steps", "batch_size", "lr", "warmup_steps", "ema_decay", "out_dir")


def describe_config(cfg: Any, data: str, chosen: Dict[str, Any], explicit: Dict[str, Any]) -> str:
    """The lines ``fastddpm train`` prints: the model / diffusion / optimisation settings as flags,
    each marked with where it came from (your flag, the dataset's defaults, TrainConfig's default)."""
    from ..run_dir import show_value

    parts = []
    for name in _SHOWN:
        mark = "" if name in explicit else ("*" if name in chosen else "")
        parts.append(f"--{name.replace('_', '-')} {show_value(getattr(cfg, name))}{mark}")
    lines, line = [], "  "
    for p in parts:
        if len(line) + len(p) > 100:
            lines.append(line.rstrip())
            line = "  "
        line += p + "  "
    lines.append(line.rstrip())
    return (f"training on {data} with (* = the dataset's default, see fastddpm.train.dataset_defaults; "
            "flags override):\n" + "\n".join(lines))


def _resumed_config(explicit: Dict[str, Any]) -> Optional[Any]:
    """With --resume and a checkpoint to resume: the saved run's config, overridden by the flags given
    (`explicit`); train() prints what it resumes and every changed setting. None: a fresh run."""
    from ..run_dir import saved_run_config
    from ..train import TrainConfig, resume_config

    out_dir = explicit.get("out_dir", TrainConfig.out_dir)
    found = saved_run_config(explicit.get("resume", False), out_dir)
    if found is None:
        if explicit.get("resume") is True:
            return _resume_without_checkpoint(explicit, out_dir)
        return None
    saved, path = found
    if "out_dir" not in explicit:  # --resume CHECKPOINT alone continues that checkpoint's run directory
        from ..run_dir import run_dir_of

        saved = dict(saved, out_dir=run_dir_of(path) or saved.get("out_dir", out_dir))
    return resume_config(saved, explicit)[0]


def _resume_without_checkpoint(explicit: Dict[str, Any], out_dir: str) -> Optional[Any]:
    """--resume on a run directory without a checkpoint (a run that died before its first): its
    config.json's settings, overridden by the flags given; a directory holding a log but no config.json
    is refused (its settings are lost: starting afresh would train something else under its name);
    an empty or new directory is a fresh run (None)."""
    from ..jsonio import load_file
    from ..train import resume_config

    cfg_path = os.path.join(out_dir, "config.json")
    log_path = os.path.join(out_dir, "log.jsonl")
    if os.path.lexists(cfg_path):
        try:
            loaded = load_file(cfg_path)
        except ValueError as e:
            raise CLIError(f"--resume: {e}; the run's settings cannot be read") from None
        from ..run_dir import refuse_distilled

        try:
            refuse_distilled(loaded, os.path.abspath(out_dir))
        except ValueError as e:
            raise CLIError(str(e)) from None
        saved = loaded.get("train") if isinstance(loaded, dict) else None
        if not isinstance(saved, dict):
            raise CLIError(f"--resume: {cfg_path} holds no 'train' settings; the run's settings are unknown: pass "
                           "them as flags without --resume (and --overwrite), or choose another --out-dir")
        check_config_types(saved, f"--resume: {cfg_path}")
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"fastddpm train: no checkpoint in {os.path.abspath(out_dir)}: starting from step 0 with the "
                  f"settings of {os.path.abspath(cfg_path)}", file=sys.stderr)
        return resume_config(dict(saved, out_dir=out_dir), explicit)[0]
    if os.path.lexists(log_path) and os.path.getsize(log_path) > 0:
        raise CLIError(f"--resume: {os.path.abspath(out_dir)} holds no checkpoint and no config.json, only a log: "
                       "the run's settings are lost. Pass them as flags without --resume (add --overwrite to "
                       "replace the log), or choose another --out-dir")
    return None


def run(args: argparse.Namespace) -> int:
    from ..train import TrainConfig, train

    values: Dict[str, Any] = {}
    if args.config:
        from ..jsonio import load_file

        try:
            loaded = load_file(args.config)
        except ValueError as e:
            raise CLIError(f"--config {e}") from None
        if isinstance(loaded, dict) and "train" in loaded and isinstance(loaded["train"], dict):
            loaded = loaded["train"]  # a run's config.json
        if not isinstance(loaded, dict):
            raise CLIError(f"{args.config}: expected a JSON object")
        check_config_types(loaded, f"--config {args.config}")
        values.update(loaded)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    check_values(values)
    cfg = _resumed_config(values)
    if cfg is None:
        cfg = fresh_config(values)
    apply_threads(getattr(args, "threads", None), _num_params(cfg), "cuda" if cfg.device.startswith("cuda") else "cpu")
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {result.step} steps ({result.skipped} skipped); checkpoint: {result.checkpoint}")
    return 0

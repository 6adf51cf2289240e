"""The ``fastddpm`` command line (also ``python -m fastddpm``).

    fastddpm sample                                    # 64 digits from the bundled model -> samples.png
    fastddpm sample --sampler ddim --steps 50 --num 1000 --batch-size 250 --npz digits.npz
    fastddpm train --dataset digits --base-channels 32 --channel-mults 1,2 --attention-resolutions 4 \\
        --steps 5000 --out-dir runs/digits
    torchrun --nproc_per_node 2 -m fastddpm train ...  # data-parallel training
    torchrun --nproc_per_node 2 -m fastddpm sample ... # each rank samples its share; rank 0 writes

Sub-commands live in the ``COMMANDS`` table: a name maps to a :class:`Command` (help line, a function
adding the arguments to its sub-parser, a function running it and returning the exit status). Adding
one is one entry; heavy imports stay inside ``run``. Commands in their own modules (``eval``, ``nll``
in fastddpm/cli_eval.py; ``bench`` in fastddpm/bench.py; ``convert``) are listed in ``EXTENSIONS`` and registered when
their module is installed.

Errors the user can fix (missing / truncated / mismatched checkpoints, bad data, bad flags) print one
``fastddpm <command>: error: ...`` line and exit with status 2 (usage) or 1 (everything else).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from ._names import SAMPLER_NAMES

__all__ = ["main", "COMMANDS", "Command", "build_parser"]


@dataclass
class Command:
    """One sub-command: ``configure(parser)`` adds its arguments, ``run(args) -> exit status``."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class CLIError(Exception):
    """An error to report as one line (exit status 1)."""


# ====================================================================================== train
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
    "resume": "continue from the newest checkpoint in --out-dir (or from the given checkpoint)",
    "max_nonfinite": "stop after this many non-finite losses in a row",
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


def _configure_train(p: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

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


def _run_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

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
    cfg = TrainConfig.from_dict(values)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {result.step} steps ({result.skipped} skipped); checkpoint: {result.checkpoint}")
    return 0


# ====================================================================================== sample
def _configure_sample(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="a checkpoint directory, a run directory (its newest checkpoint) or a .safetensors "
                        "file; default: the bundled digits model")
    p.add_argument("--sampler", default="dpm++", choices=SAMPLER_NAMES, help="default: dpm++")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: 20 for dpm++, 50 for ddim, all T for ddpm)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity in [0, 1] (default: 0)")
    p.add_argument("--num", type=int, default=64, help="number of images (default: 64)")
    p.add_argument("--batch-size", type=int, default=64, help="images per model call (default: 64)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed; image i of a seed is the same whatever the batch size or process count (default: 0)")
    p.add_argument("--out", default=None, metavar="PNG",
                   help="write a PNG grid (default: samples.png when --npz is not given)")
    p.add_argument("--npz", default=None, metavar="NPZ", help="write the images as uint8 NHWC array 'images'")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: ceil(sqrt(num)))")
    p.add_argument("--scale", type=int, default=None,
                   help="enlarge the grid by this integer factor (default: up to 32-pixel tiles)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--class-label", type=int, default=None,
                   help="class-conditional models: draw this class (default: cycle through the classes)")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="classifier-free guidance scale w for class-conditional models (1: plain conditional)")
    p.add_argument("--no-clip", action="store_true", help="do not clip x0-hat to [-1, 1] at each step")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar (rank 0)")


def _positive(name: str, v: Optional[int]) -> None:
    if v is not None and v < 1:
        raise CLIError(f"--{name} must be a positive int, got {v}")


def _run_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    import torch.distributed as dist

    from . import checkpoint as ckpt
    from .data import save_grid, to_uint8
    from .train import _dist_info, _join_process_group, _make_sampler, _resolve_device

    _positive("num", args.num)
    _positive("batch-size", args.batch_size)
    _positive("steps", args.steps)
    _positive("scale", args.scale)
    _positive("nrow", args.nrow)
    if not 0.0 <= args.eta <= 1.0:
        raise CLIError(f"--eta must be in [0, 1], got {args.eta}")
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    out_png = args.out if (args.out or args.npz) else "samples.png"

    rank, world, local_rank = _dist_info()
    try:
        device = _resolve_device(args.device, local_rank)
    except ValueError:
        raise CLIError(f"--device {args.device}: CUDA is not available") from None
    own_group = _join_process_group(world, device)
    distributed = world > 1 and dist.is_initialized()
    if not distributed:
        world, rank = 1, 0
    try:
        model, diffusion, config = ckpt.load_model(args.checkpoint, use_ema=not args.no_ema, device=device)
        mc = config["model"]
        size, channels, num_classes = int(mc["image_size"]), int(mc["in_channels"]), mc.get("num_classes")
        sampler = _make_sampler(args.sampler, diffusion, args.steps, eta=args.eta)
        if args.class_label is not None:
            if not num_classes:
                raise CLIError("--class-label needs a class-conditional model; this one has no classes")
            if not 0 <= args.class_label < num_classes:
                raise CLIError(f"--class-label must be in [0, {num_classes}), got {args.class_label}")

        # this rank's contiguous share of the global image indices
        per = -(-args.num // world)
        start, stop = min(rank * per, args.num), min((rank + 1) * per, args.num)
        labels_all = None
        if num_classes:
            labels_all = (torch.full((args.num,), args.class_label, dtype=torch.int64) if args.class_label is not None
                          else torch.arange(args.num, dtype=torch.int64) % num_classes)
        show = args.progress and rank == 0
        nbatches = -(-(stop - start) // args.batch_size) if stop > start else 0
        outer = None
        if show and nbatches > 1:
            from tqdm.auto import tqdm

            outer = tqdm(total=stop - start, desc=f"sampling ({args.sampler}, {sampler.num_steps} steps)",
                         unit="img", file=sys.stderr)
        chunks, label_chunks = [], []
        t0 = time.perf_counter()
        with torch.no_grad():
            for b0 in range(start, stop, args.batch_size):
                b1 = min(b0 + args.batch_size, stop)
                net: Any = model
                if num_classes:
                    y = labels_all[b0:b1].to(device)
                    label_chunks.append(labels_all[b0:b1].numpy())
                    if args.guidance_scale == 1.0:
                        net = _WithLabels(model, y)
                    else:
                        from .guidance import GuidedModel

                        net = GuidedModel(model, y, args.guidance_scale, null_label=num_classes, channels=channels)
                x = sampler.sample(net, (b1 - b0, channels, size, size), seed=args.seed, image_offset=b0,
                                   clip_denoised=not args.no_clip, progress=show and nbatches == 1, device=device)
                chunks.append(to_uint8(x))
                if outer is not None:
                    outer.update(b1 - b0)
        if outer is not None:
            outer.close()
        elapsed = time.perf_counter() - t0
        local = np.concatenate(chunks) if chunks else np.zeros((0, size, size, channels), np.uint8)
        local_labels = np.concatenate(label_chunks) if label_chunks else None
        if distributed:
            gathered: List[Any] = [None] * world if rank == 0 else None
            dist.gather_object((local, local_labels), gathered, dst=0)
            if rank == 0:
                local = np.concatenate([g[0] for g in gathered])
                if num_classes:
                    local_labels = np.concatenate([g[1] for g in gathered if g[1] is not None])
        if rank == 0:
            images = local
            assert images.shape[0] == args.num
            written = []
            if args.npz:
                import io

                buf = io.BytesIO()
                arrays = {"images": images}
                if local_labels is not None:
                    arrays["labels"] = local_labels
                np.savez(buf, **arrays)
                ckpt.atomic_write_bytes(args.npz, buf.getvalue())
                written.append(args.npz)
            if out_png:
                scale = args.scale if args.scale is not None else max(1, 32 // size)
                x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
                save_grid(x, out_png, nrow=args.nrow, scale=scale)
                written.append(out_png)
            print(f"{args.num} images ({args.sampler}, {sampler.num_steps} steps, {elapsed:.1f} s"
                  f"{f' on rank 0 of {world}' if world > 1 else ''}) -> {', '.join(written)}")
        if distributed:
            dist.barrier()
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()
    return 0


class _WithLabels:
    """model(x, t) -> model(x, t, y=labels) (plain class-conditional sampling)."""

    def __init__(self, model: Any, y: Any):
        self.model, self.y = model, y

    def parameters(self):
        return self.model.parameters()

    def __call__(self, x: Any, t: Any) -> Any:
        return self.model(x, t, y=self.y)


# ====================================================================================== table
COMMANDS: Dict[str, Command] = {
    "train": Command("train a DDPM (flags mirror fastddpm.train.TrainConfig)", _configure_train, _run_train),
    "sample": Command("draw samples from a checkpoint (default: the bundled digits model)", _configure_sample,
                      _run_sample),
}


# Sub-commands that live in their own modules, registered when the module is there. A module named
# here provides, for each of its commands NAME: ``configure_NAME(parser)``, ``run_NAME(args) -> int``
# and ``NAME_HELP`` (upper case), e.g. fastddpm/cli_eval.py: configure_eval, run_eval, EVAL_HELP.
EXTENSIONS: Dict[str, str] = {
    "eval": "fastddpm.cli_eval",
    "nll": "fastddpm.cli_eval",
    "convert": "fastddpm.cli_convert",
    "bench": "fastddpm.bench",
}


def _load_extensions() -> None:
    import importlib

    for name, module in EXTENSIONS.items():
        if name in COMMANDS:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue  # not shipped (yet)
            raise
        configure, run = getattr(mod, f"configure_{name}", None), getattr(mod, f"run_{name}", None)
        if configure is not None and run is not None:
            COMMANDS[name] = Command(getattr(mod, f"{name.upper()}_HELP", ""), configure, run)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="fastddpm", description="Fast denoising diffusion probabilistic models.")
    parser.add_argument("--version", action="version", version=f"fastddpm {__version__}")
    _load_extensions()
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, cmd in COMMANDS.items():
        sp = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.configure(sp)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fastddpm`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    cmd = COMMANDS[args.command]
    try:
        return int(cmd.run(args) or 0)
    except KeyboardInterrupt:
        print(f"fastddpm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # CheckpointError and the data loaders' errors are ValueErrors naming the file; a training run
        # stopped by non-finite losses raises NonFiniteLossError. Anything else is a bug: traceback.
        if isinstance(e, (CLIError, ValueError, OSError)) or type(e).__name__ == "NonFiniteLossError":
            print(f"fastddpm {args.command}: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

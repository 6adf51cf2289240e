"""What every ``fastddpm`` sub-command shares: the command record, the one-line error, flag checks."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

__all__ = ["Command", "CLIError", "check_positive", "resolve_device", "write_json", "add_threads_option",
           "auto_threads", "apply_threads", "count_parameters", "steps_help", "sampler_steps", "diffusers_folder",
           "load_model", "flag_names", "SMALL_MODEL_PARAMS"]


@dataclass
class Command:
    """One sub-command: ``configure(parser)`` adds its arguments, ``run(args) -> exit status``."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class CLIError(Exception):
    """An error to report as one ``fastddpm <command>: error: ...`` line (exit status 1)."""


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Raise CLIError naming the flag when one of the int options `names` (dest names) is < 1."""
    for n in names:
        v = getattr(args, n, None)
        if v is not None and v < 1:
            raise CLIError(f"--{n.replace('_', '-')} must be a positive int, got {v}")


def resolve_device(name: str, local_rank: int = 0) -> Any:
    """``--device`` (auto, cpu, cuda or cuda:N) as a torch.device; CLIError when it cannot be used."""
    from ..dist_util import resolve_device as _resolve  # the one resolver (train() takes the same spec)

    try:
        return _resolve(name, local_rank)
    except ValueError as e:
        raise CLIError(f"--device: {e}") from None


def write_json(result: Dict[str, Any], path: Optional[str]) -> None:
    """Write `result` as JSON to `path` atomically (nothing when `path` is None)."""
    if path:
        from ..fileio import atomic_write_json

        atomic_write_json(path, result)


# Below this many parameters a model runs fastest on one CPU thread: the work per op is too small to
# pay for waking and joining a second thread (benchmarks/bench_threads.py; results/threads_cpu.json:
# the bundled 0.7M-parameter model samples 3.3x slower on 2 threads than on one on a quiet 2-core
# machine, the 35.7M-parameter CIFAR-10 U-Net forward takes 0.70x (batch 2) / 0.56x (batch 8) of its
# one-thread time). The threshold sits between the two measured models.
SMALL_MODEL_PARAMS = 5_000_000


def add_threads_option(p: argparse.ArgumentParser) -> None:
    """Add ``--threads N`` (CPU threads for torch; default: chosen from the model's size)."""
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: 1 for models under "
                        f"{SMALL_MODEL_PARAMS / 1e6:g}M parameters, such as the bundled one, else torch's "
                        "default of one per core; OMP_NUM_THREADS, when set, is used instead)")


def auto_threads(num_params: int, default: Optional[int] = None) -> int:
    """The thread count the CLI uses for a model of `num_params` parameters on the CPU: 1 for a small
    model (under :data:`SMALL_MODEL_PARAMS`), else `default` (torch's current thread count)."""
    import torch

    if num_params < SMALL_MODEL_PARAMS:
        return 1
    return int(default if default is not None else torch.get_num_threads())


def apply_threads(requested: Optional[int], num_params: int, device: Any = "cpu") -> int:
    """Set torch's intra-op thread count: `requested` (``--threads``) when given, else the
    OMP_NUM_THREADS the user set, else :func:`auto_threads` on a CPU device. Returns the count in use."""
    import os

    import torch

    if requested is not None:
        if requested < 1:
            raise CLIError(f"--threads must be a positive int, got {requested}")
        torch.set_num_threads(requested)
    elif not os.environ.get("OMP_NUM_THREADS") and str(getattr(device, "type", device)) == "cpu":
        torch.set_num_threads(auto_threads(num_params))
    return torch.get_num_threads()


def count_parameters(model: Any) -> int:
    """Number of parameters of a torch module."""
    return sum(p.numel() for p in model.parameters())


def steps_help() -> str:
    """The ``--steps`` help of the sampling commands, from :data:`fastddpm._names.CLI_DEFAULT_STEPS`."""
    from .._names import CLI_DEFAULT_STEPS

    return ("sampling steps; default: " + ", ".join(f"{v} for {k}" for k, v in CLI_DEFAULT_STEPS.items())
            + " (ddpm is respaced: --steps 1000 runs every step of a 1000-step schedule, 10x the time of 100;"
            " each step is one model call per batch)")


def sampler_steps(name: str, steps: Optional[int], diffusion: Any) -> Optional[int]:
    """``--steps``, else the command line's default for sampler `name` (:data:`CLI_DEFAULT_STEPS`),
    capped at the schedule's T (a model trained with fewer timesteps uses all of them)."""
    from .._names import CLI_DEFAULT_STEPS

    if steps is not None:
        return steps
    default = CLI_DEFAULT_STEPS.get(name)
    return None if default is None else min(default, int(diffusion.num_timesteps))


def diffusers_folder(path: Optional[str]) -> bool:
    """True when `path` is a saved diffusers pipeline or model folder (model_index.json, or a
    config.json with diffusers' ``_class_name``, or diffusion_pytorch_model weights)."""
    import os

    if not path or not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return True
    if any(os.path.isfile(os.path.join(path, f"diffusion_pytorch_model.{e}")) for e in ("safetensors", "bin")):
        return True
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            return "_class_name" in json.load(fh)
    except (OSError, ValueError):
        return False


def load_model(args: argparse.Namespace, device: Any) -> Any:
    """(model, diffusion, config) of ``--checkpoint`` (EMA weights unless ``--no-ema``), with torch's
    thread count set for it (``--threads``, else :func:`apply_threads`' choice). A diffusers folder
    is refused with the ``fastddpm convert`` command that makes it loadable."""
    from .. import build

    path = getattr(args, "checkpoint", None)
    if diffusers_folder(path):
        raise CLIError(f"--checkpoint {path} is a diffusers folder, not a fastddpm checkpoint: convert it first "
                       f"with `fastddpm convert {path} model.safetensors`, then pass --checkpoint model.safetensors")
    model, diffusion, config = build.load_model(path, use_ema=not getattr(args, "no_ema", False), device=device)
    apply_threads(getattr(args, "threads", None), count_parameters(model), device)
    return model, diffusion, config


def flag_names(message: str, flags: Dict[str, str]) -> str:
    """`message` with every library name of an option (``image_size``) replaced by its command-line
    flag (``--image-size``); `flags` maps dest names to flags. Words inside paths are left alone."""
    import re

    for dest in sorted(flags, key=len, reverse=True):
        message = re.sub(rf"(?<![\w./-]){re.escape(dest)}(?![\w/])", flags[dest], message)
    return message

"""What every ``fastddpm`` sub-command shares: the command record, the one-line error, flag checks."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

__all__ = ["Command", "CLIError", "check_positive", "resolve_device", "write_json", "add_threads_option",
           "auto_threads", "apply_threads", "count_parameters", "steps_help", "sampler_steps", "diffusers_folder",
           "load_model", "flag_names", "SMALL_MODEL_PARAMS", "check_weights", "check_seed", "check_output",
           "write_output", "diffusers_pipeline", "MAX_WEIGHT"]


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


from .._names import SMALL_MODEL_PARAMS  # noqa: E402  (one threshold for the CLI and the Python API)


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
    from ..jsonio import load_file

    try:
        cfg = load_file(os.path.join(path, "config.json"))
    except ValueError:
        return False
    return isinstance(cfg, dict) and "_class_name" in cfg


def diffusers_pipeline(path: Optional[str]) -> bool:
    """True when `path` is a saved diffusers pipeline folder (model_index.json): ``fd.load`` reads it."""
    import os

    return bool(path) and os.path.isfile(os.path.join(path, "model_index.json"))


def load_model(args: argparse.Namespace, device: Any) -> Any:
    """(model, diffusion, config) of ``--checkpoint`` (EMA weights unless ``--no-ema``), with torch's
    thread count set for it (``--threads``, else :func:`apply_threads`' choice). A diffusers pipeline
    folder is read as ``fd.load`` reads it; a bare diffusers UNet2DModel folder (no scheduler) is refused
    with the ``fastddpm convert`` command that makes it loadable. Weights holding NaN/inf or magnitudes
    no trained model has are refused naming the tensor (they would give NaN or flat images)."""
    from .. import build

    path = getattr(args, "checkpoint", None)
    if diffusers_pipeline(path):
        from ..pretrained import load

        try:
            pipe = load(path, device=device)
        except Exception as e:  # diffusers' own errors (missing components, bad configs) or no diffusers
            raise CLIError(f"--checkpoint {path}: cannot load the diffusers pipeline: {type(e).__name__}: "
                           f"{' '.join(str(e).split())}") from None
        model, diffusion, config = pipe.unet, pipe.diffusion, pipe.config
    elif diffusers_folder(path):
        raise CLIError(f"--checkpoint {path} is a diffusers UNet2DModel folder without a scheduler: convert it "
                       f"first with `fastddpm convert {path} model.safetensors --beta-schedule linear` (the "
                       "schedule it was trained with), then pass --checkpoint model.safetensors")
    else:
        model, diffusion, config = build.load_model(path, use_ema=not getattr(args, "no_ema", False), device=device)
    check_weights(model, path or "the bundled model")
    apply_threads(getattr(args, "threads", None), count_parameters(model), device)
    return model, diffusion, config


# No trained diffusion model has a weight this large (the bundled one's largest is about 3): beyond it a
# forward pass overflows to inf somewhere and the samplers' clipping turns the result into a flat image.
MAX_WEIGHT = 1e6


def model_and_sampler(args: argparse.Namespace, model: Any, diffusion: Any, config: Dict[str, Any],
                      make_sampler: Callable[[], Any]) -> Any:
    """(model, sampler) for sampling a checkpoint: for a `fastddpm distill` student set, --steps picks the student
    (K model calls; args.sampler becomes "distilled"), otherwise `make_sampler()` builds the sampler --sampler
    names."""
    from ..student import is_distilled, student_for

    if not is_distilled(config):
        return model, make_sampler()
    try:
        model, sampler = student_for(model, diffusion, config, args.steps)
    except ValueError as e:  # "steps must be one of the model-call counts ..."
        raise CLIError(f"--{e}") from None
    args.sampler = "distilled"
    return model, sampler


def check_weights(model: Any, where: str) -> None:
    """CLIError naming `where` and the tensor when a weight of `model` is NaN/inf or above :data:`MAX_WEIGHT`."""
    import torch

    for name, t in model.state_dict().items():
        if not torch.is_tensor(t) or not t.is_floating_point() or t.numel() == 0:
            continue
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            raise CLIError(f"--checkpoint {where}: the weights {name} hold {int((~finite).sum())} NaN/inf values "
                           "(a diverged or damaged checkpoint; sample an earlier one)")
        peak = float(t.abs().max())
        if peak > MAX_WEIGHT:
            raise CLIError(f"--checkpoint {where}: the weights {name} reach {peak:.3g}, beyond any trained model "
                           f"(bound {MAX_WEIGHT:g}); a diverged or damaged checkpoint would give flat images")


MAX_SEED = 2**63


def check_seed(args: argparse.Namespace) -> None:
    """CLIError unless ``--seed`` is in [0, 2**63)."""
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < MAX_SEED:
        raise CLIError(f"--seed must be an int in [0, 2**63), got {seed}")


def check_output(flag: str, path: Optional[str]) -> None:
    """CLIError naming `flag` when `path` cannot be an output file: empty, a folder, or under a file."""
    import os

    if path is None:
        return
    if not path.strip():
        raise CLIError(f"{flag} must be a file path, got an empty string")
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path}: is a folder; give a file path")
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent) if os.path.dirname(parent) != parent else ""
    if parent and not os.path.isdir(parent):
        raise CLIError(f"{flag} {path}: {parent} is a file, not a folder")


def write_output(flag: str, path: str, write: Callable[[], Any]) -> Any:
    """``write()``, with an OSError (a full disk, no permission) reported as one line naming `flag` and `path`."""
    try:
        return write()
    except OSError as e:
        raise CLIError(f"{flag} {path}: cannot write: {e.strerror or e}") from None


def flag_names(message: str, flags: Dict[str, str]) -> str:
    """`message` with every library name of an option (``image_size``) replaced by its command-line
    flag (``--image-size``); `flags` maps dest names to flags. Words inside paths are left alone."""
    import re

    for dest in sorted(flags, key=len, reverse=True):
        message = re.sub(rf"(?<![\w./-]){re.escape(dest)}(?![\w/])", flags[dest], message)
    return message

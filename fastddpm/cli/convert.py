"""`fastddpm convert DIFFUSERS_DIR OUT.safetensors`: a diffusers DDPM into a fastddpm checkpoint file.

DIFFUSERS_DIR is a saved pipeline (with unet/ and scheduler/ sub-folders, e.g. a local copy of
google/ddpm-cifar10-32), a UNet2DModel folder with a scheduler_config.json beside it, or a bare
UNet2DModel folder (config.json + weights) together with the noise schedule as flags
(``--beta-schedule linear`` and, where they differ from DDPM's, ``--num-train-timesteps``,
``--beta-start``, ``--beta-end``, ``--prediction-type``, ``--variance-type``; named as in diffusers'
DDPMScheduler; given with a scheduler config they override its entries). The U-Net is mapped weight
for weight into fastddpm.UNet (fastddpm.interop.diffusers); the betas, prediction and variance types
come from the scheduler config (fastddpm.interop.schedulers). The result samples with
`fastddpm sample --checkpoint OUT.safetensors`. Options with no fastddpm equivalent are refused with an
error naming the option. Needs diffusers: ``pip install "fastddpm[diffusers]"``.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, Optional

from ._common import CLIError, add_threads_option, apply_threads

HELP = "convert a diffusers DDPM (UNet2DModel + scheduler) into a fastddpm checkpoint file"
INSTALL_HINT = 'fastddpm convert needs diffusers: pip install "fastddpm[diffusers]"'
# DDPMScheduler's config keys that the schedule flags set (flag dest == key)
_SCHEDULE_KEYS = ("beta_schedule", "num_train_timesteps", "beta_start", "beta_end", "prediction_type",
                  "variance_type", "clip_sample")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="DIFFUSERS_DIR",
                   help="a saved diffusers pipeline (model_index.json, unet/, scheduler/), a UNet2DModel folder "
                        "with scheduler_config.json beside it, or a bare UNet2DModel folder with --beta-schedule")
    p.add_argument("out", metavar="OUT.safetensors", help="the fastddpm checkpoint file to write")
    add_threads_option(p)
    g = p.add_argument_group("noise schedule", "needed for a bare UNet2DModel folder (no scheduler config); "
                             "with one, each flag given overrides its entry")
    g.add_argument("--beta-schedule", default=None, choices=("linear", "scaled_linear", "squaredcos_cap_v2"),
                   help="diffusers' beta_schedule (DDPM: linear)")
    g.add_argument("--num-train-timesteps", type=int, default=None, metavar="T", help="diffusion steps T (default: 1000)")
    g.add_argument("--beta-start", type=float, default=None, metavar="X", help="first beta (default: 0.0001)")
    g.add_argument("--beta-end", type=float, default=None, metavar="X", help="last beta (default: 0.02)")
    g.add_argument("--prediction-type", default=None, choices=("epsilon", "sample", "v_prediction"),
                   help="what the U-Net predicts (default: epsilon)")
    g.add_argument("--variance-type", default=None, choices=("fixed_small", "fixed_large", "learned_range"),
                   help="the reverse-process variance (default: fixed_small)")
    g.add_argument("--clip-sample", default=None, action=argparse.BooleanOptionalAction,
                   help="clip x0-hat to [-1, 1] when sampling (default: on)")


def _scheduler_config(source: str, overrides: Optional[Dict[str, Any]] = None) -> dict:
    """The scheduler config of `source` (its scheduler/ sub-folder or a scheduler_config.json beside
    the U-Net) with `overrides` applied; from `overrides` alone when `source` has none."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    for candidate in (os.path.join(source, "scheduler", "scheduler_config.json"),
                      os.path.join(source, "scheduler_config.json")):
        if os.path.isfile(candidate):
            from ..jsonio import load_file

            loaded = load_file(candidate)
            if not isinstance(loaded, dict):
                raise ValueError(f"{candidate}: expected a JSON object (a diffusers scheduler config)")
            return {**loaded, **overrides}
    if "beta_schedule" in overrides:
        return {"_class_name": "DDPMScheduler", **overrides}
    raise ValueError(f"{source}: no noise schedule: a saved pipeline has scheduler/scheduler_config.json; for a "
                     "bare UNet2DModel folder pass the schedule it was trained with, e.g. --beta-schedule linear "
                     "(DDPM; add --num-train-timesteps, --beta-start, --beta-end, --prediction-type, --variance-type "
                     "where they differ from 1000, 0.0001, 0.02, epsilon, fixed_small), or put a "
                     "scheduler_config.json beside its config.json")


def _check_unet_folder(source: str) -> None:
    """ValueError naming `source` unless it (or its unet/ sub-folder) holds a diffusers UNet2DModel config."""
    from ..jsonio import load_file

    for cfg in (os.path.join(source, "unet", "config.json"), os.path.join(source, "config.json")):
        if os.path.isfile(cfg):
            loaded = load_file(cfg)
            name = loaded.get("_class_name") if isinstance(loaded, dict) else None
            if name == "UNet2DModel":
                return
            raise ValueError(f"{source}: not a UNet2DModel folder ({cfg} describes {name or 'something else'})")
    raise ValueError(f"{source}: not a UNet2DModel folder (no config.json in it or in its unet/ sub-folder); expected "
                     "a saved diffusers DDPMPipeline or UNet2DModel")


def convert(source: str, out: str, schedule: Optional[Dict[str, Any]] = None) -> str:
    """Convert the diffusers model in `source` and write `out`; returns `out`. `schedule`: scheduler
    config entries (DDPMScheduler's names) that override or, for a bare UNet2DModel, supply the
    source's. Raises ImportError without diffusers, ValueError for what cannot be converted."""
    from diffusers import UNet2DModel

    from ..checkpoint import save_weights_file
    from ..interop.diffusers import unet_from_diffusers
    from ..interop.schedulers import diffusion_from_scheduler

    if not out.endswith(".safetensors"):
        raise ValueError(f"out must end with .safetensors, got {out!r}")
    if not os.path.isdir(source):
        raise ValueError(f"{source}: not a directory (expected a saved diffusers pipeline or UNet2DModel)")
    _check_unet_folder(source)
    sched_cfg = _scheduler_config(source, schedule)  # before loading weights: a missing schedule fails fast
    sub = "unet" if os.path.isdir(os.path.join(source, "unet")) else None
    # low_cpu_mem_usage=False: the default asks for `accelerate` and warns on every run without it
    kw: Dict[str, Any] = {"low_cpu_mem_usage": False, **({"subfolder": sub} if sub else {})}
    unet = UNet2DModel.from_pretrained(source, **kw)
    diffusion = diffusion_from_scheduler(sched_cfg)
    model = unet_from_diffusers(unet)
    model_cfg = json.loads(json.dumps(model.config))
    if diffusion.variance == "learned_range" and model.out_channels == 2 * model.in_channels:
        model_cfg["learn_sigma"] = True  # the same U-Net; says what the extra channels are (as training writes it)
    config = {
        "format": "fastddpm-checkpoint", "format_version": 1, "weights": "raw",
        "model": model_cfg,
        "diffusion": {"schedule": "custom", "betas": diffusion.schedule.betas.tolist(),
                      "num_timesteps": diffusion.num_timesteps, "prediction": diffusion.prediction,
                      "variance": diffusion.variance, "loss": "simple",
                      "clip_sample": bool(sched_cfg.get("clip_sample", True))},
        "converted_from": {"source": os.path.abspath(source), "scheduler": sched_cfg.get("_class_name")},
    }
    return save_weights_file(out, model.state_dict(), config)


def run(args: argparse.Namespace) -> int:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise CLIError(INSTALL_HINT) from None
    if args.threads is not None:
        apply_threads(args.threads, 0)
    out = convert(args.source, args.out, {k: getattr(args, k, None) for k in _SCHEDULE_KEYS})
    print(f"{args.source} -> {out}")
    return 0

"""`fastddpm convert DIFFUSERS_DIR OUT.safetensors`: a diffusers DDPM into a fastddpm checkpoint file.

DIFFUSERS_DIR is a saved pipeline (with unet/ and scheduler/ sub-folders, e.g. a local copy of
google/ddpm-cifar10-32) or a UNet2DModel folder with a scheduler_config.json beside it. The U-Net is
mapped weight for weight into fastddpm.UNet (fastddpm.interop.diffusers); the betas, prediction and
variance types come from the scheduler config (fastddpm.interop.schedulers). The result samples with
`fastddpm sample --checkpoint OUT.safetensors`. Options with no fastddpm equivalent are refused with an
error naming the option.
"""
from __future__ import annotations

import argparse
import json
import os

HELP = "convert a diffusers DDPM (UNet2DModel + scheduler) into a fastddpm checkpoint file"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="DIFFUSERS_DIR", help="a saved diffusers pipeline or UNet2DModel folder")
    p.add_argument("out", metavar="OUT.safetensors", help="the fastddpm checkpoint file to write")


def _scheduler_config(source: str) -> dict:
    for candidate in (os.path.join(source, "scheduler", "scheduler_config.json"),
                      os.path.join(source, "scheduler_config.json")):
        if os.path.isfile(candidate):
            with open(candidate, encoding="utf-8") as fh:
                return json.load(fh)
    raise ValueError(f"{source}: no scheduler/scheduler_config.json or scheduler_config.json (needed for the "
                     f"noise schedule)")


def convert(source: str, out: str) -> str:
    """Convert the diffusers model in `source` and write `out`; returns `out`."""
    from diffusers import UNet2DModel

    from ..checkpoint import save_weights_file
    from ..interop.diffusers import unet_from_diffusers
    from ..interop.schedulers import diffusion_from_scheduler

    if not out.endswith(".safetensors"):
        raise ValueError(f"out must end with .safetensors, got {out!r}")
    if not os.path.isdir(source):
        raise ValueError(f"{source}: not a directory (expected a saved diffusers pipeline or UNet2DModel)")
    sub = "unet" if os.path.isdir(os.path.join(source, "unet")) else None
    unet = UNet2DModel.from_pretrained(source, subfolder=sub) if sub else UNet2DModel.from_pretrained(source)
    sched_cfg = _scheduler_config(source)
    diffusion = diffusion_from_scheduler(sched_cfg)
    model = unet_from_diffusers(unet)
    config = {
        "format": "fastddpm-checkpoint", "format_version": 1, "weights": "raw",
        "model": json.loads(json.dumps(model.config)),
        "diffusion": {"schedule": "custom", "betas": diffusion.schedule.betas.tolist(),
                      "num_timesteps": diffusion.num_timesteps, "prediction": diffusion.prediction,
                      "variance": diffusion.variance, "loss": "simple",
                      "clip_sample": bool(sched_cfg.get("clip_sample", True))},
        "converted_from": {"source": os.path.abspath(source), "scheduler": sched_cfg.get("_class_name")},
    }
    return save_weights_file(out, model.state_dict(), config)


def run(args: argparse.Namespace) -> int:
    out = convert(args.source, args.out)
    print(f"{args.source} -> {out}")
    return 0

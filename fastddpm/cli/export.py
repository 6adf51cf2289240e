"""`fastddpm export [--checkpoint CKPT] OUT_DIR`: a fastddpm model as a diffusers `DDPMPipeline` folder.

    fastddpm export digits-diffusers                       # the bundled digits model
    fastddpm export --checkpoint runs/cifar cifar-diffusers
    # python: DDPMPipeline.from_pretrained("cifar-diffusers")

Writes model_index.json, unet/ (UNet2DModel config + safetensors weights), scheduler/ (a DDPMScheduler
config with the checkpoint's betas, prediction and variance) and a README saying what diffusers
reproduces (`fastddpm.interop.export`). Does not need diffusers. A non-empty OUT_DIR is refused unless
``--overwrite``; settings diffusers cannot represent are refused naming the setting.
"""
from __future__ import annotations

import argparse

HELP = "write a checkpoint as a diffusers DDPMPipeline folder (UNet2DModel + DDPMScheduler)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", metavar="OUT_DIR", help="the pipeline folder to write")
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="a run directory, checkpoint directory or .safetensors file (default: the bundled model)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--overwrite", action="store_true", help="replace the pipeline files of a non-empty OUT_DIR")


def run(args: argparse.Namespace) -> int:
    from ..interop.export import export_diffusers

    out = export_diffusers(args.checkpoint, args.out_dir, use_ema=not args.no_ema, overwrite=args.overwrite)
    print(f"{args.checkpoint or 'bundled digits model'} -> {out} (diffusers DDPMPipeline; see {out}/README.md)")
    return 0

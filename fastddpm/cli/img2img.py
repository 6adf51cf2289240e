"""``fastddpm img2img --image IMG --strength S --out OUT``: SDEdit with any sampler (`fd.img2img`).

    fastddpm img2img --image digit.png --strength 0.5 --out edited.png
    fastddpm img2img --image samples.npz --strength 0.3 --sampler unipc --steps 10 --out edited.npz

The image is noised to the timestep `--strength` in (0, 1] names (1: from pure noise, diffusers'
convention) and sampled back with `--steps` model calls of `--sampler` (docs/editing.md).
"""
from __future__ import annotations

import argparse

from ._common import CLIError
from ._editing import add_common, prepare, sampler_option, write_output

HELP = "SDEdit: noise images to a strength and sample them back (any sampler)"


def configure(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--strength", type=float, default=0.5,
                   help="in (0, 1]: how much is regenerated (1: from pure noise; default: 0.5)")
    sampler_option(p, "ddim")
    p.add_argument("--steps", type=int, default=None, help="model calls (default: the sampler's default)")


def run(args: argparse.Namespace) -> int:
    from ..editing import img2img

    if not 0.0 < args.strength <= 1.0:
        raise CLIError(f"--strength must be in (0, 1], got {args.strength}")
    model, diffusion, images, _, labels = prepare(args)
    x = img2img(model, images, args.strength, steps=args.steps, sampler=args.sampler, eta=args.eta,
                seed=args.seed, diffusion=diffusion, clip_denoised=not args.no_clip, labels=labels,
                guidance_scale=args.guidance_scale)
    write_output(x, args.out, args.scale)
    print(f"{images.shape[0]} images, strength {args.strength} -> {args.out}")
    return 0

"""``fastddpm inpaint --image IMG --mask MASK --out OUT``: regenerate the masked-out region (`fd.inpaint`).

    fastddpm inpaint --image digits.npz --mask bottom-half --out filled.png          # RePaint, 250 steps
    fastddpm inpaint --image photo.png --mask mask.png --method replace --sampler unipc --steps 20 --out o.png

MASK is an image (white = keep, black = generate: diffusers' convention) or a preset naming the region
to generate: bottom-half, top-half, left-half, right-half, center. `--method repaint` (default) is
diffusers' RePaint loop (`--steps`, `--jump-length`, `--jump-n-sample`, `--eta`, default 1 = DDPM);
`--method replace` is the few-step mode on any sampler (docs/editing.md).
"""
from __future__ import annotations

import argparse

from ._editing import MASK_PRESETS, add_common, prepare, read_mask, sampler_option, write_output

HELP = "inpainting: RePaint (diffusers' loop) or few-step known-region replacement on any sampler"


def configure(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--mask", required=True, metavar="MASK",
                   help=f"a mask image (white = keep, black = generate) or a preset region to generate: "
                        f"{', '.join(MASK_PRESETS)}")
    p.add_argument("--method", default="repaint", choices=("repaint", "replace"), help="default: repaint")
    sampler_option(p, None, " (repaint: its own loop; replace: unipc)")
    p.add_argument("--steps", type=int, default=None,
                   help="repaint: inference steps (default 250); replace: model calls (default: the sampler's)")
    p.add_argument("--jump-length", type=int, default=10, help="RePaint's jump length j (default: 10)")
    p.add_argument("--jump-n-sample", type=int, default=10, help="RePaint's resampling count r (default: 10)")


def run(args: argparse.Namespace) -> int:
    from ..editing import inpaint

    model, diffusion, images, device, labels = prepare(args)
    mask = read_mask(args.mask, images).to(device)
    x = inpaint(model, images, mask, method=args.method, steps=args.steps, sampler=args.sampler,
                jump_length=args.jump_length, jump_n_sample=args.jump_n_sample, eta=args.eta, seed=args.seed,
                diffusion=diffusion, clip_denoised=not args.no_clip, labels=labels,
                guidance_scale=args.guidance_scale)
    write_output(x, args.out, args.scale)
    print(f"{images.shape[0]} images inpainted ({args.method}) -> {args.out}")
    return 0

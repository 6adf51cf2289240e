"""Inpainting on the bundled digits model: the bottom half of held-out digits regenerated from their top half.

    python scripts/inpaint_digits.py --json docs/inpaint_digits.json --png docs/inpaint_digits.png

For each setting the shipped digits classifier (fastddpm.features, trained on the other part of the split)
labels the completed digits; its accuracy against the true labels is reported next to its accuracy on the
real held-out digits (the ceiling), on the top halves alone (bottom half set to background, -1: what the
kept half tells the classifier by itself) and on unconditional samples paired with the same labels (chance:
the floor). Also the mean squared error of the generated half against the true one, and the model calls.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import fastddpm as fd
from fastddpm.data import load_digits
from fastddpm.editing import repaint_timesteps
from fastddpm.features import digits_split, load_digits_classifier

# (label, fd.inpaint keyword arguments)
SETTINGS = {
    "repaint-100-j10-r10": dict(method="repaint", steps=100, jump_length=10, jump_n_sample=10),
    "repaint-50-j5-r5": dict(method="repaint", steps=50, jump_length=5, jump_n_sample=5),
    "repaint-50-j5-r5-eta0": dict(method="repaint", steps=50, jump_length=5, jump_n_sample=5, eta=0.0),
    "repaint-20-j5-r5": dict(method="repaint", steps=20, jump_length=5, jump_n_sample=5),
    "repaint-50-j5-r1": dict(method="repaint", steps=50, jump_length=5, jump_n_sample=1),
    "replace-unipc-10": dict(method="replace", sampler="unipc", steps=10),
    "replace-unipc-20": dict(method="replace", sampler="unipc", steps=20),
    "replace-ddpm-100": dict(method="replace", sampler="ddpm", steps=100),
}


def model_calls(kw: dict) -> int:
    if kw["method"] == "replace":
        return kw["steps"]
    ts = repaint_timesteps(1000, kw["steps"], kw["jump_length"], kw["jump_n_sample"])
    return sum(1 for i, t in enumerate(ts) if i == 0 or t < ts[i - 1])


def heldout() -> tuple:
    ds = load_digits()
    _, idx = digits_split(len(ds.images))
    idx = torch.as_tensor(idx)
    x = ds.images.index_select(0, idx).to(torch.float32) / 127.5 - 1.0
    return x, torch.as_tensor(ds.labels).index_select(0, idx)


def accuracy(clf, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((clf.probs(images).argmax(1) == labels).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS")
    ap.add_argument("--num", type=int, default=None, help="the first N held-out digits (default: all 359)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None, help="grid: real, input (top half), then one row per setting")
    ap.add_argument("--show", type=int, default=16, help="digits shown in the picture")
    ap.add_argument("--picture", default=None, help="comma-separated settings shown in the picture (default: all run)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = fd.load(device="cpu")
    clf = load_digits_classifier()
    x, y = heldout()
    if args.num:
        x, y = x[: args.num], y[: args.num]
    mask = torch.ones(1, 1, 8, 8)
    mask[..., 4:, :] = 0  # keep the top half, generate the bottom half
    top_only = torch.where(mask.bool(), x, torch.full_like(x, -1.0))
    uncond = pipe(x.shape[0], seed=args.seed + 1, sampler="unipc", num_inference_steps=10, output_type="pt").images
    res = {"num": int(x.shape[0]), "seed": args.seed, "accuracy_real": accuracy(clf, x, y),
           "accuracy_top_half_only": accuracy(clf, top_only, y), "accuracy_unconditional": accuracy(clf, uncond, y),
           "settings": {}}
    rows = [x[: args.show], top_only[: args.show]]
    for name in args.settings.split(","):
        kw = SETTINGS[name]
        t0 = time.perf_counter()
        out = fd.inpaint(pipe, x, mask, seed=args.seed, **kw)
        res["settings"][name] = {"accuracy": accuracy(clf, out, y), "model_calls": model_calls(kw),
                                 "bottom_mse": float(((out - x)[..., 4:, :] ** 2).mean()),
                                 "seconds": round(time.perf_counter() - t0, 1), "kwargs": kw}
        print(name, res["settings"][name], flush=True)
        if args.picture is None or name in args.picture.split(","):
            rows.append(out[: args.show])
    print(json.dumps({k: v for k, v in res.items() if k != "settings"}))
    if args.json:
        from fastddpm.fileio import atomic_write_json

        atomic_write_json(args.json, res)
    if args.png:
        fd.save_grid(torch.cat(rows), args.png, nrow=args.show, scale=4)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()

"""Train the shipped digits classifier (fastddpm/assets/digits_classifier.safetensors + .json).

    OMP_NUM_THREADS=1 python scripts/train_digits_classifier.py [--epochs 60] [--seed 0] [--out DIR]

Data: the bundled ``digits`` set (1,797 8x8 images in [-1, 1]); it trains on the training part of
``fastddpm.features.digits_split()`` (a permutation seeded with DIGITS_SPLIT_SEED; the last 20%
held out) and reports the accuracy on the held-out 20%. Augmentation: random shifts of up to one
pixel (zero = background padding), so that slightly off-centre samples are still recognised.
AdamW, cosine LR, batch 64; deterministic for a given seed on one thread. Takes a few seconds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastddpm.data import load_dataset  # noqa: E402
from fastddpm.features import DIGITS_HOLDOUT_FRACTION, DIGITS_SPLIT_SEED, DigitsClassifier, digits_split  # noqa: E402


def random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by (dy, dx) in [-max_shift, max_shift]^2, filling with the background (-1)."""
    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # [n, h]
    cols = (dx[:, None] + torch.arange(w)[None, :])  # [n, w]
    idx_n = torch.arange(n)[:, None, None]
    return padded[idx_n, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fastddpm", "assets"))
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    ds = load_dataset("digits")
    train_idx, test_idx = digits_split(len(ds))
    x_tr, y_tr = ds.batch(train_idx)
    x_te, y_te = ds.batch(test_idx)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x_tr) / args.batch_size)
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=g)
        for i in range(0, len(perm), args.batch_size):
            b = perm[i:i + args.batch_size]
            xb = random_shift(x_tr[b], g)
            loss = F.cross_entropy(model.logits(xb), y_tr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0 or epoch == args.epochs - 1:
            model.eval()
            with torch.no_grad():
                acc = (model.logits(x_te).argmax(1) == y_te).float().mean().item()
                tr_acc = (model.logits(x_tr).argmax(1) == y_tr).float().mean().item()
            print(f"epoch {epoch + 1}: loss {loss.item():.4f} train acc {tr_acc:.4f} held-out acc {acc:.4f}")
    wall = time.time() - t0
    model.eval()
    with torch.no_grad():
        acc = (model.logits(x_te).argmax(1) == y_te).float().mean().item()
        conf = (model.probs(x_te).max(1).values >= 0.9).float().mean().item()

    from safetensors.torch import save_file

    os.makedirs(args.out, exist_ok=True)
    w_path = os.path.join(args.out, "digits_classifier.safetensors")
    meta = {
        "format": "fastddpm-digits-classifier",
        "config": model.config,
        "split": {"seed": DIGITS_SPLIT_SEED, "holdout_fraction": DIGITS_HOLDOUT_FRACTION,
                  "rule": "numpy.random.default_rng(seed).permutation(1797); last 20% held out",
                  "train": int(len(train_idx)), "heldout": int(len(test_idx))},
        "heldout_accuracy": round(acc, 6),
        "heldout_confidence_rate_0.9": round(conf, 6),
        "training": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                     "optimizer": "AdamW(wd=1e-4), cosine LR, random 1-pixel shifts",
                     "command": "OMP_NUM_THREADS=1 python scripts/train_digits_classifier.py",
                     "wall_seconds": round(wall, 1)},
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, w_path)
    with open(os.path.join(args.out, "digits_classifier.json"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2)
        fh.write("\n")
    print(json.dumps(meta, indent=2))
    return meta


if __name__ == "__main__":
    main()

"""Build fastddpm/assets/digits.npz from scikit-learn's bundled copy of the UCI digits.

The 1,797 8x8 handwritten digits (UCI "Optical Recognition of Handwritten Digits", test part as
bundled by scikit-learn) have integer pixel values 0..16. They are stored here as uint8 0..255
(round(v * 255 / 16)) with their labels, so the package never needs scikit-learn at run time.

    pip install scikit-learn && python scripts/make_digits_npz.py
"""
from __future__ import annotations

import argparse
import os

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.path.join(os.path.dirname(__file__), "..", "fastddpm", "assets", "digits.npz")
    parser.add_argument("--out", default=os.path.normpath(default))
    args = parser.parse_args()

    from sklearn.datasets import load_digits  # only here, never at run time

    d = load_digits()
    raw = np.asarray(d.images)  # [1797, 8, 8] float64 in 0..16
    if raw.shape != (1797, 8, 8) or raw.min() < 0 or raw.max() > 16:
        raise SystemExit(f"unexpected digits data: shape {raw.shape}, range {raw.min()}..{raw.max()}")
    images = np.rint(raw * (255.0 / 16.0)).astype(np.uint8)[:, :, :, None]  # NHWC, 1 channel
    labels = np.asarray(d.target, dtype=np.int64)
    np.savez_compressed(args.out, images=images, labels=labels)
    print(f"wrote {args.out}: images {images.shape} {images.dtype}, labels {labels.shape}")


if __name__ == "__main__":
    main()

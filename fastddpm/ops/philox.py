"""Pure-PyTorch Philox4x32-10, bit for bit the generator of Triton's `tl.philox` / `tl.randn`.

The fused sampler-step kernel (`kernels/sampler_step.py`) draws its noise in the kernel with Philox;
this module computes the same stream with torch integer ops, so the reference path, the CPU and the
GPU all give the same images for a seed (uint32 words bit for bit, normals to float rounding).

Counters (see the sampler_step contract): for image i of a batch and flat element e inside that image,
    c0 = e,  c1 = image_offset + i,  c2 = step,  c3 = stream      (each taken modulo 2**32)
and the key is the 64-bit seed split as in `triton.language.random.philox`:
    k0 = seed & 0xffffffff,  k1 = (seed >> 32) & 0xffffffff.
Stream 0 is the per-step noise; stream 1 is reserved for the initial x_T.

uint32 arithmetic is emulated in int64 tensors with masks; the 32x32 -> 64-bit products of the
Philox rounds wrap modulo 2**64 in int64, which keeps all 64 bits of the product (see `_mulhilo`).
One normal per element, exactly as `tl.randn`: words w0, w1 -> uniforms u1, u2 (Triton's
`uint_to_uniform_float`) -> Box-Muller r*cos(theta), all in float32.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = ["philox_uint32", "philox_normal", "philox_words", "uint32_to_normal"]

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
N_ROUNDS = 10
# Triton's uint_to_uniform_float scale for 32-bit words, and the Box-Muller constants (as float32).
_UNIFORM_SCALE = 4.6566127342e-10
_U1_MIN = 1.0e-7
_TWO_PI = 6.283185307179586

# elements per chunk in philox_normal (bounds the int64 temporaries to a few hundred MB)
_CHUNK = 1 << 22

Device = Union[str, torch.device, None]


def _mulhilo(a: int, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product of the uint32 constant `a` and uint32 tensor `b`.

    The product (< 2**64) is formed in int64, which wraps modulo 2**64 (two's complement, as torch's
    integer kernels do): its low 64 bits are exact, so an arithmetic shift by 32 and a 32-bit mask give
    the high word. (Random123's known answers and Triton's own words check this in
    tests/kernels/test_philox.py.) One multiply instead of four 16-bit limb products: about half the
    ops per round on the CPU reference path.
    """
    p = b * a
    return (p >> 32) & _MASK32, p & _MASK32


def philox_words(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor,
    n_rounds: int = N_ROUNDS,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 rounds on int64 tensors holding uint32 values (broadcast together).

    The exact sequence of `triton.language.random.philox_impl` for 32-bit counters. Returns the four
    output words as int64 tensors with values in [0, 2**32).
    """
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _MASK32 for c in (c0, c1, c2, c3))
    k0 = torch.as_tensor(k0, dtype=torch.int64) & _MASK32
    k1 = torch.as_tensor(k1, dtype=torch.int64) & _MASK32
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uniform(w: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float for 32-bit words: bitcast to int32, fold negatives, scale."""
    folded = torch.where(w >= (1 << 31), _MASK32 - w, w)  # ~x of the int32 bitcast when negative
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=w.device)


def uint32_to_normal(w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """Box-Muller of two Philox words, as `tl.randn` (first normal of the pair, float32)."""
    u1 = _uniform(w0)
    u2 = _uniform(w1)
    f32 = dict(dtype=torch.float32, device=w0.device)
    u1 = torch.maximum(u1, torch.tensor(_U1_MIN, **f32))
    th = torch.tensor(_TWO_PI, **f32) * u2
    r = torch.sqrt(torch.tensor(-2.0, **f32) * torch.log(u1))
    return r * torch.cos(th)


def _check(seed: torch.Tensor, step: torch.Tensor, shape: Sequence[int], stream: int, image_offset: int) -> Tuple[int, ...]:
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"seed must be an int64 tensor with one element, got {seed!r}")
    if not isinstance(step, torch.Tensor) or step.dtype != torch.int64 or step.numel() != 1:
        raise ValueError(f"step must be an int64 tensor with one element, got {step!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or any(s < 0 for s in shape):
        raise ValueError(f"shape must be a non-empty tuple of non-negative sizes (images first), got {shape}")
    if not isinstance(stream, int) or not 0 <= stream < 2**32:
        raise ValueError(f"stream must be an int in [0, 2**32), got {stream!r}")
    if not isinstance(image_offset, int) or image_offset < 0:
        raise ValueError(f"image_offset must be a non-negative int, got {image_offset!r}")
    return shape


def philox_uint32(
    seed: torch.Tensor, shape: Sequence[int], step: torch.Tensor, stream: int = 0, image_offset: int = 0,
    device: Device = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four raw Philox4x32-10 words per element of `shape` (int64 tensors with uint32 values).

    Counters as in the module docstring: c0 = flat element index inside image i (shape[0] images),
    c1 = image_offset + i, c2 = step, c3 = stream; key from the 64-bit seed. The words are the ones
    `tl.philox(seed, c0, c1, c2, c3)` returns in a Triton kernel with uint32 counters.
    """
    shape = _check(seed, step, shape, stream, image_offset)
    dev = torch.device(device) if device is not None else seed.device
    n = shape[0]
    per_image = math.prod(shape[1:])
    s = seed.reshape(1).to(dev)
    k0 = s & _MASK32
    k1 = (s >> 32) & _MASK32
    c0 = torch.arange(per_image, dtype=torch.int64, device=dev).reshape(1, -1)
    c1 = (image_offset + torch.arange(n, dtype=torch.int64, device=dev)).reshape(-1, 1)
    c2 = step.reshape(1, 1).to(dev)
    c3 = torch.full((1, 1), stream, dtype=torch.int64, device=dev)
    c0, c1 = torch.broadcast_tensors(c0, c1)
    words = philox_words(c0, c1, c2, c3, k0, k1)
    return tuple(w.reshape(shape) for w in words)


def philox_normal(
    seed: torch.Tensor, shape: Sequence[int], step: torch.Tensor, stream: int = 0, image_offset: int = 0,
    device: Device = None,
) -> torch.Tensor:
    """Standard normals (float32, one per element of `shape`) of the sampler's Philox stream.

    `seed`, `step`: int64 tensors with one element (kept on the device, no host sync). shape[0] is the
    number of images; image i uses counter c1 = image_offset + i, so its noise does not depend on the
    batch it is drawn in. Matches `tl.randn`-style generation in `kernels/sampler_step.py` bit for bit
    in the uint32 words and to float rounding (log/cos/sqrt implementations) in the normals.
    """
    shape = _check(seed, step, shape, stream, image_offset)
    dev = torch.device(device) if device is not None else seed.device
    n = shape[0]
    per_image = math.prod(shape[1:])
    out = torch.empty((n, per_image), dtype=torch.float32, device=dev)
    if out.numel() == 0:
        return out.reshape(shape)
    images_per_chunk = max(1, _CHUNK // max(per_image, 1))
    for start in range(0, n, images_per_chunk):
        stop = min(n, start + images_per_chunk)
        w0, w1, _, _ = philox_uint32(seed, (stop - start, per_image), step, stream, image_offset + start, dev)
        out[start:stop] = uint32_to_normal(w0, w1)
    return out.reshape(shape)

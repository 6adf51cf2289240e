"""Backend selection for the fused ops: "reference" (plain PyTorch) or "triton".

The backend is chosen per call. Under "auto" (the default) CUDA tensors go to Triton when triton is
importable, everything else to the reference. `use_backend("triton")` forces Triton also for CPU
tensors, which then run through Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is
imported; tests/conftest.py does that when CUDA is absent).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from typing import Iterator

import torch

BACKENDS = ("auto", "reference", "triton")
MEMORY_FORMATS = {"auto": None, "contiguous": torch.contiguous_format, "channels_last": torch.channels_last}

_state = threading.local()


def triton_available() -> bool:
    """True when triton can be imported (it is never imported just to answer this)."""
    return importlib.util.find_spec("triton") is not None


def current_backend() -> str:
    """The forced backend name, or "auto"."""
    return getattr(_state, "backend", "auto")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend for the fused ops inside the block: "auto", "reference" or "triton"."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "triton" and not triton_available():
        raise RuntimeError("backend 'triton' was requested but triton is not installed")
    previous = current_backend()
    _state.backend = name
    try:
        yield
    finally:
        _state.backend = previous


def interpreter_active() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1): CPU tensors can then launch."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def launchable(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on `t`: a CUDA tensor, or any tensor under the interpreter."""
    return t.is_cuda or interpreter_active()


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op called on tensor `t` should run its Triton implementation.

    "reference": never. "triton": whenever a kernel can launch on `t` (`launchable`: CPU tensors without
    the interpreter take the reference instead of failing in the launcher). "auto": CUDA tensors with
    triton importable."""
    backend = current_backend()
    if backend == "reference":
        return False
    if backend == "triton":
        return launchable(t)
    return t.is_cuda and triton_available()


@contextlib.contextmanager
def use_memory_format(name: str) -> Iterator[None]:
    """Force the layout `preferred_memory_format` returns inside the block: "auto" (the per-device
    default), "contiguous" (NCHW) or "channels_last". benchmarks/gpu_check.py times the U-Net both ways."""
    if name not in MEMORY_FORMATS:
        raise ValueError(f"memory format must be one of {tuple(MEMORY_FORMATS)}, got {name!r}")
    previous = getattr(_state, "memory_format", None)
    _state.memory_format = MEMORY_FORMATS[name]
    try:
        yield
    finally:
        _state.memory_format = previous


def preferred_memory_format(t: torch.Tensor) -> torch.memory_format:
    """The activation layout the fused ops and the convolutions around them run fastest in for tensor `t`
    (`use_memory_format` overrides it).

    channels-last where the reference path runs on the CPU: oneDNN's convolutions work in NHWC natively
    (an NCHW input is reordered on every call), and the reference ops keep a channels-last input's
    layout. Contiguous (NCHW) wherever the Triton kernels run, for now: the GroupNorm kernels have a
    channels-last path (NHWC read and written in place, no copy; tested in the interpreter and compiled
    for sm_80/sm_90 without spills), and cuDNN's bf16 convolutions are usually faster in NHWC, but no GPU
    has been available to time the two layouts. benchmarks/gpu_check.py (part "layout") times the U-Net's
    bf16 forward and forward+backward both ways; the default moves to channels-last on CUDA only if that
    measurement shows it faster.
    """
    forced = getattr(_state, "memory_format", None)
    if forced is not None:
        return forced
    if t.device.type == "cpu" and not use_triton(t):
        return torch.channels_last
    return torch.contiguous_format

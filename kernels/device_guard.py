"""Run a launcher on its tensors' CUDA device.

Triton launches on the *current* CUDA device, and nothing enters a tensor's device before a launch:
a tensor on cuda:1 while cuda:0 is current fails ("Pointer argument ... cannot be accessed") or, worse,
a CUDA-graph capture records the launch on the wrong device's stream. Every public launcher in
`kernels/` is wrapped in `on_tensor_device`, which enters the device of its first tensor argument
(`torch.cuda.device`, a no-op when that device is already current; nothing for CPU tensors).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
from typing import Any, Callable, TypeVar

import torch

__all__ = ["on_tensor_device", "tensor_device_guard"]

F = TypeVar("F", bound=Callable[..., Any])


def tensor_device_guard(*args: Any, **kwargs: Any) -> contextlib.AbstractContextManager:
    """`torch.cuda.device(d)` for the device d of the first tensor among the arguments, if it is CUDA."""
    for a in itertools.chain(args, kwargs.values()):
        if isinstance(a, torch.Tensor):
            return torch.cuda.device(a.device) if a.is_cuda else contextlib.nullcontext()
    return contextlib.nullcontext()


def on_tensor_device(fn: F) -> F:
    """Decorator: call `fn` under the CUDA device guard of its first tensor argument."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with tensor_device_guard(*args, **kwargs):
            return fn(*args, **kwargs)

    wrapper.device_guarded = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]

"""Cheap run-time guards for the sampling loops: non-finite values and class-label ranges.

:class:`FiniteWatch` records, on the device, the first step whose x holds a NaN or an infinity: each
update is a few tiny device ops (no host sync), and :meth:`FiniteWatch.check` reads the result once,
after the loop (``Sampler.sample``). :func:`raise_if_nonfinite` checks only the final x and replays the
steps to find the bad one when it fails (``FastSampler``, whose steps stay one op each).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch

__all__ = ["NonFiniteSampleError", "FiniteWatch", "raise_if_nonfinite", "check_labels"]


class NonFiniteSampleError(FloatingPointError):
    """Sampling produced NaN or infinite values; the message names the step where they first appeared."""


class FiniteWatch:
    """The first sampling step (0-based) after which x was not finite, kept on the device.

    ``timesteps``: the model timestep of each step, for the message.
    """

    def __init__(self, device: Union[str, torch.device], timesteps: Optional[Sequence[int]] = None):
        self.first = torch.full((1,), -1, dtype=torch.int64, device=device)
        self.timesteps = [int(t) for t in timesteps] if timesteps is not None else None

    def reset(self) -> None:
        self.first.fill_(-1)

    def update(self, x: torch.Tensor, step: Union[int, torch.Tensor]) -> None:
        """Record ``step`` if x is not finite and no earlier step was (device ops only: no sync)."""
        bad = torch.isfinite(x).logical_not().any().reshape(1)
        step_t = torch.as_tensor(step, dtype=torch.int64, device=self.first.device).reshape(1)
        self.first.copy_(torch.where(bad & (self.first < 0), step_t, self.first))

    def check(self, what: str = "sampling") -> None:
        """Raise NonFiniteSampleError naming the first bad step (one host read)."""
        s = int(self.first.reshape(-1)[0])
        if s >= 0:
            raise _error(what, s, self.timesteps)


def _error(what: str, s: int, timesteps: Optional[Sequence[int]]) -> NonFiniteSampleError:
    t = f" (model timestep t={timesteps[s]})" if timesteps and s < len(timesteps) else ""
    return NonFiniteSampleError(
        f"{what}: x became NaN/inf at step {s}{t}; the model returned non-finite values there (or its "
        "weights hold them). Check the checkpoint (NaN weights), the dtype (fp16 overflow) and the inputs")


def raise_if_nonfinite(x: torch.Tensor, replay: Callable[[], Iterable[torch.Tensor]], what: str,
                       timesteps: Optional[Sequence[int]] = None) -> None:
    """One finiteness check of a finished loop's x (one host read); when it fails, ``replay()`` runs the
    steps again, yielding x after each, to name the first step where NaN/inf appeared."""
    if bool(torch.isfinite(x).all()):
        return
    for s, xs in enumerate(replay()):
        if not bool(torch.isfinite(xs).all()):
            raise _error(what, s, timesteps)
    raise _error(what, len(timesteps) - 1 if timesteps else 0, timesteps)


def check_labels(labels: Any, num_classes: Optional[int], name: str = "y", allow_null: bool = True) -> None:
    """ValueError naming ``name`` unless ``labels`` are integers in [0, num_classes] ([0, num_classes)
    without ``allow_null``). Reads the values: call it once per call site, not per step on CUDA."""
    if num_classes is None or labels is None:
        return
    t = torch.as_tensor(labels)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class labels, got dtype {t.dtype}")
    if t.numel() == 0:
        return
    hi = num_classes if allow_null else num_classes - 1
    lo_v, hi_v = int(t.min()), int(t.max())
    if lo_v < 0 or hi_v > hi:
        null = f" ({num_classes} = the null class)" if allow_null else ""
        raise ValueError(f"{name} must be class labels in [0, {hi}]{null}, got values in [{lo_v}, {hi_v}]")

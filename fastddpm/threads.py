"""CPU threads for one sampling call of the Python API, chosen as the command line chooses them.

A small model (under :data:`fastddpm._names.SMALL_MODEL_PARAMS` parameters, such as the bundled one)
runs fastest on one CPU thread: the work per op is too small to pay for waking a second thread, and on a
loaded machine extra threads make it many times slower (benchmarks/bench_threads.py). The CLI sets the
count once per command; :func:`call_threads` does it for one API call (``Pipeline.__call__``,
``FastSampler.__call__``) and restores the caller's setting after. It changes nothing when the caller
chose threads themselves (``torch.set_num_threads`` to another count than torch's default, or
OMP_NUM_THREADS), when the model is not on the CPU, or when the model is large.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch

from ._names import SMALL_MODEL_PARAMS

__all__ = ["call_threads", "TORCH_DEFAULT_THREADS"]

# torch's thread count when fastddpm was imported: a different count later is the caller's own choice
TORCH_DEFAULT_THREADS = torch.get_num_threads()


@contextlib.contextmanager
def call_threads(model: Any, device: Any) -> Iterator[int]:
    """Within the block, torch uses one thread for a small CPU model unless the caller chose a count;
    the caller's count is restored on exit. Yields the count in use."""
    before = torch.get_num_threads()
    small = (str(getattr(device, "type", device)) == "cpu" and hasattr(model, "parameters")
             and sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS)
    chosen = not os.environ.get("OMP_NUM_THREADS") and before == TORCH_DEFAULT_THREADS and small
    if chosen:
        torch.set_num_threads(1)
    try:
        yield torch.get_num_threads()
    finally:
        if chosen:
            torch.set_num_threads(before)

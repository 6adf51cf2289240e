"""Device-independent cost figures: bytes saved for backward, ops dispatched, FLOPs.

These hold on any machine (no timing), so they compare architectures and implementations fairly:
- `saved_bytes(fn)`: bytes of the tensors autograd saves for backward while `fn()` runs
  (`torch.autograd.graph.saved_tensors_hooks`), each storage counted once, parameters excluded.
- `count_ops(fn)`: the ops that reach the dispatcher (`TorchDispatchMode`), views included; a
  fastddpm custom op counts as one op (its implementation runs below the mode).
- `count_flops(fn)`: `FlopCounterMode` total, with formulas for `fastddpm::attention` and for SDPA's
  CPU kernel (4 N^2 d per head: QK^T and PV), which torch leaves uncounted.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _storage_key(t: torch.Tensor) -> tuple:
    s = t.untyped_storage()
    return (t.device.type, s.data_ptr(), s.nbytes())


def saved_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward during `fn()`, minus `exclude`."""
    excluded = {_storage_key(p) for p in exclude}
    seen: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in excluded and t.untyped_storage().nbytes() > 0:
            seen[key] = key[2]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return int(sum(seen.values()))


class _OpCounter(TorchDispatchMode):
    def __init__(self, views: bool = True) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.views = views

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.views or not func.is_view:
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], Any], views: bool = True) -> Counter:
    """Counter of op name -> calls for every op dispatched while `fn()` runs (autograd's backward ops
    included when `fn` calls backward). `views=False` leaves out view ops (no kernel runs for them):
    the dispatched-op stand-in for the kernels a step launches where no GPU profiler is at hand."""
    counter = _OpCounter(views)
    with counter:
        fn()
    return counter.ops


_FLOPS_REGISTERED = False


def _register_attention_flops() -> None:
    global _FLOPS_REGISTERED
    if _FLOPS_REGISTERED:
        return
    from torch.utils.flop_counter import register_flop_formula

    import fastddpm.ops  # noqa: F401  (registers the ops)

    @register_flop_formula(torch.ops.fastddpm.attention)
    def _attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        b, h, n, d = q_shape
        m = k_shape[2]
        return 2 * b * h * n * m * d * 2  # S = QK^T and O = PV, 2 FLOPs per multiply-add

    # torch has no formula for SDPA's CPU kernel: without one, a peer's attention on the CPU would
    # count as free and the comparison would be skewed by exactly the attention FLOPs
    from torch.utils.flop_counter import flop_registry

    cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if cpu_sdpa not in flop_registry:
        @register_flop_formula(cpu_sdpa)
        def _cpu_sdpa_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
            b, h, n, d = q_shape
            return 2 * b * h * n * k_shape[2] * d * 2

    _FLOPS_REGISTERED = True


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs of `fn()` by torch's FlopCounterMode (fused attention included)."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_attention_flops()
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def training_step_fn(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                     y: Optional[torch.Tensor] = None) -> Callable[[], torch.Tensor]:
    """A closure computing the eps-MSE training loss of `model` (for `saved_bytes`)."""
    target = torch.randn_like(x)

    def step() -> torch.Tensor:
        out = model(x, t)
        out = out if isinstance(out, torch.Tensor) else out.sample
        return torch.nn.functional.mse_loss(out, target)

    return step

"""Data-parallel plumbing for training and sampling under torchrun: who am I, which device, the process
group, and one clear error when a peer process fails.

Under ``torchrun --nproc_per_node N`` each process reads its rank from the environment
(:func:`dist_info`), takes its device (:func:`resolve_device`) and joins the process group
(:func:`join_process_group`: nccl on CUDA, gloo on the CPU). Every collective then waits at most
``timeout`` seconds; when one fails, :func:`ddp_failure` turns the collective's error into one
:class:`DistributedError` naming the rank that failed or stalled, from the records the ranks leave
in the rendezvous store.
"""
from __future__ import annotations

import datetime
import os
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["DistributedError", "dist_info", "resolve_device", "join_process_group", "ddp_failure"]

_FAILED_KEY = "fastddpm/failed/{}"
_ALIVE_KEY = "fastddpm/alive/{}"


class DistributedError(RuntimeError):
    """A peer process of a data-parallel run failed or stalled; the message says which rank."""


def dist_info() -> Tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment (1 process without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """`spec` ('auto', 'cpu', 'cuda' or 'cuda:N') as a torch.device; 'auto' and a bare 'cuda' take the
    process's local rank (torchrun). ValueError naming the accepted values when it cannot be used."""
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} asked for, but CUDA is not available")
    if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {spec!r} asked for, but there are {torch.cuda.device_count()} CUDA devices")
    return dev


def join_process_group(world: int, device: torch.device, timeout: float) -> bool:
    """Join torchrun's process group when world > 1 (nccl on CUDA, gloo on the CPU).

    ``timeout`` (seconds) bounds every collective: a dead or stalled peer ends the run after it
    instead of torch's default 30 minutes. Returns whether this call created the group (the caller
    then destroys it when done).
    """
    if world <= 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=float(timeout)))
    return True


def _is_peer_failure(e: BaseException) -> bool:
    """An error of a collective or the rendezvous store (a peer died or stalled), not of this process's work."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(k in text for k in (
        "gloo", "Gloo", "NCCL", "Connection closed by peer", "Connection reset by peer", "Broken pipe",
        "Timed out", "timed out", "Socket Timeout", "recvBytes", "sendBytes"))


def _peer_failure(e: BaseException, rank: int, world: int, timeout: float) -> DistributedError:
    """One line naming the failed rank(s), from the records the ranks leave in the rendezvous store."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(_ALIVE_KEY.format(rank), "1")
        start = time.monotonic()
        failed: Dict[int, str] = {}
        silent: Optional[List[int]] = None
        while True:
            failed = {r: store.get(_FAILED_KEY.format(r)).decode("utf-8", "replace") for r in range(world)
                      if r != rank and store.check([_FAILED_KEY.format(r)])}
            if silent is None and time.monotonic() - start > 0.5:
                # healthy peers hit the same broken collective and check in at about the same time; a rank
                # still silent then is the dead or stalled one (one that wakes up later does not count)
                silent = [r for r in range(world) if r != rank and not store.check([_ALIVE_KEY.format(r)])]
            if failed or time.monotonic() - start > min(2.0, timeout):
                break
            time.sleep(0.1)
    except Exception:  # the store lives in rank 0's process: unreachable means rank 0 is gone
        return DistributedError(f"rank {rank}: stopping: lost contact with rank 0 (it died, or stalled for more than "
                                f"ddp_timeout={timeout:g} s)")
    if failed:
        what = "; ".join(f"rank {r} failed: {m}" for r, m in sorted(failed.items()))
        return DistributedError(f"rank {rank}: stopping because {what}")
    who = ("rank " + ", ".join(map(str, silent))) if silent else "a peer"
    return DistributedError(f"rank {rank}: stopping: {who} stopped responding (died, or stalled for more than "
                            f"ddp_timeout={timeout:g} s)")


def ddp_failure(e: BaseException, rank: int, world: int, timeout: float) -> BaseException:
    """What a data-parallel process raises for ``e``: a peer's failure becomes one DistributedError
    naming that rank; this process's own error is left in the store for the peers and raised as it is.
    (An error that every rank raises alike, such as training's RunLockError, is the caller's to pass by.)"""
    if isinstance(e, DistributedError):
        return e
    if _is_peer_failure(e):
        return _peer_failure(e, rank, world, timeout)
    _record_failure(e, rank)
    return e


def _record_failure(e: BaseException, rank: int) -> None:
    """Leave this rank's error in the store for its peers (best effort: the store may be gone)."""
    try:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        dist.distributed_c10d._get_default_store().set(_FAILED_KEY.format(rank), f"{type(e).__name__}: {first}")
    except Exception:
        pass

"""What the data-parallel tests share: a free local port and a forked worker's torchrun environment."""
from __future__ import annotations

import os
import socket

import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_rank(rank: int, world: int, port: int) -> None:
    """Make this (forked) process rank `rank` of `world` as torchrun would (env://, one CPU thread)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)

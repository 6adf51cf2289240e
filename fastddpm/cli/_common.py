"""What every ``fastddpm`` sub-command shares: the command record, the one-line error, flag checks."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

__all__ = ["Command", "CLIError", "check_positive", "resolve_device", "emit_json"]


@dataclass
class Command:
    """One sub-command: ``configure(parser)`` adds its arguments, ``run(args) -> exit status``."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class CLIError(Exception):
    """An error to report as one ``fastddpm <command>: error: ...`` line (exit status 1)."""


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Raise CLIError naming the flag when one of the int options `names` (dest names) is < 1."""
    for n in names:
        v = getattr(args, n, None)
        if v is not None and v < 1:
            raise CLIError(f"--{n.replace('_', '-')} must be a positive int, got {v}")


def resolve_device(name: str) -> Any:
    """``--device`` (auto, cpu, cuda or cuda:N) as a torch.device; CLIError when it cannot be used."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"--device {name!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available")
    return dev


def emit_json(result: Dict[str, Any], path: Optional[str]) -> None:
    """Print `result` as JSON and, when `path` is given, also write it there atomically."""
    text = json.dumps(result, indent=2, sort_keys=True)
    if path:
        from ..checkpoint import atomic_write_bytes

        atomic_write_bytes(path, (text + "\n").encode())
    print(text)

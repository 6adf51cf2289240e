"""Durable file writes and file hashing: what checkpoints, logs and result files are written with.

An atomic write goes to a temporary file in the target's directory, is flushed and fsync'ed, renamed
over the target with ``os.replace``, and the directory is fsync'ed: a crash leaves the old file or the
new one, never a torn mix.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_json", "fsync_dir", "sha256_file", "write_synced"]


def fsync_dir(path: str) -> None:
    """fsync a directory so a rename inside it is durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _named(e: OSError, path: str) -> OSError:
    """`e` with `path` as its file name when it has none (a write or fsync error on an open file, such as
    ENOSPC, names no file): "[Errno 28] No space left on device: 'runs/x/checkpoints/...'"."""
    if e.filename is not None or e.errno is None:
        return e
    named = type(e)(e.errno, e.strerror, path)
    named.__cause__ = e
    return named


def write_synced(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` (not atomically) and fsync it."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise _named(e, path) from None


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, os.replace, fsync dir."""
    path = os.path.abspath(path)
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    # O_EXCL create with mode 0o666: the umask applies, as for any new file (mkstemp would force 0600)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise _named(e, path) from None
        raise
    fsync_dir(d)


def atomic_write_json(path: str, obj: Any, indent: int = 2) -> None:
    """``obj`` as sorted-key JSON (and a final newline) written to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=indent, sort_keys=True) + "\n").encode())


def sha256_file(path: str) -> str:
    """The hex SHA-256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()

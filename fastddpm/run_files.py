"""The files a training run owns in its run directory, written so that nothing a user made is lost.

* :func:`open_owned` opens the lock file or the log for writing without following a symbolic link
  (``O_NOFOLLOW``) and refuses a file with other hard links: ``ln -s victim RUN/train.lock`` must not
  truncate the victim.
* :func:`write_owned_json` writes ``config.json`` atomically (temporary file, rename), refusing a link.
* :func:`check_fresh_run_dir` refuses a run directory that already holds a run (config.json, a log,
  checkpoints) unless the user resumes it or asks to overwrite it; :func:`clear_run` is that overwrite.
* :func:`set_aside_log_lines` keeps the log lines a resumed run no longer continues (an older checkpoint,
  or a run that died before its first one) in ``log.superseded.jsonl`` instead of dropping them.
* :func:`set_aside_newer_checkpoints` moves the checkpoints newer than the one a run resumes from (the
  abandoned branch) to ``superseded/``, so that a later plain resume cannot pick them.
* :class:`InterruptFlag` turns the first Ctrl-C / SIGTERM into a flag the training loop checks between
  steps (it then saves a checkpoint and stops); a second one interrupts at once.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import signal
import stat
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["RunDirError", "check_links", "open_owned", "write_owned_json", "check_fresh_run_dir", "clear_run", "run_files",
           "set_aside_log_lines", "set_aside_newer_checkpoints", "InterruptFlag", "TrainInterrupted",
           "SUPERSEDED_LOG", "SUPERSEDED_DIR"]

SUPERSEDED_LOG = "log.superseded.jsonl"
SUPERSEDED_DIR = "superseded"
RUN_FILES = ("config.json", "log.jsonl")


class RunDirError(ValueError):
    """The run directory holds something the run must not overwrite (one line naming it)."""


class TrainInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C / SIGTERM; the message says at which step and where the checkpoint is."""


def _refuse_link(path: str, what: str) -> None:
    if os.path.islink(path):
        raise RunDirError(f"{path} is a symbolic link (to {os.readlink(path)}): the run writes its {what} only to a "
                          "file it creates, never through a link; remove the link or choose another --out-dir")


def check_links(run_dir: str) -> None:
    """RunDirError when the run's config.json or logs in `run_dir` are symbolic links (checked before any
    work, so that a run does not train and then refuse to write)."""
    for name, what in (("config.json", "config"), ("log.jsonl", "log"), (SUPERSEDED_LOG, "superseded log")):
        _refuse_link(os.path.join(run_dir, name), what)


def open_owned(path: str, what: str, append: bool = False) -> Any:
    """`path` opened for reading and writing (appending with `append`), created when missing, without
    following a symbolic link and only when it is a regular file with no other hard link."""
    _refuse_link(path, what)
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    if append:
        flags |= os.O_APPEND
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:  # made a link between the check and the open
            _refuse_link(path, what)
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        kind = "has other hard links" if stat.S_ISREG(st.st_mode) else "is not a regular file"
        raise RunDirError(f"{path} {kind}: the run writes its {what} only to a file of its own; remove it or "
                          "choose another --out-dir")
    return os.fdopen(fd, "a+" if append else "r+", encoding="utf-8")


def write_owned_json(path: str, obj: Any, what: str = "config") -> None:
    """`obj` as JSON written atomically to `path` (a symbolic link there is refused, not replaced)."""
    from .fileio import atomic_write_json

    _refuse_link(path, what)
    atomic_write_json(path, obj)


def run_files(run_dir: str) -> List[str]:
    """What of a previous run `run_dir` holds: config.json, log.jsonl (non-empty), checkpoints."""
    from . import checkpoint as ckpt

    found = [n for n in RUN_FILES if os.path.lexists(os.path.join(run_dir, n))
             and (n != "log.jsonl" or os.path.islink(os.path.join(run_dir, n))
                  or os.path.getsize(os.path.join(run_dir, n)) > 0)]
    if ckpt.list_checkpoints(run_dir):
        found.append(f"{ckpt.CKPT_SUBDIR}/")
    return found


def check_fresh_run_dir(run_dir: str) -> None:
    """RunDirError naming what `run_dir` holds when it already holds a run (for a run that neither
    resumes nor overwrites)."""
    found = run_files(run_dir)
    if found:
        raise RunDirError(f"out_dir {run_dir} already holds a run ({', '.join(found)}); pass resume=True (--resume) "
                          "to continue it, overwrite=True (--overwrite) to replace it, or choose another out_dir")


def clear_run(run_dir: str) -> List[str]:
    """Remove a previous run's config.json, log.jsonl, checkpoints/ and samples/ (``--overwrite``);
    returns what was removed."""
    from . import checkpoint as ckpt

    removed = []
    for name in (*RUN_FILES, SUPERSEDED_LOG):
        p = os.path.join(run_dir, name)
        if os.path.lexists(p):
            os.unlink(p)  # a link itself, never its target
            removed.append(name)
    for name in (ckpt.CKPT_SUBDIR, "samples"):
        p = os.path.join(run_dir, name)
        if os.path.islink(p):
            os.unlink(p)
            removed.append(name)
        elif os.path.isdir(p):
            shutil.rmtree(p)
            removed.append(name + "/")
    return removed


def _log_step(line: str) -> Optional[int]:
    try:
        rec = json.loads(line)
        return int(rec.get("step", 0)) if isinstance(rec, dict) else None
    except (ValueError, TypeError, OverflowError):
        return None


def set_aside_log_lines(log_path: str, step: int) -> int:
    """Keep in ``log.jsonl`` only the lines of steps <= `step`; the others (written past the checkpoint a
    run resumes from) are appended to ``log.superseded.jsonl`` beside it. Returns how many were moved."""
    if not os.path.lexists(log_path):
        return 0
    _refuse_link(log_path, "log")
    keep, moved = [], []
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            s = _log_step(line)
            if s is None and not line.endswith("\n"):
                continue  # a torn last line
            (keep if s is not None and s <= step else moved).append(line if line.endswith("\n") else line + "\n")
    if not moved:
        return 0
    aside = os.path.join(os.path.dirname(log_path), SUPERSEDED_LOG)
    with open_owned(aside, "superseded log", append=True) as f:
        f.write("".join(moved))
        f.flush()
        os.fsync(f.fileno())
    from .fileio import atomic_write_bytes

    atomic_write_bytes(log_path, "".join(keep).encode())
    return len(moved)


def set_aside_newer_checkpoints(run_dir: str, step: int) -> Tuple[List[str], Optional[str]]:
    """Move the checkpoints of `run_dir` newer than `step` to ``superseded/<time>/``; returns (their
    names, the folder) — ([], None) when there are none."""
    from . import checkpoint as ckpt

    newer = [p for s, p in ckpt.list_checkpoints(run_dir) if s > step]
    if not newer:
        return [], None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = os.path.join(run_dir, SUPERSEDED_DIR, f"after_step_{step:08d}_{stamp}")
    os.makedirs(dest, exist_ok=True)
    for p in newer:
        os.replace(p, os.path.join(dest, os.path.basename(p)))
    return [os.path.basename(p) for p in newer], dest


class InterruptFlag:
    """Within ``with InterruptFlag() as flag``, the first SIGINT / SIGTERM sets ``flag.signal`` (its name)
    instead of stopping the program, and restores the previous handlers, so that a second one acts at
    once (Ctrl-C raises KeyboardInterrupt). Outside the main thread it does nothing."""

    def __init__(self, on_first: Optional[Callable[[str], None]] = None):
        self.signal: Optional[str] = None
        self._old: Dict[int, Any] = {}
        self._on_first = on_first

    def _handler(self, signum: int, frame: Any) -> None:
        self.signal = signal.Signals(signum).name
        self._restore()
        if self._on_first is not None:
            self._on_first(self.signal)

    def _restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def __enter__(self) -> "InterruptFlag":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

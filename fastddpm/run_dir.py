"""A training run's directory: who owns it (the run lock), what it continues (resume), and what changed.

``out_dir`` holds ``checkpoints/step_*/`` (:mod:`fastddpm.checkpoint`), ``config.json``, ``log.jsonl``,
``samples/`` and ``train.lock``. This module holds what a trainer needs to own and continue such a
directory, whatever its objective:

* the run lock (:func:`lock_run`, :class:`RunLock`): one live training process per directory;
* choosing and loading the checkpoint to resume (:func:`resume_checkpoint`, :func:`load_for_resume`,
  with the fall-back to the newest older checkpoint that loads), and refusing one whose model or
  diffusion differs from the run's (:func:`check_resumable`);
* comparing saved and new settings (:func:`config_changes`, :func:`format_changes`,
  :func:`saved_run_config`, :func:`resume_message`);
* what a run writes there without losing the user's files (the lock file and log opened without
  following links, the log lines and checkpoints a resume supersedes set aside): :mod:`fastddpm.run_files`.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch.distributed as dist

from . import checkpoint as ckpt
from .build import build_model
from .jsonio import load_file as load_json
from .run_files import RunDirError, open_owned

__all__ = ["RunLockError", "RunLock", "lock_run", "LOCK_FILE", "CHECKPOINT_FIELDS", "config_changes",
           "format_changes", "show_value", "run_dir_of", "saved_run_config", "resume_checkpoint", "load_for_resume",
           "check_resumable", "resume_message"]


class RunLockError(RuntimeError):
    """Another live training process owns the run directory (its ``train.lock``)."""


# ------------------------------------------------------------------------------------------ the run lock
LOCK_FILE = "train.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class RunLock:
    """One training process per run directory: ``train.lock`` holds the owner's pid and host.

    The lock is an flock on that file (released by the kernel when the owner dies, even by kill -9);
    a file left with a dead owner's record is a stale lock, taken over with a message. Where flock is
    unavailable, the pid/host record decides (a live pid on this host, or any other host, refuses).
    """

    def __init__(self, run_dir: str):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.fh = open_owned(self.path, "lock file")  # never through a link: `ln -s victim train.lock`
        try:
            self._acquire()
        except BaseException:
            self.fh.close()
            raise

    def _owner(self) -> Dict[str, Any]:
        self.fh.seek(0)
        try:
            rec = json.loads(self.fh.read() or "{}")
        except ValueError:
            return {}
        return rec if isinstance(rec, dict) else {}

    def _acquire(self) -> None:
        host = socket.gethostname()
        try:
            import fcntl

            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except (BlockingIOError, PermissionError):
            raise self._busy(self._owner()) from None
        except (ImportError, OSError):  # no flock here (Windows, some network file systems)
            locked = False
        owner = self._owner()
        if owner.get("pid") is not None:
            same_host = owner.get("host") == host
            if not locked and (not same_host or _pid_alive(int(owner["pid"]))) and owner.get("pid") != os.getpid():
                raise self._busy(owner)
            print(f"fastddpm train: taking over the stale lock {self.path} of pid {owner.get('pid')} on "
                  f"{owner.get('host')} (that process is gone)", file=sys.stderr)
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(json.dumps({"pid": os.getpid(), "host": host,
                                  "started": datetime.datetime.now().isoformat(timespec="seconds")}) + "\n")
        self.fh.flush()

    def _busy(self, owner: Dict[str, Any]) -> RunLockError:
        return RunLockError(
            f"{os.path.dirname(self.path)} is in use by another training process (pid {owner.get('pid', '?')} on "
            f"{owner.get('host', '?')}, since {owner.get('started', '?')}; lock file {self.path}): wait for it to "
            "end or choose another --out-dir")

    def release(self) -> None:
        # empty the record but keep the file: unlinking would let a waiting opener lock a dead inode
        try:
            self.fh.seek(0)
            self.fh.truncate()
            self.fh.flush()
        finally:
            self.fh.close()


def lock_run(run_dir: str, rank: int, distributed: bool) -> Optional[RunLock]:
    """Rank 0 takes the run lock; under DDP every rank learns the outcome (and raises the same error)."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = RunLock(run_dir)
        except (RunLockError, RunDirError) as e:  # busy, or a lock file that is a link
            error = str(e)
    if distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise RunLockError(error)
    return lock


# ------------------------------------------------------------------------------------------ resuming
# settings the weights depend on: a resumed run may not change them (the train() check of the built model
# and diffusion configs is the final word; this list refuses the obvious cases before any work)
CHECKPOINT_FIELDS = ("image_size", "channels", "class_cond", "base_channels", "channel_mults", "num_res_blocks",
                     "attention_resolutions", "num_heads", "head_channels", "time_embedding", "groups",
                     "learn_sigma", "schedule", "num_timesteps", "prediction", "variance", "loss")
# run-control settings that are not part of what a run "is" (never reported as changes)
_NOT_SETTINGS = ("resume", "resume_fallback", "overwrite")


def _same(name: str, old: Any, new: Any) -> bool:
    if name == "out_dir" and isinstance(old, str) and isinstance(new, str):
        return os.path.abspath(old) == os.path.abspath(new)
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return list(old) == list(new)
    return old == new


def config_changes(old: Dict[str, Any], new: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """(name, old, new) for every setting whose value differs between two TrainConfig dicts."""
    out = []
    for name, value in new.items():
        if name in _NOT_SETTINGS or name not in old:
            continue
        if not _same(name, old[name], value):
            out.append((name, old[name], value))
    return out


def show_value(v: Any) -> str:
    """A setting's value as a flag would take it (lists comma-separated)."""
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def format_changes(changes: Sequence[Tuple[str, Any, Any]]) -> str:
    """``name: old -> new`` for each change, comma-separated."""
    return ", ".join(f"{n}: {show_value(a)} -> {show_value(b)}" for n, a, b in changes)


def run_dir_of(checkpoint_path: str) -> Optional[str]:
    """RUN for RUN/checkpoints/step_N, else None."""
    parent = os.path.dirname(os.path.abspath(checkpoint_path))
    if ckpt._STEP_RE.match(os.path.basename(os.path.abspath(checkpoint_path))) and \
            os.path.basename(parent) == ckpt.CKPT_SUBDIR:
        return os.path.dirname(parent)
    return None


def refuse_distilled(config: Any, where: str) -> None:
    """ValueError when ``config`` (a checkpoint's or a run's config.json) is a distillation run's: `fastddpm
    train --resume` does not continue one."""
    from .student import is_distilled

    if is_distilled(config):
        raise ValueError(f"--resume: {where} is a distillation run: continue it with `fastddpm distill --resume`, "
                         "or choose another --out-dir")


def saved_run_config(resume: Union[bool, str], out_dir: str) -> Optional[Tuple[Dict[str, Any], str]]:
    """The saved TrainConfig dict ("train" entry) of the checkpoint ``resume`` would continue, and its path.

    None when there is nothing to resume (``resume`` false, or no checkpoint in ``out_dir``). Only the
    config is read (no weights). If the checkpoint's own config.json does not load, the run directory's
    config.json (written when the run started) is used.
    """
    if not resume:
        return None
    path = ckpt.resolve_checkpoint(resume) if isinstance(resume, str) else ckpt.latest_checkpoint(out_dir)
    if path is None:
        return None
    try:
        config = ckpt.load_checkpoint(path, load_state=False, load_model=False, load_ema=False).config
        refuse_distilled(config, path)
        saved = config.get("train")
    except ckpt.CheckpointError:
        saved = None
        run = run_dir_of(path) or (out_dir if not isinstance(resume, str) else None)
        run_cfg = os.path.join(run, "config.json") if run else None
        if run_cfg and os.path.isfile(run_cfg):
            try:
                loaded = load_json(run_cfg)
                saved = loaded.get("train") if isinstance(loaded, dict) else None
            except ValueError:
                saved = None
    if not isinstance(saved, dict):
        return None
    return saved, path


def resume_message(path: str, step: int, saved: Dict[str, Any], cfg: Any, saved_world: int, world: int,
                   command: str = "train") -> str:
    """What :func:`fastddpm.train.train` prints when it resumes checkpoint ``path`` at ``step``: every
    setting of the TrainConfig ``cfg`` that differs from the ``saved`` one, a changed world size, and a
    run that has nothing left to train."""
    lines = [f"fastddpm {command}: resuming from step {step} ({path})"]
    for name, old, new in config_changes(saved, cfg.to_dict()):
        lines.append(f"  {name}: {show_value(old)} -> {show_value(new)}")
    if saved_world != world:
        lines.append(f"  world size: {saved_world} -> {world} processes: the global batch stays batch_size="
                     f"{cfg.batch_size} images per step ({cfg.batch_size // max(saved_world, 1)} -> "
                     f"{cfg.batch_size // world} per process); the data order and noise from here on differ "
                     "from the uninterrupted run")
    if step >= cfg.steps:
        lines.append(f"  the run already reached step {step} >= steps={cfg.steps}: nothing to train (pass a "
                     "larger --steps to continue)")
    return "\n".join(lines)


def resume_checkpoint(resume: Union[bool, str], run_dir: str, announce: bool, command: str = "train") -> Optional[str]:
    """The checkpoint a run in ``run_dir`` continues: ``resume`` names it (a path), or is True (the run
    directory's newest checkpoint; None, said on stderr when ``announce``, when there is none) or False
    (None; ValueError when ``run_dir`` already holds checkpoints, which a fresh run would mix with its own)."""
    existing = ckpt.latest_checkpoint(run_dir)
    if isinstance(resume, str):
        return ckpt.resolve_checkpoint(resume)
    if resume:
        if existing is None and announce:
            print(f"fastddpm {command}: no checkpoint in {run_dir}; starting from scratch", file=sys.stderr)
        return existing
    if existing is not None:
        raise ValueError(f"out_dir {run_dir} already holds checkpoints ({existing}); pass resume=True (--resume) "
                         "to continue that run, overwrite=True (--overwrite) to replace it, or choose another out_dir")
    return None


def check_resumable(ck: ckpt.Checkpoint, config: Dict[str, Any]) -> None:
    """ValueError naming the differences when checkpoint ``ck``'s model or diffusion config is not the one of
    the run's ``config`` (its "model": the built model's complete keyword arguments, and "diffusion").
    Dropout changes no weight: a resumed run may change it (fine-tuning). A distilled student set and a
    diffusion model never continue each other."""
    from .student import is_distilled

    if is_distilled(ck.config) != is_distilled(config):
        kind = "a distillation run (continue it with `fastddpm distill --resume`)" if is_distilled(ck.config) else \
            "a training run (continue it with `fastddpm train --resume`)"
        raise ValueError(f"{ck.path}: the checkpoint is {kind}; choose another --out-dir")
    try:
        ck_model = json.loads(json.dumps(getattr(build_model(ck.config), "config", ck.config["model"])))
    except ckpt.CheckpointError:
        ck_model = ck.config.get("model")
    same_arch = {k: v for k, v in config["model"].items() if k != "dropout"}
    ck_arch = {k: v for k, v in ck_model.items() if k != "dropout"} if isinstance(ck_model, dict) else {}
    differ = config_changes(ck_arch, same_arch) + config_changes(ck.config.get("diffusion") or {}, config["diffusion"])
    if ck_arch != same_arch or ck.config.get("diffusion") != config["diffusion"]:  # differ: the message
        raise ValueError(f"{ck.path}: the checkpoint's model/diffusion config differs from this run's "
                         f"({format_changes(differ) or 'entries differ'}); these must match to resume. Drop "
                         "the flags that change them, or start a new run in another --out-dir")


def load_for_resume(path: str, run_dir: str, fallback: bool, explicit_path: bool) -> ckpt.Checkpoint:
    """Load checkpoint ``path`` with its training state, checked. When it does not load, name the newest
    older checkpoint of the run that does, and resume from that one only with ``fallback``."""
    try:
        return _load_checked(path)
    except ckpt.CheckpointError as e:
        error = e
    older = [p for st, p in reversed(ckpt.list_checkpoints(run_dir))
             if os.path.abspath(p) != os.path.abspath(path) and st < _step_of(path)]
    for p in older:
        try:
            ck = _load_checked(p)
        except ckpt.CheckpointError:
            continue
        if fallback and not explicit_path:
            print(f"fastddpm train: warning: {error}\n  falling back to the newest checkpoint that loads: {p}",
                  file=sys.stderr)
            return ck
        raise ckpt.CheckpointError(f"{error}\n  the newest older checkpoint that loads is {p} (step {ck.step}): "
                                   f"resume from it with --resume {p}, or add --resume-fallback "
                                   "(resume_fallback=True) to fall back to it") from error
    raise ckpt.CheckpointError(f"{error}\n  no older checkpoint of {run_dir} loads either") from error


def _step_of(path: str) -> int:
    m = ckpt._STEP_RE.match(os.path.basename(os.path.abspath(path)))
    return int(m.group(1)) if m else 1 << 62


def _load_checked(path: str) -> ckpt.Checkpoint:
    ck = ckpt.load_checkpoint(path, load_state=True)
    ckpt.check_train_state(ck.state, os.path.join(ck.path, "state.pt"), ck.step)
    return ck

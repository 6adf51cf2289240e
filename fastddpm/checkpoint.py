"""Checkpoints: atomic on-disk layout, keep-last-K, and loading with clear errors.

A training run directory holds ``checkpoints/step_<NNNNNNNN>/``, each with

    model.safetensors   the raw weights (the run's config JSON is also in the safetensors metadata)
    ema.safetensors     the EMA weights (same keys), when the run keeps an EMA
    state.pt            optimizer state, step, RNG states, counters (torch.save, loaded weights_only)
    config.json         the run's config: {"model": UNet kwargs, "diffusion": {...}, "train": {...}, ...}
    checksums.sha256    the SHA-256 of each file above (``sha256sum -c checksums.sha256`` checks them);
                        loading verifies them, so flipped bytes inside tensor data are an error naming the
                        file (an edited config.json only warns: it is text people edit, the config checks
                        judge it)

Atomicity: the whole step directory is first written as a hidden temporary directory next to its
final place (every file written, flushed and fsync'ed), the temporary directory is fsync'ed, renamed
to its final name with ``os.replace`` and the parent directory fsync'ed. A crash at any point
leaves either the complete new checkpoint or none of it; earlier checkpoints are never touched
until the new one is in place (only then are checkpoints beyond the last K removed).

A single ``.safetensors`` file whose metadata holds the config (key ``fastddpm_config``), or that has
a ``<name>.json`` / ``config.json`` beside it, is a checkpoint too (weights only): that is how the
bundled model ships (``fastddpm/assets/digits.safetensors``).

This module writes, finds, loads and verifies checkpoints; :mod:`fastddpm.build` builds the model and
the diffusion a checkpoint's config describes (``load_model``), and :mod:`fastddpm.fileio` holds the
atomic writes and the file hash used here.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .fileio import atomic_write_bytes, fsync_dir, sha256_file, write_synced

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "save_checkpoint",
    "save_weights_file",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_checkpoint",
    "load_checkpoint",
    "verify_checkpoint",
    "check_state_dict",
    "check_train_state",
    "CHECKSUMS_FILE",
    "BUNDLED_MODEL",
    "BUNDLED",
]

FORMAT = "fastddpm-checkpoint"
FORMAT_VERSION = 1
META_KEY = "fastddpm_config"
CKPT_SUBDIR = "checkpoints"
CHECKSUMS_FILE = "checksums.sha256"
_STEP_RE = re.compile(r"^step_(\d+)$")
BUNDLED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "digits.safetensors")
# names of the bundled checkpoints (used when no file or folder of that name exists): the digits model and its
# distilled 1-4-call students (`fastddpm distill`, docs/distillation.md)
BUNDLED = {"digits": BUNDLED_MODEL,
           "digits-distilled": os.path.join(os.path.dirname(BUNDLED_MODEL), "digits-distilled.safetensors")}


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated/corrupt, or does not match the model it is loaded into."""


def _safetensors_bytes(state: Dict[str, torch.Tensor], config: Optional[Dict[str, Any]]) -> bytes:
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    meta = {"format": "pt"}
    if config is not None:
        meta[META_KEY] = json.dumps(config, sort_keys=True)
    return save(tensors, metadata=meta)


def _torch_bytes(obj: Any) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_weights_file(path: str, state: Dict[str, torch.Tensor], config: Dict[str, Any]) -> str:
    """Atomically write one self-contained weights file (safetensors with the config in its metadata)."""
    atomic_write_bytes(path, _safetensors_bytes(state, config))
    return path


def _step_dirname(step: int) -> str:
    return f"step_{int(step):08d}"


def list_checkpoints(run_dir: str) -> List[Tuple[int, str]]:
    """Complete checkpoints of a run, as (step, path), ascending by step.

    ``run_dir`` is a run directory (holding ``checkpoints/``) or the ``checkpoints/`` folder itself.
    Hidden temporary directories of interrupted writes are ignored.
    """
    base = os.path.join(run_dir, CKPT_SUBDIR)
    if not os.path.isdir(base):
        base = run_dir
    if not os.path.isdir(base):
        return []
    out = []
    for name in os.listdir(base):
        m = _STEP_RE.match(name)
        p = os.path.join(base, name)
        if m and os.path.isdir(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The newest complete checkpoint directory of a run, or None."""
    cks = list_checkpoints(run_dir)
    return cks[-1][1] if cks else None


def save_checkpoint(
    run_dir: str,
    step: int,
    config: Dict[str, Any],
    model_state: Dict[str, torch.Tensor],
    ema_state: Optional[Dict[str, torch.Tensor]] = None,
    train_state: Optional[Dict[str, Any]] = None,
    keep: Optional[int] = None,
    _write: Callable[[str, bytes], None] = write_synced,
) -> str:
    """Atomically write checkpoint ``step`` under ``run_dir/checkpoints/`` and keep only the last ``keep``.

    Args:
        run_dir: the run directory.
        step: the optimizer step count the state corresponds to.
        config: JSON-serialisable run config (needs "model" and "diffusion" entries to be loadable).
        model_state, ema_state: state dicts of tensors (written as safetensors).
        train_state: anything torch.save can write and ``torch.load(weights_only=True)`` can read
            (optimizer state, RNG states as uint8 tensors, ints, floats, lists, dicts).
        keep: keep the newest ``keep`` checkpoints (None or 0: keep all).

    Returns the final checkpoint directory.
    """
    if keep is not None and (not isinstance(keep, int) or keep < 0):
        raise ValueError(f"keep must be a non-negative int or None, got {keep!r}")
    base = os.path.join(os.path.abspath(run_dir), CKPT_SUBDIR)
    os.makedirs(base, exist_ok=True)
    final = os.path.join(base, _step_dirname(step))
    tmp = os.path.join(base, f".{_step_dirname(step)}.tmp-{uuid.uuid4().hex[:8]}")
    config = dict(config)
    config.setdefault("format", FORMAT)
    config.setdefault("format_version", FORMAT_VERSION)
    config["step"] = int(step)
    try:
        os.makedirs(tmp)
        files = {"config.json": (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
                 "model.safetensors": _safetensors_bytes(model_state, config)}
        if ema_state is not None:
            files["ema.safetensors"] = _safetensors_bytes(ema_state, config)
        if train_state is not None:
            files["state.pt"] = _torch_bytes(train_state)
        for name, data in files.items():
            _write(os.path.join(tmp, name), data)
        # sha256sum's format: "<hex>  <name>"
        sums = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in files.items())
        _write(os.path.join(tmp, CHECKSUMS_FILE), sums.encode())
        fsync_dir(tmp)
        old = None
        if os.path.exists(final):  # re-saving a step: move the old one aside first
            old = os.path.join(base, f".{_step_dirname(step)}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(base)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # leftovers of crashed writes (hidden temp dirs), then rotation
    for name in os.listdir(base):
        if name.startswith(".step_") and (".tmp-" in name or ".old-" in name):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    if keep:
        for _, p in list_checkpoints(base)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------ loading
@dataclass
class Checkpoint:
    """A loaded checkpoint: config, state dicts (CPU tensors), and training state (or None)."""

    path: str
    config: Dict[str, Any]
    model: Optional[Dict[str, torch.Tensor]] = None
    ema: Optional[Dict[str, torch.Tensor]] = None
    state: Optional[Dict[str, Any]] = None
    step: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)

    def weights(self, use_ema: bool = True) -> Dict[str, torch.Tensor]:
        """The EMA weights when present and asked for, else the raw weights."""
        if use_ema and self.ema is not None:
            return self.ema
        if self.model is None:
            raise CheckpointError(f"{self.path}: holds no model weights")
        return self.model


def resolve_checkpoint(path: Optional[str]) -> str:
    """Turn a user path into a checkpoint path: a run dir -> its newest checkpoint; None -> bundled model."""
    if path is None:
        if not os.path.isfile(BUNDLED_MODEL):
            raise CheckpointError(
                f"the bundled model {BUNDLED_MODEL} is missing from this installation; pass --checkpoint"
            )
        return BUNDLED_MODEL
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path) and path in BUNDLED and os.path.isfile(BUNDLED[path]):
        return BUNDLED[path]
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: checkpoint not found (no such file or directory)")
    if os.path.isdir(path):
        latest = latest_checkpoint(path)
        if latest is None and (os.path.exists(os.path.join(path, "model.safetensors"))
                               or os.path.exists(os.path.join(path, "ema.safetensors"))):
            return path  # a checkpoint directory itself
        if latest is None:
            raise CheckpointError(
                f"{path}: not a checkpoint (no config.json / model.safetensors) and no checkpoints/step_* inside"
            )
        return latest
    return path


def _read_checksums(ckpt_dir: str) -> Dict[str, str]:
    """{file name: sha256 hex} from a checkpoint's checksums.sha256 ({} for checkpoints written without one)."""
    p = os.path.join(ckpt_dir, CHECKSUMS_FILE)
    if not os.path.isfile(p):
        return {}
    out = {}
    with open(p, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.strip().split(None, 1)
            if len(parts) != 2 or not re.fullmatch(r"[0-9a-f]{64}", parts[0]):
                raise CheckpointError(f"{p}: malformed line {line.strip()!r} (expected '<sha256>  <file>')")
            out[parts[1].lstrip("*")] = parts[0]
    return out


_CHECKED_FILES = ("config.json", "model.safetensors", "ema.safetensors", "state.pt")


def _required_checksums(ckpt_dir: str) -> Dict[str, str]:
    """A checkpoint directory's checksums, which must cover every file of it that is there: a deleted
    or partial checksums.sha256 would otherwise turn verification off (CheckpointError naming it)."""
    sums = _read_checksums(ckpt_dir)
    p = os.path.join(ckpt_dir, CHECKSUMS_FILE)
    present = [n for n in _CHECKED_FILES if os.path.exists(os.path.join(ckpt_dir, n))]
    unlisted = [n for n in present if n not in sums]
    if unlisted:
        what = "is missing" if not os.path.isfile(p) else f"does not list {', '.join(unlisted)}"
        raise CheckpointError(
            f"{p} {what}: nothing would verify the checkpoint's files, so it is refused. Restore the file; or, "
            f"if you trust these files, recreate it: (cd {ckpt_dir} && sha256sum {' '.join(present)} > "
            f"{CHECKSUMS_FILE})")
    return sums


def _verify_file(path: str, sums: Dict[str, str]) -> None:
    """Raise CheckpointError naming ``path`` when its SHA-256 differs from the one recorded at save time."""
    want = sums.get(os.path.basename(path))
    if want is None or not os.path.isfile(path):
        return
    found = sha256_file(path)
    if found != want:
        raise CheckpointError(
            f"{path}: SHA-256 mismatch: the file changed after it was written (disk corruption, a partial copy or "
            f"an edit); recorded {want[:16]}..., found {found[:16]}... ({CHECKSUMS_FILE} beside it)"
        )


def verify_checkpoint(path: str) -> None:
    """Check every file of checkpoint directory ``path`` against its checksums.sha256 (CheckpointError if not)."""
    sums = _read_checksums(path)
    for name in sums:
        _verify_file(os.path.join(path, name), sums)


def _read_safetensors(path: str, sums: Optional[Dict[str, str]] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing checkpoint file")
    size = os.path.getsize(path)
    try:
        out = {}
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                out[k] = f.get_tensor(k)
    except Exception as e:
        raise CheckpointError(
            f"{path}: truncated or corrupt safetensors file ({size} bytes): {type(e).__name__}: {e}"
        ) from e
    _verify_file(path, sums or {})  # after parsing, so a truncated file keeps its plainer message
    return out, meta


def _parse_config(text: str, where: str) -> Dict[str, Any]:
    from .jsonio import loads

    try:
        cfg = loads(text, where, "config JSON")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(cfg, dict) or "model" not in cfg or "diffusion" not in cfg:
        raise CheckpointError(f"{where}: the config must be a JSON object with 'model' and 'diffusion' entries")
    return cfg


def _config_step(cfg: Dict[str, Any], where: str) -> int:
    step = cfg.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{where}: 'step' must be a non-negative int, got {step!r}")
    return step


def check_train_state(state: Any, where: str, step: int) -> None:
    """Check a loaded state.pt before anything uses it; CheckpointError naming the entry otherwise.

    ``step`` is the checkpoint's own step (its config and directory name): state.pt must agree with it,
    and every step is either an update or a skipped one (``updates + skipped == step``).
    """
    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{where}: {msg} (a damaged or hand-edited training state; resume from another "
                               "checkpoint)")

    if not isinstance(state, dict):
        raise bad(f"expected a dict, got {type(state).__name__}")
    for key in ("optimizer", "step", "skipped", "updates", "rng"):
        if key not in state:
            raise bad(f"missing entry {key!r}")
    for key in ("step", "skipped", "updates"):
        v = state[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise bad(f"{key!r} must be a non-negative int, got {v!r}")
    if state["step"] != step:
        raise bad(f"'step' is {state['step']} but the checkpoint is of step {step}")
    if state["skipped"] + state["updates"] != state["step"]:
        raise bad(f"'updates' ({state['updates']}) + 'skipped' ({state['skipped']}) must equal 'step' ({step})")
    opt = state["optimizer"]
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        raise bad("'optimizer' must be an optimizer state dict (with 'state' and 'param_groups')")
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
    ref = torch.get_rng_state()
    for r in rngs:
        cpu = r.get("cpu") if isinstance(r, dict) else None
        if not torch.is_tensor(cpu) or cpu.dtype != torch.uint8 or cpu.shape != ref.shape:
            raise bad(f"'rng' must hold a 'cpu' uint8 tensor of shape {tuple(ref.shape)} per process")
    if state.get("world_size", len(rngs)) != len(rngs):
        raise bad(f"'world_size' {state.get('world_size')!r} does not match the {len(rngs)} RNG states")


def load_checkpoint(path: Optional[str], load_state: bool = True, load_model: bool = True,
                    load_ema: bool = True) -> Checkpoint:
    """Load a checkpoint directory, a run directory (newest checkpoint), or one .safetensors file.

    ``path=None`` loads the bundled digits model. Raises :class:`CheckpointError` (a ValueError)
    naming the file for a missing, truncated or corrupt part.
    """
    path = resolve_checkpoint(path)
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise CheckpointError(f"{path}: not a checkpoint (expected a checkpoint directory or a .safetensors file)")
        weights, meta = _read_safetensors(path)
        if META_KEY in meta:
            cfg = _parse_config(meta[META_KEY], f"{path} (metadata)")
        else:
            cands = [os.path.splitext(path)[0] + ".json", os.path.join(os.path.dirname(path), "config.json")]
            for c in cands:
                if os.path.isfile(c):
                    with open(c, encoding="utf-8") as f:
                        cfg = _parse_config(f.read(), c)
                    break
            else:
                raise CheckpointError(f"{path}: no config in the file's metadata and no {cands[0]} or {cands[1]}")
        return Checkpoint(path=path, config=cfg, model=weights, step=_config_step(cfg, path))

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{cfg_path}: missing checkpoint file")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = _parse_config(f.read(), cfg_path)
    sums = _required_checksums(path)
    try:
        _verify_file(cfg_path, sums)
    except CheckpointError:  # config.json is text people edit: say so, and let the config checks judge it
        warnings.warn(f"{cfg_path} was edited after it was written (its SHA-256 differs from {CHECKSUMS_FILE}); "
                      "using it as it is", stacklevel=2)
    ck = Checkpoint(path=path, config=cfg, step=_config_step(cfg, cfg_path))
    model_p, ema_p, state_p = (os.path.join(path, n) for n in ("model.safetensors", "ema.safetensors", "state.pt"))
    if load_model:
        ck.model, _ = _read_safetensors(model_p, sums)
    if load_ema and os.path.exists(ema_p):
        ck.ema, _ = _read_safetensors(ema_p, sums)
    elif load_ema and not load_model and not os.path.exists(ema_p):
        ck.model, _ = _read_safetensors(model_p, sums)  # no EMA: fall back to the raw weights
    if load_state:
        if not os.path.isfile(state_p):
            raise CheckpointError(f"{state_p}: missing checkpoint file (needed to resume training)")
        try:
            ck.state = torch.load(state_p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"{state_p}: truncated or corrupt training state ({os.path.getsize(state_p)} bytes): "
                f"{type(e).__name__}: {e}"
            ) from e
        _verify_file(state_p, sums)
    return ck


def check_state_dict(model: torch.nn.Module, state: Dict[str, torch.Tensor], where: str) -> None:
    """Raise CheckpointError listing missing / unexpected / mis-shaped keys between a model and weights."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label} ({len(items)}): {', '.join(items[:5])}{more}")
        raise CheckpointError(
            f"{where}: the weights do not match the model architecture of the config; " + "; ".join(parts)
        )

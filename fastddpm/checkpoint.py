"""Checkpoints: atomic on-disk layout, keep-last-K, and loading with clear errors.

A training run directory holds ``checkpoints/step_<NNNNNNNN>/``, each with

    model.safetensors   the raw weights (the run's config JSON is also in the safetensors metadata)
    ema.safetensors     the EMA weights (same keys), when the run keeps an EMA
    state.pt            optimizer state, step, RNG states, counters (torch.save, loaded weights_only)
    config.json         the run's config: {"model": UNet kwargs, "diffusion": {...}, "train": {...}, ...}

Atomicity: the whole step directory is first written as a hidden temporary directory next to its
final place (every file written, flushed and fsync'ed), the temporary directory is fsync'ed, renamed
to its final name with ``os.replace`` and the parent directory fsync'ed. A crash at any point
leaves either the complete new checkpoint or none of it; earlier checkpoints are never touched
until the new one is in place (only then are checkpoints beyond the last K removed).

A single ``.safetensors`` file whose metadata holds the config (key ``fastddpm_config``), or that has
a ``<name>.json`` / ``config.json`` beside it, is a checkpoint too (weights only): that is how the
bundled model ships (``fastddpm/assets/digits.safetensors``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "atomic_write_bytes",
    "save_checkpoint",
    "save_weights_file",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_checkpoint",
    "load_checkpoint",
    "build_model",
    "build_diffusion",
    "check_state_dict",
    "load_model",
    "export_model",
    "BUNDLED_MODEL",
]

FORMAT = "fastddpm-checkpoint"
FORMAT_VERSION = 1
META_KEY = "fastddpm_config"
CKPT_SUBDIR = "checkpoints"
_STEP_RE = re.compile(r"^step_(\d+)$")
BUNDLED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "digits.safetensors")


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated/corrupt, or does not match the model it is loaded into."""


# ------------------------------------------------------------------------------ atomic writes
def _fsync_dir(path: str) -> None:
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


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(d)


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
    _write: Callable[[str, bytes], None] = _write_synced,
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
        _write(os.path.join(tmp, "config.json"), (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        _write(os.path.join(tmp, "model.safetensors"), _safetensors_bytes(model_state, config))
        if ema_state is not None:
            _write(os.path.join(tmp, "ema.safetensors"), _safetensors_bytes(ema_state, config))
        if train_state is not None:
            _write(os.path.join(tmp, "state.pt"), _torch_bytes(train_state))
        _fsync_dir(tmp)
        old = None
        if os.path.exists(final):  # re-saving a step: move the old one aside first
            old = os.path.join(base, f".{_step_dirname(step)}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(base)
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


def _read_safetensors(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
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
    return out, meta


def _parse_config(text: str, where: str) -> Dict[str, Any]:
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: truncated or invalid config JSON ({e})") from e
    if not isinstance(cfg, dict) or "model" not in cfg or "diffusion" not in cfg:
        raise CheckpointError(f"{where}: the config must be a JSON object with 'model' and 'diffusion' entries")
    return cfg


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
        return Checkpoint(path=path, config=cfg, model=weights, step=int(cfg.get("step", 0)))

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{cfg_path}: missing checkpoint file")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = _parse_config(f.read(), cfg_path)
    ck = Checkpoint(path=path, config=cfg, step=int(cfg.get("step", 0)))
    model_p, ema_p, state_p = (os.path.join(path, n) for n in ("model.safetensors", "ema.safetensors", "state.pt"))
    if load_model:
        ck.model, _ = _read_safetensors(model_p)
    if load_ema and os.path.exists(ema_p):
        ck.ema, _ = _read_safetensors(ema_p)
    elif load_ema and not load_model and not os.path.exists(ema_p):
        ck.model, _ = _read_safetensors(model_p)  # no EMA: fall back to the raw weights
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
    return ck


# ------------------------------------------------------------------------------ building models
def build_model(config: Dict[str, Any]) -> torch.nn.Module:
    """A fastddpm.UNet from a checkpoint config's "model" entry (UNet keyword arguments)."""
    from .unet import UNet

    import inspect

    m = dict(config["model"])
    # keyword arguments this UNet version does not know (written by another version) are dropped: any
    # real architecture difference still shows up in check_state_dict as missing/mis-shaped weights
    params = inspect.signature(UNet.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        m = {k: v for k, v in m.items() if k in params}
    try:
        return UNet(**m)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's model config cannot build a UNet: {e}") from e


def build_diffusion(config: Dict[str, Any]):
    """A GaussianDiffusion from a config's "diffusion" entry: schedule, num_timesteps, prediction, variance, loss."""
    from .diffusion import GaussianDiffusion
    from .schedule import NoiseSchedule

    d = config["diffusion"]
    schedule, T = d.get("schedule", "linear"), int(d.get("num_timesteps", 1000))
    if schedule == "linear":
        sched = NoiseSchedule.linear(T)
    elif schedule == "cosine":
        sched = NoiseSchedule.cosine(T)
    elif schedule == "custom":  # explicit betas (e.g. converted from a diffusers scheduler)
        sched = NoiseSchedule(d["betas"])
    else:
        raise CheckpointError(f"unknown schedule {schedule!r} in the checkpoint config "
                              f"(expected 'linear', 'cosine' or 'custom' with 'betas')")
    return GaussianDiffusion(sched, prediction=d.get("prediction", "eps"), variance=d.get("variance", "fixed_small"),
                             loss=d.get("loss", "simple"))


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


def load_model(path: Optional[str] = None, use_ema: bool = True, device: Any = "cpu"):
    """Load (model, diffusion, config) for sampling: EMA weights by default, model in eval mode.

    ``path=None`` loads the bundled digits model.
    """
    ck = load_checkpoint(path, load_state=False, load_model=not use_ema, load_ema=use_ema)
    model = build_model(ck.config)
    weights = ck.weights(use_ema)
    check_state_dict(model, weights, ck.path)
    model.load_state_dict(weights)
    model.to(device).eval()
    return model, build_diffusion(ck.config), ck.config


def export_model(checkpoint: Optional[str], out: str, use_ema: bool = True) -> str:
    """Write one self-contained ``.safetensors`` file for sampling: the EMA (or raw) weights, with the
    config in its metadata, plus the same config as ``<out minus .safetensors>.json`` for people.

    This is how the bundled model was made from its training run:
    ``export_model("runs/digits", "fastddpm/assets/digits.safetensors")``.
    """
    if not out.endswith(".safetensors"):
        raise ValueError(f"out must end with .safetensors, got {out!r}")
    ck = load_checkpoint(checkpoint, load_state=False, load_model=not use_ema, load_ema=use_ema)
    weights = ck.weights(use_ema)
    model = build_model(ck.config)
    check_state_dict(model, weights, ck.path)
    config = dict(ck.config)
    # the model's complete keyword arguments (defaults included), so the file never depends on defaults
    config["model"] = json.loads(json.dumps(getattr(model, "config", config["model"])))
    config["weights"] = "ema" if (use_ema and ck.ema is not None) else "raw"
    config["exported_from"] = {"step": ck.step}
    save_weights_file(out, weights, config)
    atomic_write_bytes(os.path.splitext(out)[0] + ".json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return out

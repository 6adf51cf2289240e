"""Models and diffusions from configs, and from checkpoints: what the CLIs, the pipeline and training build.

A config is the dict a checkpoint stores (see :mod:`fastddpm.checkpoint`): ``"model"`` holds the
UNet's keyword arguments, ``"diffusion"`` the schedule, number of timesteps, prediction, variance and
loss. :func:`build_model` and :func:`build_diffusion` check the values against generous bounds
(:data:`CONFIG_BOUNDS`) before anything is allocated, so a damaged or hostile config is a
:class:`~fastddpm.checkpoint.CheckpointError`, not an out-of-memory. :func:`load_model` is the one call
that turns a checkpoint path into a model ready to sample; :func:`export_model` writes one
self-contained weights file for sampling.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import torch

from .checkpoint import CheckpointError, check_state_dict, load_checkpoint, save_weights_file
from .fileio import atomic_write_json

__all__ = ["build_model", "build_diffusion", "load_model", "export_model", "CONFIG_BOUNDS", "MAX_PARAMETERS"]

# bounds on checkpoint config values, checked before anything is allocated (a hand-edited or hostile config
# could otherwise ask for terabytes); each is far beyond any model this library trains
CONFIG_BOUNDS = {"image_size": 4096, "in_channels": 64, "base_channels": 4096, "num_res_blocks": 64,
                 "channel_mults": 64, "levels": 12, "num_heads": 1024, "head_channels": 4096,
                 "num_classes": 1_000_000, "groups": 4096, "out_channels": 128, "num_timesteps": 100_000}
MAX_PARAMETERS = 20_000_000_000


def _check_bound(name: str, value: Any, where: str) -> None:
    bound = CONFIG_BOUNDS[name]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > bound:
        raise CheckpointError(f"{where}: {name}={value!r} exceeds the bound {bound} for a checkpoint config; "
                              "refused before building anything (a damaged or hand-edited config?)")


def _check_model_bounds(m: Dict[str, Any]) -> None:
    where = "the checkpoint's model config"
    for k in ("image_size", "in_channels", "base_channels", "num_res_blocks", "num_heads", "head_channels",
              "num_classes", "groups", "out_channels"):
        _check_bound(k, m.get(k), where)
    mults = m.get("channel_mults", ())
    if isinstance(mults, (list, tuple)):
        _check_bound("levels", len(mults), where)
        for v in mults:
            _check_bound("channel_mults", v, where)
        widest = m.get("base_channels", 0) * max([v for v in mults if isinstance(v, (int, float))] or [0])
        if isinstance(widest, (int, float)) and widest > 0:
            # a generous over-estimate of the parameter count: every conv of every block at the widest width
            nrb = m.get("num_res_blocks", 1)
            nrb = nrb if isinstance(nrb, int) and not isinstance(nrb, bool) and nrb > 0 else 1  # UNet judges it
            per_level = 3 * (nrb + 1) * 2 * 9 * widest ** 2
            estimate = per_level * (len(mults) + 1)
            if estimate > MAX_PARAMETERS:
                raise CheckpointError(f"{where}: about {estimate:.3g} parameters (base_channels * channel_mults = "
                                      f"{widest}) exceed the bound {MAX_PARAMETERS:.3g}; refused before building")


def build_model(config: Dict[str, Any]) -> torch.nn.Module:
    """A fastddpm.UNet from a checkpoint config's "model" entry (UNet keyword arguments); for a distilled
    checkpoint (a "distill" entry, `fastddpm.distillation`) a `fastddpm.student.StudentSet` of such U-Nets."""
    from .student import build_student_set, is_distilled

    if is_distilled(config):
        return build_student_set(config, _build_unet)
    return _build_unet(config)


def _build_unet(config: Dict[str, Any]) -> torch.nn.Module:
    from .unet import UNet

    import inspect

    if not isinstance(config.get("model"), dict):
        raise CheckpointError("the checkpoint's model config must be a JSON object of UNet arguments")
    m = dict(config["model"])
    _check_model_bounds(m)
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
    if not isinstance(d, dict):
        raise CheckpointError("the checkpoint's diffusion config must be a JSON object")
    schedule, T = d.get("schedule", "linear"), d.get("num_timesteps", 1000)
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise CheckpointError(f"the checkpoint's diffusion config: num_timesteps must be a positive int, got {T!r}")
    _check_bound("num_timesteps", T, "the checkpoint's diffusion config")
    if schedule == "custom" and (not isinstance(d.get("betas"), list) or len(d["betas"]) > CONFIG_BOUNDS["num_timesteps"]):
        raise CheckpointError("the checkpoint's diffusion config: 'custom' needs 'betas', a list of at most "
                              f"{CONFIG_BOUNDS['num_timesteps']} numbers")
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
    diffusion = build_diffusion(ck.config)
    for m in getattr(model, "students", {}).values() or [model]:  # a student set: each student
        m.num_timesteps = diffusion.num_timesteps  # lets the U-Net refuse t >= T (see UNet.forward)
    return model, diffusion, ck.config


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
    atomic_write_json(os.path.splitext(out)[0] + ".json", config)
    return out

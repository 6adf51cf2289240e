"""fastddpm -> diffusers: a checkpoint written as a `DDPMPipeline` folder, without importing diffusers.

    fd.export_diffusers("runs/cifar", "cifar-diffusers")     # or a Pipeline (fd.load(...)), or None: the bundled model
    # then, with diffusers:  DDPMPipeline.from_pretrained("cifar-diffusers")

The folder is what `DDPMPipeline.save_pretrained` writes:

    model_index.json                          {"_class_name": "DDPMPipeline", "unet": ..., "scheduler": ...}
    unet/config.json                          the UNet2DModel config
    unet/diffusion_pytorch_model.safetensors  the weights (diffusers' names; the qkv projection split into to_q/k/v)
    scheduler/scheduler_config.json           a DDPMScheduler config with the checkpoint's betas
    README.md                                 what diffusers reproduces and what it does not

The weight names come from the one table both directions use (`fastddpm.interop.diffusers.diffusers_key_map`),
so `fastddpm convert` of the folder gives back the same weights and configuration.

What maps: both time-embedding kinds ("add" -> resnet_time_scale_shift "default", "scale_shift" ->
"scale_shift" with the attention GroupNorm diffusers needs for it), any channel multipliers, attention
resolutions, GroupNorm groups / eps, downsample padding, the sinusoid's flip and shift; linear and cosine
schedules by name (diffusers' "linear" with fastddpm's 1000/T scaling, "squaredcos_cap_v2"), any other
betas as `trained_betas`; eps / x0 / v predictions (epsilon / sample / v_prediction); fixed_small,
fixed_large and learned_range variances (a learned-range model's 2C output channels are what
DDPMScheduler splits); class-conditional models (num_class_embeds; a trained null class of classifier-free
guidance becomes one more row, see `fastddpm.interop.diffusers`). Refused, naming the setting: several
attention heads of different widths (diffusers has one attention_head_dim), a 2C-channel output without
learned_range.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from .._names import DISTILL_CONFIG_KEY
from ..fileio import atomic_write_bytes, atomic_write_json
from ..schedule import NoiseSchedule
from .diffusers import NULL_CLASS_KEY, diffusers_key_map

__all__ = ["export_diffusers", "unet2d_config", "unet2d_state_dict", "scheduler_config", "ExportError"]

# the diffusers version whose file layout this writes (recorded in the configs as diffusers does)
DIFFUSERS_VERSION = "0.42.0"
_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


class ExportError(ValueError):
    """The model or its diffusion has a setting a diffusers DDPMPipeline cannot represent."""


def _refuse(setting: str, value: Any, why: str) -> ExportError:
    return ExportError(f"cannot export to diffusers: {setting}={value!r} ({why})")


def _attention_levels(unet: Any) -> List[bool]:
    return [unet.image_size // 2 ** lvl in unet.attention_resolutions for lvl in range(len(unet.channel_mults))]


def _head_dim(unet: Any, attention: List[bool]) -> Optional[int]:
    """diffusers' attention_head_dim (None: one head per block) for the U-Net's heads."""
    if unet.head_channels is not None:
        return int(unet.head_channels)
    if unet.num_heads == 1:
        return None
    channels = [unet.base_channels * m for m in unet.channel_mults]
    widths = {channels[lvl] for lvl in range(len(channels)) if attention[lvl]} | {channels[-1]}
    if len(widths) != 1:
        raise _refuse("num_heads", unet.num_heads, f"attention blocks of widths {sorted(widths)} would need different "
                      "head widths; diffusers' UNet2DModel has one attention_head_dim (retrain with head_channels)")
    return next(iter(widths)) // unet.num_heads


def _null_row_is_zero(unet: Any) -> bool:
    return bool((unet.class_embedding.weight[-1] == 0).all())


def unet2d_config(unet: Any) -> Dict[str, Any]:
    """The diffusers UNet2DModel config of a `fastddpm.UNet`."""
    attention = _attention_levels(unet)
    levels = len(attention)
    shift = unet.time_embedding == "scale_shift"
    cfg: Dict[str, Any] = {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": int(unet.image_size), "in_channels": int(unet.in_channels),
        "out_channels": int(unet.out_channels), "center_input_sample": False, "time_embedding_type": "positional",
        "time_embedding_dim": None, "freq_shift": unet.freq_shift, "flip_sin_to_cos": bool(unet.flip_sin_to_cos),
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if attention[levels - 1 - i] else "UpBlock2D" for i in range(levels)],
        "block_out_channels": [int(unet.base_channels * m) for m in unet.channel_mults],
        "layers_per_block": int(unet.num_res_blocks), "mid_block_scale_factor": 1,
        "downsample_padding": int(unet.downsample_padding), "downsample_type": "conv", "upsample_type": "conv",
        "dropout": float(unet.config.get("dropout", 0.0)), "act_fn": "silu",
        "attention_head_dim": _head_dim(unet, attention), "norm_num_groups": int(unet.groups),
        # scale_shift: without attn_norm_num_groups diffusers' middle attention has no GroupNorm
        "attn_norm_num_groups": int(unet.groups) if shift else None, "norm_eps": float(unet.norm_eps),
        "resnet_time_scale_shift": "scale_shift" if shift else "default", "add_attention": True,
        "class_embed_type": None, "num_class_embeds": None,
    }
    if unet.num_classes is not None:
        if _null_row_is_zero(unet):
            cfg["num_class_embeds"] = int(unet.num_classes)
        else:  # the trained null class is one more label diffusers can be given
            cfg["num_class_embeds"] = int(unet.num_classes) + 1
            cfg[NULL_CLASS_KEY] = True
    return cfg


def unet2d_state_dict(unet: Any) -> Dict[str, torch.Tensor]:
    """The weights of a `fastddpm.UNet` under UNet2DModel's names (float32 CPU copies of the values)."""
    ours = {k: v.detach().to("cpu") for k, v in unet.state_dict().items()}
    attention = _attention_levels(unet)
    out: Dict[str, torch.Tensor] = {}
    used = set()
    for mine, keys in diffusers_key_map(len(attention), unet.num_res_blocks, attention):
        if mine not in ours:
            continue
        value = ours[mine]
        used.add(mine)
        if mine == "class_embedding.weight" and _null_row_is_zero(unet):
            value = value[:-1]
        for key, part in zip(keys, value.chunk(len(keys), dim=0)):
            out[key] = part.contiguous().clone()
    left = sorted(set(ours) - used)
    if left:  # a U-Net this table does not cover: never write a partial model
        raise ExportError(f"cannot export to diffusers: weights {left[:5]} have no UNet2DModel counterpart")
    return out


def _linear_endpoints(betas: torch.Tensor) -> Optional[Tuple[float, float]]:
    """(beta_start, beta_end) when `betas` is linspace(beta_start, beta_end, T) to float64 rounding."""
    T = betas.numel()
    if T < 2:
        return None
    ref = torch.linspace(float(betas[0]), float(betas[-1]), T, dtype=torch.float64)
    return (float(betas[0]), float(betas[-1])) if torch.allclose(ref, betas, rtol=1e-12, atol=0.0) else None


def scheduler_config(diffusion: Any, clip_sample: bool = True) -> Dict[str, Any]:
    """A DDPMScheduler config with `diffusion`'s betas, prediction and variance."""
    sched = diffusion.schedule
    betas = sched.betas.to(torch.float64)
    T = int(sched.num_timesteps)
    cfg: Dict[str, Any] = {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
                           "num_train_timesteps": T, "beta_start": 0.0001, "beta_end": 0.02,
                           "beta_schedule": "linear", "trained_betas": None, "variance_type": diffusion.variance,
                           "clip_sample": bool(clip_sample), "clip_sample_range": 1.0,
                           "prediction_type": _PREDICTION[diffusion.prediction], "thresholding": False,
                           "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False}
    if getattr(sched, "timestep_map", None) is not None:
        raise _refuse("schedule", "respaced", "a respaced schedule's model timesteps are not 0..T-1; export the "
                      "training schedule")
    linear = _linear_endpoints(betas)
    if T > 1 and torch.allclose(betas, NoiseSchedule.cosine(T).betas, rtol=1e-12, atol=0.0):
        cfg["beta_schedule"] = "squaredcos_cap_v2"
    elif linear is not None:
        cfg["beta_start"], cfg["beta_end"] = linear
    else:
        cfg["trained_betas"] = betas.tolist()  # float64 values; diffusers keeps them in float32
    return cfg


def _readme(source: str, diffusion: Any, sched_cfg: Dict[str, Any], notes: List[str]) -> str:
    kind = sched_cfg["trained_betas"] is not None and "trained_betas (the exact betas)" or sched_cfg["beta_schedule"]
    lines = [
        "# fastddpm export", "",
        f"Exported by `fastddpm export` from `{source}`: a diffusers `DDPMPipeline` (UNet2DModel + DDPMScheduler).", "",
        "```python", "from diffusers import DDPMPipeline",
        "pipe = DDPMPipeline.from_pretrained(\"<this folder>\")", "images = pipe(batch_size=16).images", "```", "",
        "## What diffusers reproduces", "",
        "- The U-Net: the same function as the fastddpm model (float rounding apart; fastddpm's tests check 1e-5 "
        "relative in float32).",
        f"- The noise schedule: {diffusion.num_timesteps} steps, beta_schedule {kind}; diffusers computes the betas "
        "in float32 (fastddpm in float64), so they agree to float32 rounding.",
        f"- prediction_type {sched_cfg['prediction_type']}, variance_type {sched_cfg['variance_type']}, "
        f"clip_sample {sched_cfg['clip_sample']}: `DDPMScheduler.step` / `DDIMScheduler.step` with this config give "
        "what fastddpm's DDPM / DDIM `step()` gives for the same timesteps and noise.",
        "",
        "## What it does not", "",
        "- The noise: fastddpm draws it from a Philox stream per image (`seed=`); diffusers from torch's generator. "
        "Same model, same distribution, different images for a given seed.",
    ]
    return "\n".join(lines + notes) + "\n"


def _notes(config: Dict[str, Any], unet: Any, schedules: Optional[Dict[str, Any]]) -> List[str]:
    notes: List[str] = []
    if unet.num_classes is not None:
        if not _null_row_is_zero(unet):
            notes.append(f"- Class-conditional: labels 0..{unet.num_classes - 1}; label {unet.num_classes} is the "
                         "null class of classifier-free guidance (diffusers' `DDPMPipeline` passes no labels: call "
                         "`pipe.unet(x, t, class_labels=y)` yourself). Guidance is fastddpm's sampler option.")
        else:
            notes.append(f"- Class-conditional: labels 0..{unet.num_classes - 1} (`unet(x, t, class_labels=y)`).")
    if schedules:
        notes.append("- Tuned timesteps (`fastddpm tune-steps`) are not part of a diffusers scheduler config: "
                     "diffusers walks its own spacing. The tuned lists, per sampler and number of steps, were:")
        for name, by_steps in sorted(schedules.items()):
            for steps, ts in sorted(by_steps.items(), key=lambda kv: int(kv[0])):
                notes.append(f"  - {name}, {steps} steps: {list(ts)}")
    student = config.get(DISTILL_CONFIG_KEY)
    if student:
        calls = student.get("calls") if isinstance(student, dict) else None
        k = max((int(c) for c in calls), default=None) if isinstance(calls, dict) else calls
        notes.append(f"- This is the {k}-call distilled student: it was trained to be sampled by fastddpm's "
                     f"sampler at its own few steps ({json.dumps(student, sort_keys=True)[:200]}); diffusers' "
                     "DDPMScheduler walks the "
                     "teacher's full loop, which the student was not trained for: expect poor samples there. Sample "
                     "it with `fastddpm sample --checkpoint`.")
    return notes


def _prepare_dir(out_dir: str, overwrite: bool) -> str:
    out_dir = os.path.abspath(os.path.expanduser(os.fspath(out_dir)))
    if os.path.islink(out_dir):
        raise ValueError(f"out_dir {out_dir!r} is a symbolic link; export writes only into real directories")
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ValueError(f"out_dir {out_dir!r} exists and is not a directory")
        if os.listdir(out_dir) and not overwrite:
            raise ValueError(f"out_dir {out_dir!r} is not empty; pass overwrite=True (--overwrite) to replace its "
                             "pipeline files")
    for sub in ("unet", "scheduler"):
        p = os.path.join(out_dir, sub)
        if os.path.islink(p) or (os.path.exists(p) and not os.path.isdir(p)):
            raise ValueError(f"{p!r} is a symbolic link or a file; export writes only into real directories")
    for sub in ("unet", "scheduler"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    return out_dir


def _no_link(path: str) -> str:
    # the atomic writes replace a link itself, never its target; refuse one anyway (someone put it there)
    if os.path.islink(path):
        raise ValueError(f"{path!r} is a symbolic link; export never writes through links")
    return path


def _load(source: Any, use_ema: bool) -> Tuple[Any, Any, Dict[str, Any], str, Optional[Dict[str, Any]]]:
    """(unet, diffusion, config, source path, tuned schedules) of a Pipeline or a checkpoint path (None: bundled)."""
    from .. import checkpoint as ckpt
    from ..build import load_model

    if hasattr(source, "unet") and hasattr(source, "diffusion"):
        config = dict(getattr(source, "config", {}) or {})
        path = str(getattr(source, "source", "a fastddpm Pipeline"))
        return source.unet, source.diffusion, config, path, _schedules_of(path)
    model, diffusion, config = load_model(source, use_ema=use_ema, device="cpu")
    from ..student import StudentSet

    if isinstance(model, StudentSet):  # one U-Net per K: the most calls, the set's best-quality student
        model = model.for_calls(max(model.calls))
    path = ckpt.resolve_checkpoint(source)
    return model, diffusion, config, path, _schedules_of(path)


def _schedules_of(path: str) -> Optional[Dict[str, Any]]:
    from ..tune import load_tuned_schedules

    try:
        return load_tuned_schedules(path) or None
    except (OSError, ValueError):
        return None


def _clip_sample(config: Dict[str, Any]) -> bool:
    if isinstance(config.get("scheduler"), dict):
        return bool(config["scheduler"].get("clip_sample", True))
    d = config.get("diffusion")
    return bool(d.get("clip_sample", True)) if isinstance(d, dict) else True


def export_diffusers(checkpoint_or_pipeline: Any, out_dir: str, *, use_ema: bool = True,
                     overwrite: bool = False) -> str:
    """Write a diffusers `DDPMPipeline` folder for a fastddpm model; returns the folder's absolute path.

    Args:
        checkpoint_or_pipeline: a checkpoint path (run directory, checkpoint directory, .safetensors),
            None (the bundled digits model) or a `fastddpm.Pipeline` (`fd.load(...)`).
        out_dir: the folder to write (created; refused when it is a symbolic link, or not empty
            unless `overwrite`).
        use_ema: checkpoints: the EMA weights (default) or the raw ones.
        overwrite: replace the pipeline files of a non-empty `out_dir`.

    Raises ExportError (a ValueError) naming the setting diffusers cannot represent; nothing is written then.
    diffusers is not imported.
    """
    unet, diffusion, config, path, schedules = _load(checkpoint_or_pipeline, use_ema)
    if unet.out_channels != unet.in_channels and diffusion.variance != "learned_range":
        raise _refuse("out_channels", unet.out_channels, f"{unet.in_channels} channels are needed with "
                      f"variance={diffusion.variance!r}: DDPMScheduler splits 2C channels only with learned_range")
    if diffusion.variance == "learned_range" and unet.out_channels != 2 * unet.in_channels:
        raise _refuse("variance", "learned_range", f"the U-Net outputs {unet.out_channels} channels, not 2C")
    ucfg = unet2d_config(unet)
    weights = unet2d_state_dict(unet)
    scfg = scheduler_config(diffusion, _clip_sample(config))
    readme = _readme(path, diffusion, scfg, _notes(config, unet, schedules))
    from safetensors.torch import save

    out_dir = _prepare_dir(out_dir, overwrite)
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
             "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
    tensors = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in weights.items()}
    files = ("unet/" + WEIGHTS_NAME, "unet/config.json", "scheduler/scheduler_config.json", "model_index.json",
             "README.md")
    for rel in files:
        _no_link(os.path.join(out_dir, rel))
    atomic_write_bytes(os.path.join(out_dir, files[0]), save(tensors, metadata={"format": "pt"}))
    for rel, obj in zip(files[1:4], (ucfg, scfg, index)):
        atomic_write_json(os.path.join(out_dir, rel), obj)
    atomic_write_bytes(os.path.join(out_dir, files[4]), readme.encode())
    return out_dir

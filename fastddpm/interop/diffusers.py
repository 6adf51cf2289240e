"""diffusers `UNet2DModel` (DDPM family) -> `fastddpm.UNet`, weights mapped one to one.

Supported: the configs of google/ddpm-cifar10-32, -celebahq-256, -church-256, -bedroom-256, -cat-256
and any `UNet2DModel` built the same way, i.e.

    time_embedding_type="positional" (any flip_sin_to_cos / freq_shift), act_fn="silu",
    down blocks "DownBlock2D" / "AttnDownBlock2D", up blocks "UpBlock2D" / "AttnUpBlock2D" with the
    attention at the same resolutions on the way down and up, mid_block_type "UNetMidBlock2D" with
    attention, downsample_type = upsample_type = "conv" (downsample_padding 0 or 1),
    block_out_channels = block_out_channels[0] * integer multipliers, time_embedding_dim None (or
    4 * block_out_channels[0]), mid_block_scale_factor 1, resnet_time_scale_shift "default" or
    "scale_shift" (the latter only with attn_norm_num_groups = norm_num_groups: without it diffusers'
    middle attention has no GroupNorm), class_embed_type None (with or without num_class_embeds).

A class-conditional model (num_class_embeds = K) maps to `UNet(num_classes=K)`; the extra null-class
row (index K) is set to zero, i.e. "no class embedding". A folder written by `fastddpm export` from a
model whose null class was trained (classifier-free guidance) holds K + 1 rows and the config entry
``fastddpm_null_class: true``: its last row is the null class, so it maps back to `UNet(num_classes=K)`. Anything else raises ValueError naming the
option. diffusers' attention projections to_q/to_k/to_v are stacked into the U-Net's single qkv
Linear; to_out[0] is its proj.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..unet import UNet

__all__ = ["unet_from_diffusers", "unet_config_from_diffusers", "diffusers_key_map", "NULL_CLASS_KEY"]

# a UNet2DModel config entry written by fastddpm.interop.export: the class table's last row is the null
# class of classifier-free guidance (num_class_embeds = fastddpm num_classes + 1)
NULL_CLASS_KEY = "fastddpm_null_class"

_DOWN = ("DownBlock2D", "AttnDownBlock2D")
_UP = ("UpBlock2D", "AttnUpBlock2D")


def _cfg(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def _unsupported(option: str, value: Any, accepted: str) -> ValueError:
    return ValueError(f"cannot map this UNet2DModel to fastddpm.UNet: unsupported {option}={value!r} "
                      f"(supported: {accepted})")


def unet_config_from_diffusers(config: Any, image_size: Optional[int] = None) -> Dict[str, Any]:
    """fastddpm.UNet keyword arguments equivalent to a diffusers UNet2DModel config (dict or FrozenDict).

    Raises ValueError naming the first option that has no fastddpm equivalent.
    """
    def want(option: str, accepted: tuple, default: Any = None) -> Any:
        value = _cfg(config, option, default)
        if value not in accepted:
            raise _unsupported(option, value, " or ".join(repr(a) for a in accepted))
        return value

    want("time_embedding_type", ("positional",), "positional")
    want("center_input_sample", (False,), False)
    want("act_fn", ("silu", "swish"), "silu")
    want("mid_block_type", ("UNetMidBlock2D",), "UNetMidBlock2D")
    want("add_attention", (True,), True)
    want("downsample_type", ("conv",), "conv")
    want("upsample_type", ("conv",), "conv")
    want("mid_block_scale_factor", (1, 1.0), 1)
    want("class_embed_type", (None,), None)
    shift = want("resnet_time_scale_shift", ("default", "scale_shift"), "default")

    channels = list(_cfg(config, "block_out_channels"))
    base = int(channels[0])
    if any(int(c) % base for c in channels):
        raise _unsupported("block_out_channels", tuple(channels), "multiples of block_out_channels[0]")
    mults = tuple(int(c) // base for c in channels)
    temb = _cfg(config, "time_embedding_dim", None)
    if temb is not None and temb != 4 * base:
        raise _unsupported("time_embedding_dim", temb, f"None or 4 * block_out_channels[0] = {4 * base}")
    groups = _cfg(config, "norm_num_groups", 32)
    if not isinstance(groups, int):
        raise _unsupported("norm_num_groups", groups, "an int")
    attn_groups = _cfg(config, "attn_norm_num_groups", None)
    if shift == "scale_shift" and attn_groups != groups:
        raise _unsupported("attn_norm_num_groups", attn_groups,
                           f"norm_num_groups = {groups} when resnet_time_scale_shift='scale_shift' "
                           "(otherwise diffusers' middle attention has no GroupNorm)")
    if attn_groups is not None and attn_groups != groups:
        raise _unsupported("attn_norm_num_groups", attn_groups, f"None or norm_num_groups = {groups}")
    padding = want("downsample_padding", (0, 1), 1)
    layers = _cfg(config, "layers_per_block", 2)
    if not isinstance(layers, int):
        raise _unsupported("layers_per_block", layers, "an int")

    down = tuple(_cfg(config, "down_block_types"))
    up = tuple(_cfg(config, "up_block_types"))
    for option, types, accepted in (("down_block_types", down, _DOWN), ("up_block_types", up, _UP)):
        for t in types:
            if t not in accepted:
                raise _unsupported(option, types, f"blocks from {accepted}")
    levels = len(channels)
    if len(down) != levels or len(up) != levels:
        raise _unsupported("down_block_types/up_block_types", (down, up), f"{levels} blocks each")
    down_attn = [t == "AttnDownBlock2D" for t in down]
    up_attn = [t == "AttnUpBlock2D" for t in reversed(up)]
    if down_attn != up_attn:
        raise _unsupported("up_block_types", up, "attention at the same resolutions as in down_block_types")

    if image_size is None:
        size = _cfg(config, "sample_size", None)
        if isinstance(size, (tuple, list)):
            if len(size) != 2 or size[0] != size[1]:
                raise _unsupported("sample_size", size, "square images (or pass image_size)")
            size = size[0]
        if not isinstance(size, int):
            raise _unsupported("sample_size", size, "an int (or pass image_size)")
        image_size = size
    resolutions = [image_size // 2 ** lvl for lvl in range(levels)]

    head_dim = _cfg(config, "attention_head_dim", None)
    kwargs: Dict[str, Any] = {}
    if head_dim is not None:
        attn_channels = {channels[lvl] for lvl in range(levels) if down_attn[lvl]} | {channels[-1]}
        if any(c % head_dim for c in attn_channels):
            raise _unsupported("attention_head_dim", head_dim, f"a divisor of the attention channels {sorted(attn_channels)}")
        kwargs["head_channels"] = int(head_dim)

    return dict(
        image_size=int(image_size),
        in_channels=int(_cfg(config, "in_channels", 3)),
        base_channels=base,
        channel_mults=mults,
        num_res_blocks=layers,
        attention_resolutions=tuple(resolutions[lvl] for lvl in range(levels) if down_attn[lvl]),
        dropout=float(_cfg(config, "dropout", 0.0)),
        time_embedding="add" if shift == "default" else "scale_shift",
        learn_sigma=False,
        num_classes=_num_classes(config),
        groups=groups,
        out_channels=int(_cfg(config, "out_channels", 3)),
        norm_eps=float(_cfg(config, "norm_eps", 1e-5)),
        downsample_padding=padding,
        flip_sin_to_cos=bool(_cfg(config, "flip_sin_to_cos", True)),
        freq_shift=_cfg(config, "freq_shift", 0),
        **kwargs,
    )


def _num_classes(config: Any) -> Optional[int]:
    """fastddpm's num_classes: num_class_embeds, less the null-class row of a fastddpm export."""
    k = _cfg(config, "num_class_embeds", None)
    if k is not None and _cfg(config, NULL_CLASS_KEY, False):
        if k < 2:
            raise _unsupported("num_class_embeds", k, f"at least 2 with {NULL_CLASS_KEY}=true (classes + the null class)")
        return int(k) - 1
    return k


class _Recording(dict):
    """A dict that records which keys were read (to check that every source weight was mapped)."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.used: set = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        self.used.add(key)
        return super().__getitem__(key)


_RESNET_NAMES = (("norm1", "norm1"), ("conv1", "conv1"), ("time_proj", "time_emb_proj"), ("norm2", "norm2"),
                 ("conv2", "conv2"), ("skip", "conv_shortcut"))


def _resnet_keys(ours: str, prefix: str) -> List[Tuple[str, Tuple[str, ...]]]:
    return [(f"{ours}.{mine}.{p}", (f"{prefix}.{their}.{p}",)) for mine, their in _RESNET_NAMES for p in ("weight", "bias")]


def _attention_keys(ours: str, prefix: str) -> List[Tuple[str, Tuple[str, ...]]]:
    out = []
    for p in ("weight", "bias"):
        out.append((f"{ours}.norm.{p}", (f"{prefix}.group_norm.{p}",)))
        out.append((f"{ours}.qkv.{p}", tuple(f"{prefix}.to_{n}.{p}" for n in "qkv")))  # stacked along dim 0
        out.append((f"{ours}.proj.{p}", (f"{prefix}.to_out.0.{p}",)))
    return out


def _level_keys(ours: str, prefix: str, resnets: int, attention: bool, resample: Optional[str]):
    out = []
    for j in range(resnets):
        out += _resnet_keys(f"{ours}.resnets.{j}", f"{prefix}.resnets.{j}")
        if attention:
            out += _attention_keys(f"{ours}.attentions.{j}", f"{prefix}.attentions.{j}")
    if resample is not None:
        out += [(f"{ours}.resample.conv.{p}", (f"{prefix}.{resample}.0.conv.{p}",)) for p in ("weight", "bias")]
    return out


def diffusers_key_map(levels: int, layers: int, attention: Sequence[bool]) -> List[Tuple[str, Tuple[str, ...]]]:
    """(fastddpm UNet key, the UNet2DModel keys it is made of) for every weight that may exist.

    `attention[l]`: level l has self-attention. A key of several diffusers keys is their concatenation
    along dim 0 (the stacked qkv projection). The ResBlocks' `skip` (diffusers' conv_shortcut) exists
    only where a block changes the channel count, and `class_embedding` only for class-conditional
    models: callers keep the entries whose source keys exist. Both directions use this one table
    (`unet_from_diffusers` and `fastddpm.interop.export`).
    """
    out: List[Tuple[str, Tuple[str, ...]]] = []
    for p in ("weight", "bias"):
        out += [(f"conv_in.{p}", (f"conv_in.{p}",)), (f"time_linear1.{p}", (f"time_embedding.linear_1.{p}",)),
                (f"time_linear2.{p}", (f"time_embedding.linear_2.{p}",)), (f"norm_out.{p}", (f"conv_norm_out.{p}",)),
                (f"conv_out.{p}", (f"conv_out.{p}",))]
    out.append(("class_embedding.weight", ("class_embedding.weight",)))
    for lvl in range(levels):
        last = lvl == levels - 1
        out += _level_keys(f"down.{lvl}", f"down_blocks.{lvl}", layers, attention[lvl], None if last else "downsamplers")
        out += _level_keys(f"up.{lvl}", f"up_blocks.{lvl}", layers + 1, attention[levels - 1 - lvl],
                           None if last else "upsamplers")
    out += _resnet_keys("mid.resnet1", "mid_block.resnets.0")
    out += _attention_keys("mid.attention", "mid_block.attentions.0")
    out += _resnet_keys("mid.resnet2", "mid_block.resnets.1")
    return out


def unet_from_diffusers(unet2d: torch.nn.Module, image_size: Optional[int] = None) -> UNet:
    """A `fastddpm.UNet` with the weights of a diffusers `UNet2DModel` of the DDPM family.

    `unet2d` may also be a pipeline holding one as `.unet`. The result computes the same function (to float rounding) through the fused ops, on the device
    and in the dtype of `unet2d`; it is in eval mode when `unet2d` is. `image_size` overrides the
    config's sample_size. Raises ValueError naming the option when the config cannot be mapped
    (see the module docstring for what can).
    """
    if type(unet2d).__name__ != "UNet2DModel" and type(getattr(unet2d, "unet", None)).__name__ == "UNet2DModel":
        unet2d = unet2d.unet  # a pipeline (DDPMPipeline, DDIMPipeline, ...)
    if type(unet2d).__name__ != "UNet2DModel" or not hasattr(unet2d, "config"):
        raise ValueError(f"unet2d must be a diffusers UNet2DModel, got {type(unet2d).__name__}")
    kwargs = unet_config_from_diffusers(unet2d.config, image_size=image_size)
    model = UNet(**kwargs)
    theirs = _Recording((k, v.detach()) for k, v in unet2d.state_dict().items())
    used = theirs.used
    levels = len(kwargs["channel_mults"])
    layers = kwargs["num_res_blocks"]
    down_types = tuple(unet2d.config.down_block_types)
    null_class = bool(_cfg(unet2d.config, NULL_CLASS_KEY, False))

    sd: Dict[str, torch.Tensor] = {}
    attention = [t == "AttnDownBlock2D" for t in down_types]
    for mine, keys in diffusers_key_map(levels, layers, attention):
        if mine == "class_embedding.weight":
            continue
        if all(k in theirs for k in keys):
            parts = [theirs[k] for k in keys]
            sd[mine] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if model.class_embedding is not None:
        table = theirs["class_embedding.weight"]
        if null_class:  # exported by fastddpm: the last row is the trained null class
            sd["class_embedding.weight"] = table
        else:
            sd["class_embedding.weight"] = torch.cat([table, table.new_zeros(1, table.shape[1])], dim=0)

    unused = set(theirs) - used
    if unused:
        raise ValueError(f"cannot map this UNet2DModel to fastddpm.UNet: parameters {sorted(unused)[:5]} have no "
                         "counterpart (unsupported config)")
    ref = next(iter(theirs.values()))
    model.load_state_dict(sd, strict=True)
    model.to(device=ref.device, dtype=ref.dtype)
    model.train(unet2d.training)
    return model


def load_diffusers_pipeline(source: Any) -> Any:
    """A diffusers pipeline from a local pipeline folder (model_index.json, unet/, scheduler/) or a Hub id.

    A folder is read offline (``DiffusionPipeline.from_pretrained(path)``); a name that is not a
    folder goes to the Hub as diffusers does. Raises ValueError for a path that exists but is no
    pipeline folder, ImportError (naming the pip command) without diffusers.
    """
    import os

    try:
        from diffusers import DiffusionPipeline
    except ImportError as exc:  # pragma: no cover - diffusers is a test dependency
        raise ImportError(f"loading a diffusers pipeline needs diffusers: pip install diffusers ({exc})") from exc
    path = os.fspath(source)
    if os.path.exists(path) and not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ValueError(f"{path!r} is not a diffusers pipeline folder (no model_index.json; a folder saved by "
                         "pipeline.save_pretrained holds one)")
    return DiffusionPipeline.from_pretrained(path)

"""`UNetConfig`: the U-Net's hyper-parameters, their validation, and what follows from them.

One home for the configuration of `fastddpm.UNet`: the constructor's arguments are checked here (each
bad value is refused with a one-line ValueError naming the argument and what it accepts), the derived
quantities (channels and resolution of each level, heads of an attention block) are computed here,
and `to_dict()` is the JSON form a checkpoint stores and `UNet(**config)` rebuilds.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

__all__ = ["UNetConfig", "TIME_EMBEDDINGS"]

TIME_EMBEDDINGS = ("add", "scale_shift")


def _int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _real(name: str, value: Any, accepted: str, ok) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return float(value)


def _ints(name: str, value: Any, accepted: str) -> Tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return tuple(_int(f"every entry of {name}", v) for v in value)


@dataclass(frozen=True)
class UNetConfig:
    """The arguments of `fastddpm.UNet` (see its docstring for their meaning), validated on creation.

    `out_channels=None` resolves to in_channels (2 * in_channels with learn_sigma); sequences become tuples.
    """

    image_size: int = 32
    in_channels: int = 3
    base_channels: int = 128
    channel_mults: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    num_heads: int = 1
    head_channels: Optional[int] = None
    time_embedding: str = "add"
    learn_sigma: bool = False
    num_classes: Optional[int] = None
    groups: int = 32
    out_channels: Optional[int] = None
    norm_eps: float = 1e-6
    downsample_padding: int = 0
    flip_sin_to_cos: bool = False
    freq_shift: float = 1.0
    recompute_norm: bool = True

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        for name in ("image_size", "in_channels", "num_res_blocks", "groups"):
            _int(name, getattr(self, name))
        _int("base_channels", self.base_channels, 2)
        for name in ("learn_sigma", "flip_sin_to_cos", "recompute_norm"):
            _flag(name, getattr(self, name))
        set_("channel_mults", _ints("channel_mults", self.channel_mults, "a non-empty sequence of positive ints"))
        if not self.channel_mults:
            raise ValueError("channel_mults must be a non-empty sequence of positive ints, got ()")
        set_("attention_resolutions", _ints("attention_resolutions", self.attention_resolutions,
                                            "a sequence of ints"))
        set_("dropout", _real("dropout", self.dropout, "a float in [0, 1)", lambda v: 0.0 <= v < 1.0))
        set_("norm_eps", _real("norm_eps", self.norm_eps, "a positive float", lambda v: v > 0))
        _real("freq_shift", self.freq_shift, "a finite number", lambda v: True)
        if self.time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(f"time_embedding must be one of {TIME_EMBEDDINGS}, got {self.time_embedding!r}")
        if self.num_classes is not None:
            _int("num_classes", self.num_classes)
        if self.downsample_padding not in (0, 1) or isinstance(self.downsample_padding, bool):
            raise ValueError(f"downsample_padding must be 0 or 1, got {self.downsample_padding!r}")
        if self.base_channels // 2 - self.freq_shift == 0:
            raise ValueError(f"freq_shift must differ from base_channels // 2, got {self.freq_shift!r}")
        set_("out_channels", self._checked_out_channels())
        self._check_levels()
        self._check_heads()

    def _checked_out_channels(self) -> int:
        if self.out_channels is None:
            return self.in_channels * (2 if self.learn_sigma else 1)
        _int("out_channels", self.out_channels)
        if self.learn_sigma and self.out_channels != 2 * self.in_channels:
            raise ValueError(f"with learn_sigma=True out_channels must be 2 * in_channels = {2 * self.in_channels} "
                             f"(or None), got {self.out_channels}")
        return self.out_channels

    def _check_levels(self) -> None:
        factor = 2 ** (self.num_levels - 1)
        if self.image_size % factor:
            raise ValueError(f"image_size must be divisible by 2**(len(channel_mults) - 1) = {factor}, "
                             f"got image_size={self.image_size}")
        for r in self.attention_resolutions:
            if r not in self.resolutions:
                raise ValueError(f"attention_resolutions entries must be resolutions of the levels "
                                 f"{list(self.resolutions)}, got {r!r}")
        if any(c % self.groups for c in self.channels):
            raise ValueError(f"groups must divide base_channels * every channel mult {list(self.channels)}, "
                             f"got groups={self.groups}")

    def _check_heads(self) -> None:
        attn = self.attention_channels
        if self.head_channels is not None:
            _int("head_channels", self.head_channels)
            if self.num_heads != 1:
                raise ValueError(f"give either num_heads or head_channels, not both (num_heads={self.num_heads}, "
                                 f"head_channels={self.head_channels})")
            if any(c % self.head_channels for c in attn):
                raise ValueError(f"head_channels must divide the channels of every attention block {attn}, "
                                 f"got {self.head_channels}")
        else:
            _int("num_heads", self.num_heads)
            if any(c % self.num_heads for c in attn):
                raise ValueError(f"num_heads must divide the channels of every attention block {attn}, "
                                 f"got {self.num_heads}")

    # ---- derived quantities ------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.channel_mults)

    @property
    def resolutions(self) -> Tuple[int, ...]:
        """Image size of each level, from the top."""
        return tuple(self.image_size // 2 ** lvl for lvl in range(self.num_levels))

    @property
    def channels(self) -> Tuple[int, ...]:
        """Channels of each level: base_channels * channel_mults[l]."""
        return tuple(self.base_channels * m for m in self.channel_mults)

    @property
    def temb_channels(self) -> int:
        """Width of the time embedding: 4 * base_channels."""
        return 4 * self.base_channels

    def has_attention(self, level: int) -> bool:
        return self.resolutions[level] in self.attention_resolutions

    @property
    def attention_channels(self) -> list:
        """Channels of every attention block (the levels with attention, and the middle block), sorted."""
        return sorted({c for lvl, c in enumerate(self.channels) if self.has_attention(lvl)} | {self.channels[-1]})

    def heads(self, channels: int) -> int:
        """Attention heads of a block with `channels` channels."""
        return channels // self.head_channels if self.head_channels is not None else self.num_heads

    def replace(self, **changes: Any) -> "UNetConfig":
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """The JSON form (lists for sequences) that checkpoints store; `UNet(**d)` rebuilds the model."""
        d = dataclasses.asdict(self)
        d["channel_mults"] = list(self.channel_mults)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d

"""The compact DDPM U-Net, built on the fused-op boundaries of `fastddpm.ops`.

The layout mirrors diffusers' `UNet2DModel` of the DDPM family (google/ddpm-cifar10-32,
-celebahq-256, -church-256), so that those weights map onto it one to one
(`fastddpm.unet_from_diffusers`, in `fastddpm.interop.diffusers`):

    conv_in (3x3)
    down levels l = 0..L-1 at resolution image_size / 2**l:
        num_res_blocks x [ResBlock (+ AttentionBlock where the resolution is in attention_resolutions)]
        a strided 3x3 convolution (all levels but the last)
    middle: ResBlock, AttentionBlock, ResBlock
    up levels l = L-1..0:
        (num_res_blocks + 1) x [concat(skip) -> ResBlock (+ AttentionBlock)]
        nearest 2x upsampling + 3x3 convolution (all levels but the last)
    GroupNorm + SiLU -> conv_out (3x3)

The time embedding is the sinusoidal embedding of DDPM (sin then cos, frequencies
exp(-ln(10000) * i / (half - freq_shift))), then Linear -> SiLU -> Linear to 4 * base_channels.
Every GroupNorm (with the time embedding folded in, and the SiLU after it) goes through
`fastddpm.ops.group_norm_silu`, every self-attention through `fastddpm.ops.attention`; this module
holds no backend logic.

Cost choices (figures: benchmarks/figures.py, benchmarks/bench_unet.py):
* memory-lean training (`recompute_norm=True`, the default): every GroupNorm(+SiLU) output that feeds a
  convolution (both per ResBlock, the attention's qkv projection, the output norm) is recomputed in
  backward from the norm's input rather than saved (`fastddpm.ops.norm_conv`, a custom autograd function running the
  same backward ops as the plain path, so the gradients are the same);
* all ResBlocks' time projections are one matmul per forward on one stacked parameter (`UNet.time_proj_stack`,
  [sum of the blocks' rows, temb]; each block's `time_proj.weight` / `.bias` is a row view of it): no
  per-forward concatenation (10 MB a step for the CIFAR-10 model, replayed in every CUDA-graph step before),
  only `emb` saved for backward. The state dict keeps diffusers' per-block layout (`...time_proj.weight`
  keys, mapped to and from the stacked rows by state-dict hooks), so checkpoints and interop are unchanged;
* the attention's qkv and output projections are applied as 1x1 convolutions of their Linear weights on
  [B, C, H, W], q/k/v being strided views of the qkv output: no layout transposes or copies around them;
* activations take the layout `fastddpm.ops.preferred_memory_format` names for the device: channels-last on
  the CPU, where oneDNN's convolutions work in NHWC natively (an NCHW input is reordered on every call) and
  the reference ops keep the layout; NCHW where the Triton kernels run (until benchmarks/gpu_check.py has
  timed both layouts on a GPU; `fastddpm.ops.use_memory_format` forces one). The output is contiguous.

Defaults follow the DDPM paper's CIFAR-10 model as released (TF "SAME" padding of the strided
convolution = `downsample_padding=0`, GroupNorm eps 1e-6, `flip_sin_to_cos=False`, `freq_shift=1`).
Improved-DDPM models use `time_embedding="scale_shift"`, and usually `downsample_padding=1`,
`norm_eps=1e-5`.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import ops as _ops
from .guards import check_labels
from .unet_config import UNetConfig

__all__ = ["UNet", "UNetConfig", "timestep_embedding"]

_CONFIG_FIELDS = frozenset(UNetConfig.__dataclass_fields__)


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = False, freq_shift: float = 1.0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] (float32) of timesteps t [N] (DDPM's, diffusers' `Timesteps`).

    Frequencies are exp(-ln(max_period) * i / (dim // 2 - freq_shift)) for i < dim // 2; the
    embedding is [sin, cos] ([cos, sin] with `flip_sin_to_cos`), zero-padded when dim is odd.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t.to(torch.float32)[:, None] * torch.exp(exponent)[None, :]
    parts = [torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)]
    emb = torch.cat(parts, dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm(nn.Module):
    """Affine GroupNorm parameters applied through `fastddpm.ops.group_norm_silu`.

    The state dict holds `weight` and `bias` like `nn.GroupNorm`. `forward(x, add, scale, shift, silu)`
    computes silu?(GroupNorm(x + add) * weight + bias) * (1 + scale) + shift, the time-embedding
    terms being per (sample, channel) [N, C] tensors (see the op's docstring).
    """

    def __init__(self, groups: int, channels: int, eps: float):
        super().__init__()
        self.groups = groups
        self.channels = channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, add: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
                shift: Optional[torch.Tensor] = None, silu: bool = True) -> torch.Tensor:
        return _ops.group_norm_silu(x, self.weight, self.bias, groups=self.groups, eps=self.eps,
                                    add=add, scale=scale, shift=shift, silu=silu)

    def extra_repr(self) -> str:
        return f"{self.groups}, {self.channels}, eps={self.eps}"


def _norm_conv(norm: GroupNorm, conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor], x: torch.Tensor,
               lean: bool, add: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
               shift: Optional[torch.Tensor] = None, silu: bool = True, dropout: Optional[nn.Dropout] = None,
               padding: int = 0) -> torch.Tensor:
    """conv2d(dropout(norm(x, ...))) through `fastddpm.ops.norm_conv` (`lean`: recompute the norm in backward)."""
    p = float(dropout.p) if dropout is not None and dropout.training else 0.0
    return _ops.norm_conv(x, norm.weight, norm.bias, norm.groups, norm.eps, conv_weight, conv_bias, lean,
                          add=add, scale=scale, shift=shift, silu=silu, dropout_p=p, padding=padding)


def _channels_last(x: torch.Tensor) -> bool:
    """Whether x is laid out [N, H, W, C] in memory (and not also plain contiguous)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _lean(module: nn.Module) -> bool:
    """Whether the memory-lean (recompute) path applies: enabled, training, and autograd recording."""
    return module.recompute_norm and module.training and torch.is_grad_enabled()


class _TimeProjRows(nn.Module):
    """A ResBlock's time projection as rows [start, stop) of the U-Net's stacked projection `owner`
    (an nn.Linear held as a plain attribute, not a submodule: its parameters are the U-Net's)."""

    def __init__(self, owner: nn.Linear, start: int, stop: int):
        super().__init__()
        object.__setattr__(self, "_owner", owner)
        self.start, self.stop = start, stop
        self.in_features, self.out_features = owner.in_features, stop - start

    @property
    def weight(self) -> torch.Tensor:
        return self._owner.weight[self.start:self.stop]

    @property
    def bias(self) -> torch.Tensor:
        return self._owner.bias[self.start:self.stop]

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return F.linear(emb, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"rows [{self.start}, {self.stop}) of time_proj_stack, in_features={self.in_features}"


class ResBlock(nn.Module):
    """GroupNorm+SiLU -> conv3x3 -> time embedding -> GroupNorm+SiLU -> dropout -> conv3x3 (zero init), + skip.

    "add": the projected embedding is added per (n, c) before the second norm (DDPM);
    "scale_shift": the projection gives 2C = (scale, shift) applied after the second norm's affine
    (Improved DDPM). `forward(x, emb)` takes the embedding after its SiLU (shared by all blocks);
    `forward(x, None, proj)` takes the block's time projection already computed (the U-Net computes
    all blocks' projections in one matmul): proj [N, C] for "add", a pair (scale, shift) for "scale_shift".
    With `recompute_norm`, in training with autograd on, both GroupNorm+SiLU outputs are recomputed in
    backward instead of being saved by the convolutions that read them.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float,
                 time_embedding: str, groups: int, eps: float, recompute_norm: bool = True):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.time_embedding = time_embedding
        self.recompute_norm = recompute_norm
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(temb_channels, out_channels * (2 if time_embedding == "scale_shift" else 1))
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def proj_sizes(self) -> list:
        """Column sizes of this block's time projection as `forward` takes it (one or two [N, C] parts)."""
        return [self.out_channels] * (2 if self.time_embedding == "scale_shift" else 1)

    def forward(self, x: torch.Tensor, emb: Optional[torch.Tensor], proj=None) -> torch.Tensor:
        lean = _lean(self)
        if proj is None:
            proj = self.time_proj(emb)
            if self.time_embedding == "scale_shift":
                proj = proj.chunk(2, dim=1)
        add, scale, shift = (proj, None, None) if self.time_embedding == "add" else (None, *proj)
        h = _norm_conv(self.norm1, self.conv1.weight, self.conv1.bias, x, lean, padding=1)
        h = _norm_conv(self.norm2, self.conv2.weight, self.conv2.bias, h, lean, add=add, scale=scale, shift=shift,
                       dropout=self.dropout, padding=1)
        skip = x if self.skip is None else self.skip(x)
        return skip + h


class AttentionBlock(nn.Module):
    """Pixel-wise multi-head self-attention: GroupNorm -> qkv -> attention -> proj (zero init), + x.

    `qkv` and `proj` are Linear layers (their weights map one to one to diffusers' to_q/to_k/to_v and
    to_out) applied as 1x1 convolutions on the [B, C, H, W] tensor, so the block needs no layout
    transposes around them: q, k and v are strided views of the qkv output in the attention op's
    [B, heads, N, head_dim] layout. With `recompute_norm` (training, autograd on) the GroupNorm output
    is recomputed in backward instead of being saved by the qkv projection.
    """

    def __init__(self, channels: int, num_heads: int, groups: int, eps: float, recompute_norm: bool = True):
        super().__init__()
        self.channels = channels
        self.num_heads = num_heads
        self.recompute_norm = recompute_norm
        self.norm = GroupNorm(groups, channels, eps)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        heads = self.num_heads
        qkv = _norm_conv(self.norm, self.qkv.weight.reshape(3 * c, c, 1, 1), self.qkv.bias, x, _lean(self),
                         silu=False)  # [B, 3C, H, W]
        q, k, v = qkv.reshape(b, 3, heads, c // heads, hgt * wid).transpose(-1, -2).unbind(1)
        o = _ops.attention(q, k, v)  # [B, heads, N, head_dim]
        if _channels_last(x):  # back to [B, C, H, W] in x's layout (a view when heads == 1)
            o = o.transpose(1, 2).reshape(b, hgt, wid, c).permute(0, 3, 1, 2)
        else:
            o = o.transpose(-1, -2).reshape(b, c, hgt, wid)
        return x + F.conv2d(o, self.proj.weight.reshape(c, c, 1, 1), self.proj.bias)


class Downsample(nn.Module):
    """Strided 3x3 convolution. padding=0 pads right/bottom by one (TF "SAME", the DDPM release)."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: `resnets`, `attentions` (empty, or one per resnet), and `resample` (or None)."""

    def __init__(self, resnets: list, attentions: list, resample: Optional[nn.Module]):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.resample = resample


class MidBlock(nn.Module):
    """ResBlock -> AttentionBlock -> ResBlock at the lowest resolution."""

    def __init__(self, resnet1: ResBlock, attention: AttentionBlock, resnet2: ResBlock):
        super().__init__()
        self.resnet1 = resnet1
        self.attention = attention
        self.resnet2 = resnet2

    def forward(self, x: torch.Tensor, emb: Optional[torch.Tensor], projs: Optional[tuple] = None) -> torch.Tensor:
        """`projs`: the two ResBlocks' time projections already computed (see `ResBlock.forward`), or None."""
        p1, p2 = projs if projs is not None else (None, None)
        return self.resnet2(self.attention(self.resnet1(x, emb, p1)), emb, p2)


def _check_timesteps(t: torch.Tensor, num_timesteps: Optional[int]) -> None:
    """ValueError unless 0 <= t (< num_timesteps when known). Only CPU tensors are read: reading CUDA
    ones would cost a host sync per model call."""
    if t.device.type != "cpu" or t.numel() == 0 or torch.compiler.is_compiling():  # values are data: not traced
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or (num_timesteps is not None and hi >= num_timesteps):
        bound = f"[0, {num_timesteps})" if num_timesteps is not None else ">= 0"
        raise ValueError(f"t must be timesteps in {bound}, got values in [{lo}, {hi}]")


class UNet(nn.Module):
    """The DDPM / Improved-DDPM U-Net. `model(x, t, y=None) -> output [N, out_channels, H, W]`.

    Args:
        image_size: height = width of the inputs; must be divisible by 2**(len(channel_mults) - 1).
        in_channels: image channels.
        base_channels: channels of the first level; the time embedding has 4 * base_channels.
        channel_mults: channels of level l = base_channels * channel_mults[l].
        num_res_blocks: ResBlocks per level on the way down (one more per level on the way up).
        attention_resolutions: resolutions (image sizes of levels, e.g. 16) that get self-attention
            after each ResBlock; the middle block always has one.
        dropout: dropout probability inside the ResBlocks.
        num_heads: attention heads (must divide the channels of every attention block), or
        head_channels: channels per head (then the heads of a block are its channels / head_channels;
            give either this or num_heads, not both).
        time_embedding: "add" (DDPM: added before the second GroupNorm) or "scale_shift"
            (Improved DDPM: GroupNorm, then * (1 + scale) + shift).
        learn_sigma: output 2 * in_channels channels (eps and the variance interpolation v).
        num_classes: class-conditional model with classes 0..num_classes-1; class `num_classes` is the
            null class (classifier-free guidance), used where `y` is None.
        groups: GroupNorm groups (must divide base_channels * every mult).
        out_channels: output channels (default in_channels, doubled with learn_sigma).
        norm_eps: GroupNorm epsilon (1e-6 as in the DDPM release).
        downsample_padding: 0 (pad right/bottom by one, as the DDPM release) or 1 (symmetric).
        flip_sin_to_cos: order [cos, sin] instead of [sin, cos] in the sinusoidal embedding.
        freq_shift: the sinusoidal embedding's frequency denominator is (half_dim - freq_shift).
        recompute_norm: memory-lean training (default on): in training mode with autograd recording,
            every GroupNorm(+SiLU) output that feeds a convolution or the qkv projection is recomputed
            in backward from the norm's input instead of being saved (selective activation
            recomputation at the op boundary; same gradients, about half the activation memory of the
            ResBlocks, at the cost of one more GroupNorm forward each). No effect in eval mode or
            under torch.no_grad. It changes no parameter, so checkpoints load either way; configs
            saved without the key build the default (True). Settable later: `unet.recompute_norm = False`.
    """

    def __init__(self, image_size: int = 32, in_channels: int = 3, base_channels: int = 128,
                 channel_mults: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (16,), dropout: float = 0.1, num_heads: int = 1,
                 head_channels: Optional[int] = None, time_embedding: str = "add", learn_sigma: bool = False,
                 num_classes: Optional[int] = None, groups: int = 32, out_channels: Optional[int] = None,
                 *, norm_eps: float = 1e-6, downsample_padding: int = 0, flip_sin_to_cos: bool = False,
                 freq_shift: float = 1.0, recompute_norm: bool = True):
        super().__init__()
        cfg = UNetConfig(image_size, in_channels, base_channels, channel_mults, num_res_blocks, attention_resolutions,
                         dropout, num_heads, head_channels, time_embedding, learn_sigma, num_classes, groups,
                         out_channels, norm_eps, downsample_padding, flip_sin_to_cos, freq_shift, recompute_norm)
        self.cfg = cfg
        self._build(cfg)
        # every ResBlock in the order forward() runs them (a plain tuple: not registered twice)
        self._resblocks = tuple(m for m in self.modules() if isinstance(m, ResBlock))
        self._stack_time_projections()

    def _build(self, cfg: UNetConfig) -> None:
        """The network: conv_in, time (and class) embedding, down levels, middle, up levels, output."""
        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, cfg.temb_channels, cfg.dropout, cfg.time_embedding, cfg.groups, cfg.norm_eps,
                            cfg.recompute_norm)

        def attn(c: int) -> AttentionBlock:
            return AttentionBlock(c, cfg.heads(c), cfg.groups, cfg.norm_eps, cfg.recompute_norm)

        base, temb = cfg.base_channels, cfg.temb_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, base, 3, padding=1)
        self.time_linear1 = nn.Linear(base, temb)
        self.time_linear2 = nn.Linear(temb, temb)
        self.class_embedding = nn.Embedding(cfg.num_classes + 1, temb) if cfg.num_classes is not None else None

        skip_channels = [base]
        self.down = nn.ModuleList()
        cin = base
        for lvl, cout in enumerate(cfg.channels):
            use_attn = cfg.has_attention(lvl)
            resnets, attentions = [], []
            for _ in range(cfg.num_res_blocks):
                resnets.append(res(cin, cout))
                if use_attn:
                    attentions.append(attn(cout))
                cin = cout
                skip_channels.append(cout)
            resample = None
            if lvl != cfg.num_levels - 1:
                resample = Downsample(cout, cfg.downsample_padding)
                skip_channels.append(cout)
            self.down.append(Level(resnets, attentions, resample))

        self.mid = MidBlock(res(cin, cin), attn(cin), res(cin, cin))

        self.up = nn.ModuleList()
        for lvl in reversed(range(cfg.num_levels)):
            cout = cfg.channels[lvl]
            use_attn = cfg.has_attention(lvl)
            resnets, attentions = [], []
            for _ in range(cfg.num_res_blocks + 1):
                resnets.append(res(cin + skip_channels.pop(), cout))
                if use_attn:
                    attentions.append(attn(cout))
                cin = cout
            resample = Upsample(cout) if lvl != 0 else None
            self.up.append(Level(resnets, attentions, resample))
        assert not skip_channels

        self.norm_out = GroupNorm(cfg.groups, base, cfg.norm_eps)
        self.conv_out = nn.Conv2d(base, cfg.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def config(self) -> Dict[str, Any]:
        """The constructor's arguments as JSON (`UNetConfig.to_dict`): `UNet(**unet.config)` rebuilds the model."""
        return self.cfg.to_dict()

    def __getattr__(self, name: str) -> Any:
        """Config fields read as attributes (`unet.image_size`, `unet.num_classes`, ...): `cfg` holds them once."""
        cfg = self.__dict__.get("cfg")
        if cfg is not None and name in _CONFIG_FIELDS:
            return getattr(cfg, name)
        return super().__getattr__(name)

    @property
    def temb_channels(self) -> int:
        return self.cfg.temb_channels

    @property
    def recompute_norm(self) -> bool:
        """Memory-lean training on/off (see the class docstring); setting it updates every block and `config`."""
        return self.cfg.recompute_norm

    @recompute_norm.setter
    def recompute_norm(self, enabled: bool) -> None:
        self.cfg = self.cfg.replace(recompute_norm=enabled)
        for m in self.modules():
            if isinstance(m, (ResBlock, AttentionBlock)):
                m.recompute_norm = enabled

    def _embedding(self, x: torch.Tensor, t: Union[torch.Tensor, int], y: Optional[torch.Tensor]) -> torch.Tensor:
        n = x.shape[0]
        if not torch.is_tensor(t):
            try:  # an int or a numpy int; a float or a bool is refused
                if isinstance(t, bool):
                    raise TypeError
                t = operator.index(t)
            except TypeError:
                raise ValueError(f"t must be an integer timestep (int64 tensor [N] or an int), got {t!r}") from None
            t = torch.full((n,), t, device=x.device)
        elif t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"t must hold integer timesteps (int64), got dtype {t.dtype}")
        elif t.dim() == 0:
            t = t.reshape(1).expand(n)
        elif t.shape != (n,):
            raise ValueError(f"t must have shape [N] = [{n}] or be a scalar, got shape {tuple(t.shape)}")
        _check_timesteps(t, getattr(self, "num_timesteps", None))
        dtype = self.time_linear1.weight.dtype
        emb = timestep_embedding(t.to(x.device), self.cfg.base_channels, self.cfg.flip_sin_to_cos, self.cfg.freq_shift)
        emb = self.time_linear2(F.silu(self.time_linear1(emb.to(dtype))))
        if self.class_embedding is not None:
            if y is None:
                y = torch.full((n,), self.cfg.num_classes, dtype=torch.long, device=x.device)
            elif not torch.is_tensor(y) or y.shape != (n,) or y.dtype.is_floating_point or y.dtype == torch.bool:
                raise ValueError(f"y must be an integer tensor of shape [N] = [{n}] with labels in "
                                 f"[0, {self.cfg.num_classes}] (num_classes = null class) or None")
            elif y.device.type == "cpu" and not torch.compiler.is_compiling():  # CUDA: would sync every step
                check_labels(y, self.cfg.num_classes, "y")
            emb = emb + self.class_embedding(y.to(x.device))
        elif y is not None:
            raise ValueError("y (class labels) was given but the UNet has num_classes=None")
        return emb

    def forward(self, x: torch.Tensor, t: Union[torch.Tensor, int], y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Model output [N, out_channels, H, W] for x_t [N, in_channels, H, W] at timesteps t [N] (int64, or a
        scalar broadcast to the batch), with class labels y [N] (None: the null class) when num_classes is set."""
        if not torch.is_tensor(x):
            raise ValueError(f"x must be a torch.Tensor [N, C, H, W], got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.cfg.in_channels or x.shape[2] != self.cfg.image_size \
                or x.shape[3] != self.cfg.image_size:
            raise ValueError(f"x must have shape [N, {self.cfg.in_channels}, {self.cfg.image_size}, {self.cfg.image_size}] "
                             f"(in_channels, image_size), got {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"x must be a floating-point tensor (images in [-1, 1]), got dtype {x.dtype}")
        if x.dtype != self.conv_in.weight.dtype:  # e.g. float64 input to a float32 model: run in the model's dtype
            x = x.to(self.conv_in.weight.dtype)
        emb = F.silu(self._embedding(x, t, y))  # every ResBlock's projection starts with SiLU
        projs = iter(self._time_projections(emb))
        # Activations run in the layout the ops prefer on this device (channels-last on the CPU: NHWC is
        # oneDNN's native convolution layout); every block keeps its input's layout.
        x = x.contiguous(memory_format=_ops.preferred_memory_format(x))

        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for i, resnet in enumerate(level.resnets):
                h = resnet(h, None, next(projs))
                if len(level.attentions):
                    h = level.attentions[i](h)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)

        h = self.mid(h, None, (next(projs), next(projs)))

        for level in self.up:
            for i, resnet in enumerate(level.resnets):
                h = resnet(torch.cat([h, skips.pop()], dim=1), None, next(projs))
                if len(level.attentions):
                    h = level.attentions[i](h)
            if level.resample is not None:
                h = level.resample(h)

        out = _norm_conv(self.norm_out, self.conv_out.weight, self.conv_out.bias, h,
                         self.recompute_norm and self.training and torch.is_grad_enabled(), padding=1)
        return out.contiguous()

    def _stack_time_projections(self) -> None:
        """Move every ResBlock's time projection into one stacked nn.Linear (`time_proj_stack`, rows in
        forward order, initialised with the blocks' own initial weights) and give each block a row view;
        register the state-dict hooks that keep the per-block keys."""
        blocks = self._resblocks
        names = {id(m): n for n, m in self.named_modules() if isinstance(m, ResBlock)}
        self._time_proj_keys = tuple(f"{names[id(b)]}.time_proj" for b in blocks)
        temb = blocks[0].time_proj.in_features
        self.time_proj_stack = nn.Linear(temb, sum(b.time_proj.out_features for b in blocks))
        with torch.no_grad():
            self.time_proj_stack.weight.copy_(torch.cat([b.time_proj.weight for b in blocks]))
            self.time_proj_stack.bias.copy_(torch.cat([b.time_proj.bias for b in blocks]))
        start = 0
        for b in blocks:
            stop = start + b.time_proj.out_features
            b.time_proj = _TimeProjRows(self.time_proj_stack, start, stop)
            start = stop
        self.register_state_dict_post_hook(_per_block_time_proj_keys)
        self.register_load_state_dict_pre_hook(_stacked_time_proj_keys)

    def _time_projections(self, emb: torch.Tensor) -> list:
        """Every ResBlock's time projection in one matmul on the stacked parameter (`time_proj_stack`; no
        concatenation per forward, only `emb` saved for backward). Returns, per block in forward order,
        what `ResBlock.forward` takes as `proj` (column views of the one [N, rows] result)."""
        blocks = self._resblocks
        proj = F.linear(emb, self.time_proj_stack.weight, self.time_proj_stack.bias)
        parts = proj.split([s for b in blocks for s in b.proj_sizes()], dim=1)
        out, i = [], 0
        for b in blocks:
            if b.time_embedding == "add":
                out.append(parts[i])
                i += 1
            else:
                out.append((parts[i], parts[i + 1]))
                i += 2
        return out


def _per_block_time_proj_keys(module: "UNet", state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: the stacked time projection as diffusers' per-block `time_proj` keys
    (copies, not views of one storage: safetensors refuses shared storages)."""
    weight = state_dict.pop(prefix + "time_proj_stack.weight")
    bias = state_dict.pop(prefix + "time_proj_stack.bias")
    for key, b in zip(module._time_proj_keys, module._resblocks):
        rows = b.time_proj
        state_dict[f"{prefix}{key}.weight"] = weight[rows.start:rows.stop].clone()
        state_dict[f"{prefix}{key}.bias"] = bias[rows.start:rows.stop].clone()


def _stacked_time_proj_keys(module: "UNet", state_dict: dict, prefix: str, local_metadata, strict: bool,
                            missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """load_state_dict pre-hook: per-block `time_proj` keys -> the stacked parameter (when every block's
    pair is present; otherwise the keys are left for load_state_dict to report as missing/unexpected)."""
    keys = [f"{prefix}{k}.{p}" for k in module._time_proj_keys for p in ("weight", "bias")]
    if not all(k in state_dict for k in keys):
        return
    for p in ("weight", "bias"):
        state_dict[f"{prefix}time_proj_stack.{p}"] = torch.cat(
            [state_dict.pop(f"{prefix}{k}.{p}") for k in module._time_proj_keys])

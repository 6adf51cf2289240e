"""Model calls in reduced precision while the sampler's state stays fp32.

`reduced_precision(model, torch.bfloat16)` returns a module that runs a bf16 (or fp16) copy of the
model's weights on x cast to that dtype and returns the output as fp32, so the sampler's x, its
previous x0-hat and the coefficient tables stay fp32 and only the network is cheaper. Weights are cast
once (a copy: the caller's model is untouched) rather than autocast per call: measured on the DDPM
CIFAR-10 U-Net (benchmarks/bench_dtype.py), autocast re-casts every conv weight at every call and was
slower than the cast copy on both CPUs tried. GroupNorm statistics stay fp32 inside the fused op.
"""
from __future__ import annotations

import copy
from typing import Any, Optional, Union

import torch

__all__ = ["DTYPES", "parse_dtype", "reduced_precision", "ReducedPrecisionModel"]

# --dtype names -> torch dtypes
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def parse_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """None, "fp32" / "bf16" / "fp16" (or "float32", "bfloat16", "float16") or a torch dtype -> torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str):
        alias = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float": "fp32",
                 "float64": "fp64", "double": "fp64"}
        key = alias.get(dtype, dtype)
        if key in DTYPES:
            return DTYPES[key]
    raise ValueError(f"dtype must be one of {tuple(DTYPES)} (or the torch dtypes float32, bfloat16, float16), got {dtype!r}")


class ReducedPrecisionModel(torch.nn.Module):
    """model(x, t, **kw) evaluated in `dtype` on x.to(dtype); the output comes back as float32."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype
        for name in ("in_channels", "image_size", "num_classes"):  # what samplers read off a fastddpm UNet
            if hasattr(model, name):
                setattr(self, name, getattr(model, name))

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out = self.model(x.to(self.dtype), t, **kwargs)
        if not isinstance(out, torch.Tensor):
            out = out.sample  # diffusers' UNet2DModel output
        return out.float()


def reduced_precision(model: Any, dtype: Union[None, str, torch.dtype]) -> Any:
    """`model` itself for fp32 / None (or a model whose weights already have `dtype`'s precision and
    take fp32 inputs), else a ReducedPrecisionModel around a copy of it with weights cast to `dtype`."""
    dtype = parse_dtype(dtype)
    if dtype is None or dtype == torch.float32:
        return model
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"dtype={dtype} needs a torch.nn.Module model (its weights are cast), got {type(model).__name__}")
    param = next(iter(model.parameters()), None)
    inner = model if param is not None and param.dtype == dtype else copy.deepcopy(model).to(dtype)
    return ReducedPrecisionModel(inner, dtype)

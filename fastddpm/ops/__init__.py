"""Fused ops as torch custom ops (namespace `fastddpm`).

Each op has a plain-PyTorch reference implementation (the oracle of its tests and the path used
where Triton or a GPU is missing), a Triton implementation from `kernels/` for CUDA tensors, a fake
implementation for tracing, and an autograd formula. See `backend.py` for how the path is chosen.
"""
from .backend import current_backend, preferred_memory_format, triton_available, use_backend, use_memory_format
from .group_norm import group_norm_silu
from .attention import attention
from .sampler_step import sampler_step, sampler_step_
from .fused import dropout_noise, norm_conv

__all__ = ["group_norm_silu", "attention", "sampler_step", "sampler_step_", "use_backend", "current_backend", "triton_available",
           "preferred_memory_format", "use_memory_format", "norm_conv", "dropout_noise"]

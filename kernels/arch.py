"""The NVIDIA architectures the kernels are configured and compiled for, and their shared-memory limits.

Configs are chosen per architecture (`arch_of`): what fits and what is fast differs in shared memory per
block and in the tensor-core instruction family, while the register file (64K 32-bit registers per SM,
255 per thread) is the same on every arch listed here.

    arch  GPUs                                      shared memory / block   tensor cores (Triton)
    80    A100, A30 (sm_80); Jetson Orin (sm_87)    163 KiB                 mma.sync
    86    A10, A40, RTX 30xx (sm_86)                 99 KiB                 mma.sync
    89    L4, L40, RTX 40xx (sm_89)                  99 KiB                 mma.sync
    90    H100, H200 (sm_90)                        227 KiB                 wgmma
    100   B200, GB200 (sm_100)                      227 KiB                 tcgen05
    120   RTX 50xx, RTX PRO 6000 Blackwell (sm_120)  99 KiB                 mma.sync

Shared memory is the opt-in maximum per block (what `cudaFuncSetAttribute` /
CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN allow, and what Triton checks before a launch):
the CUDA C++ Programming Guide, "Technical Specifications per Compute Capability", row "Maximum amount
of shared memory per thread block" (163 KB for 8.0 / 8.7, 99 KB for 8.6 / 8.9 / 12.x, 227 KB for 9.0 /
10.x; KB there means 1024 bytes). A kernel whose `metadata.shared` is above its arch's limit raises
OutOfResources at its first launch.
"""
from __future__ import annotations

from typing import Dict, Tuple

__all__ = ["ARCHS", "EXTRA_ARCHS", "SHARED_LIMIT_BYTES", "arch_of"]

# Compiled by the AOT gate on every run (kernels/aot.py, tests/kernels/test_aot.py).
ARCHS: Tuple[int, ...] = (80, 86, 89, 90)
# Configured and compilable with triton >= 3.9 (`python benchmarks/kernel_report.py --arch 100 120`), not in
# the default gate (compile time; no such GPU has run these kernels): the head_dim-256 attention programs are
# checked spill-free there; seven other programs keep 8-56 byte stack frames (docs/kernels.md).
EXTRA_ARCHS: Tuple[int, ...] = (100, 120)
SHARED_LIMIT_BYTES: Dict[int, int] = {
    80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024,
}


def arch_of(capability: Tuple[int, int]) -> int:
    """The config table of a device of compute capability (major, minor): 80, 86, 89, 90, 100 or 120.

    Unlisted capabilities take the table of the closest listed arch that is not larger in shared memory:
    8.7 (Orin, 163 KiB) -> 80; 10.x and 11.x (227 KiB, tcgen05) -> 100; 12.x -> 120; anything older than
    8.0 or unknown -> 86 (the smallest-shared-memory Ampere table; Triton's own support ends there).
    """
    major, minor = capability
    if major == 8:
        return {0: 80, 6: 86, 7: 80, 9: 89}.get(minor, 86)
    if major == 9:
        return 90
    if major in (10, 11):
        return 100
    if major >= 12:
        return 120
    return 86

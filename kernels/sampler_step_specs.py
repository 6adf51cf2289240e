"""Traffic model and ahead-of-time spec lists of the fused sampler-step kernels in `kernels/sampler_step.py`.

The model counts each tensor pass once (``hbm_bytes_fused``: every input read once, x_prev and x0 written
once) against the eager PyTorch sequence of the same step (``hbm_bytes_unfused``, one kernel per op);
``aot_specs()`` lists the programs the AOT gate compiles (`kernels/aot.py`).
"""
from __future__ import annotations

from typing import List

from .sampler_step import (CONFIGS, ENABLE_FP_FUSION, INPLACE_CONFIG, NOISE_GIVEN, NOISE_NONE, NOISE_PHILOX, STEP_STREAM,
                           _sampler_step_inplace_kernel, _sampler_step_kernel)

__all__ = ["aot_specs", "hbm_bytes_fused", "hbm_bytes_unfused", "hbm_bytes_inplace_unfused", "REPORT_SHAPE"]


# Representative shape of the report: a CIFAR-sized batch, x [256, 3, 32, 32] fp32.
REPORT_SHAPE = (256, 3, 32, 32)

# Specializations compiled for the report: the heaviest in registers (in-kernel Philox + learned-range
# sigma + clip: DDPM), DPM-Solver++ 2M (one history tensor, no noise), SDE-DPM-Solver++(3M) (two history
# tensors and Philox) and UniPC-3 (three history tensors: the most loads).
_VARIANTS = [
    ("ddpm_learned_philox", dict(CLIP=True, LEARNED=True, NUM_HIST=0, NOISE_MODE=NOISE_PHILOX)),
    ("dpmpp_2m", dict(CLIP=False, LEARNED=False, NUM_HIST=1, NOISE_MODE=NOISE_NONE)),
    ("dpmpp_3m_sde", dict(CLIP=False, LEARNED=False, NUM_HIST=2, NOISE_MODE=NOISE_PHILOX)),
    ("unipc_3", dict(CLIP=False, LEARNED=False, NUM_HIST=3, NOISE_MODE=NOISE_NONE)),
]


def hbm_bytes_fused(numel: int, elem_bytes: int, learned: bool, num_hist: int, noise_given: bool) -> int:
    """Modelled HBM bytes of the fused kernel: each input read once (`num_hist` history tensors; a bool
    counts as 0 / 1), x_prev and x0 written once."""
    reads = 1 + (2 if learned else 1) + int(num_hist) + (1 if noise_given else 0)
    writes = 2
    return (reads + writes) * numel * elem_bytes


def hbm_bytes_unfused(numel: int, elem_bytes: int, learned: bool, num_hist: int, clip: bool,
                      philox: bool, noise_given: bool) -> int:
    """Modelled HBM bytes of the eager PyTorch sequence of the same step (one kernel per op).

    Each elementwise op reads its tensor operands and writes its result (scalars from the coefficient
    table are free); tensors of size `numel` x elem_bytes. The sequence:
      A*x (r1 w1), B*m (r1 w1), add -> x0 (r2 w1), clamp (r1 w1) if clip,
      P*x0 (r1 w1), Q*x (r1 w1), add (r2 w1), R*m (r1 w1), add (r2 w1), per history tensor
      [P_k*x0_prev_k (r1 w1), add (r2 w1)],
      noise: randn (w1) when drawn on the host path, sigma*z (r1 w1), add (r2 w1) -- with learned range
      sigma is a tensor: (v+1)/2 (r1 w1), f*LOG_MAX (r1 w1), (1-f) (r1 w1), *LOG_MIN (r1 w1), add (r2 w1),
      *0.5 (r1 w1), exp (r1 w1), *SIGMA (r1 w1), then sigma*z reads two tensors (r2 w1).
    """
    passes = 0
    passes += 2 + 2 + 3  # A*x, B*m, add
    if clip:
        passes += 2
    passes += 2 + 2 + 3 + 2 + 3  # P*x0, Q*x, add, R*m, add
    passes += (2 + 3) * int(num_hist)
    if philox or noise_given:
        if philox:
            passes += 1  # torch.randn writes the noise tensor
        if learned:
            passes += 2 + 2 + 2 + 2 + 3 + 2 + 2 + 2  # sigma tensor from v
            passes += 3  # sigma * z, both tensors
        else:
            passes += 2  # sigma * z
        passes += 3  # mean + sigma*z
    return passes * numel * elem_bytes


def hbm_bytes_inplace_unfused(numel: int, elem_bytes: int, learned: bool, num_hist: int, clip: bool,
                              philox: bool) -> int:
    """Modelled HBM bytes of the unfused in-place step: the eager sequence of `hbm_bytes_unfused`, then
    copying x_prev into x (r1 w1) and shifting the history (one copy, r1 w1, per history buffer: the
    oldest first, x0 into x0_prev last); step += 1 and the gather of the next model timestep move a few
    bytes and are not counted."""
    copies = 2 + 2 * int(num_hist)
    return hbm_bytes_unfused(numel, elem_bytes, learned, num_hist, clip, philox, False) + copies * numel * elem_bytes


def _config_specs(kernel: str, fn, signature: dict, flags: dict, fused: int, unfused: int,
                  configs=CONFIGS) -> List[dict]:
    """The AOT specs of one kernel variant, one per config (BLOCK, warps) it launches with."""
    return [dict(kernel=kernel, config=f"BLOCK={block},warps={warps}", fn=fn, signature=signature,
                 constexprs=dict({"HAS_MASK": False}, **flags, STREAM=STEP_STREAM, BLOCK=block), num_warps=warps,
                 num_stages=1,
                 options={"enable_fp_fusion": ENABLE_FP_FUSION}, hbm_bytes_fused=fused,
                 hbm_bytes_unfused=unfused, shape="x [256, 3, 32, 32] fp32")
            for block, warps in configs]


def aot_specs() -> List[dict]:
    """One AOT spec per (kernel, variant, config), fp32 tensors, for the AOT report: the functional
    kernel at every autotune config and the in-place one (FastSampler's step) at INPLACE_CONFIG.

    HBM figures are for x = REPORT_SHAPE = [256, 3, 32, 32] fp32 (model output [256, 6, 32, 32] for
    the learned-range variant).
    """
    numel = 1
    for s in REPORT_SHAPE:
        numel *= s
    specs = []
    flag_types = {"CLIP": "constexpr", "LEARNED": "constexpr", "NUM_HIST": "constexpr", "NOISE_MODE": "constexpr",
                  "STREAM": "constexpr", "HAS_MASK": "constexpr", "BLOCK": "constexpr"}
    known = {"KNOWN": "*fp32", "MASKT": "*fp32"}
    history = {"X0P": "*fp32", "X0P2": "*fp32", "X0P3": "*fp32"}
    signature = {
        "X": "*fp32", "M": "*fp32", **history, "NOISE": "*fp32", "COEF": "*fp32", "STEP": "*i64",
        "SEED": "*i64", "XOUT": "*fp32", "X0OUT": "*fp32", "E": "i32", "m_image_stride": "i32",
        "image_offset": "i32", "NCOL": "i32", **known, **flag_types,
    }
    for name, flags in _VARIANTS:
        fused = hbm_bytes_fused(numel, 4, flags["LEARNED"], flags["NUM_HIST"], flags["NOISE_MODE"] == NOISE_GIVEN)
        unfused = hbm_bytes_unfused(numel, 4, flags["LEARNED"], flags["NUM_HIST"], flags["CLIP"],
                                    flags["NOISE_MODE"] == NOISE_PHILOX, flags["NOISE_MODE"] == NOISE_GIVEN)
        specs += _config_specs(f"sampler_step[{name}]", _sampler_step_kernel, signature, flags, fused, unfused)
    # The in-place launcher (FastSampler's one op per step): Philox or no noise, never a noise tensor.
    inplace_signature = {
        "X": "*fp32", "M": "*fp32", **history, "COEF": "*fp32", "STEP": "*i64", "SEED": "*i64",
        "MODEL_T": "*i64", "TOUT": "*i64", "DONE": "*i32", "E": "i32", "m_image_stride": "i32",
        "image_offset": "i32", "NCOL": "i32", "S": "i32", "NT": "i32", **known, **flag_types,
    }
    for name, flags in _VARIANTS:
        # in place: reads x, m (2C with learned range) and the history; writes x and the history
        k = flags["NUM_HIST"]
        fused = ((1 + (2 if flags["LEARNED"] else 1) + k) + (1 + k)) * numel * 4
        unfused = hbm_bytes_inplace_unfused(numel, 4, flags["LEARNED"], k, flags["CLIP"],
                                            flags["NOISE_MODE"] == NOISE_PHILOX)
        specs += _config_specs(f"sampler_step_inplace[{name}]", _sampler_step_inplace_kernel, inplace_signature,
                               flags, fused, unfused, [INPLACE_CONFIG])
    specs += _masked_specs(numel, signature, inplace_signature)
    return specs


# Inpainting's few-step mode: UniPC-3 (the most loads) with the known-region replacement (two more reads).
_MASKED_VARIANT = ("unipc_3_inpaint", dict(CLIP=False, LEARNED=False, NUM_HIST=3, NOISE_MODE=NOISE_PHILOX,
                                           HAS_MASK=True))
# the unfused replacement: KA*known, KZ*z, add, mask*target, 1-mask, (1-mask)*x_prev, add
_MASKED_UNFUSED_PASSES = 2 + 2 + 3 + 3 + 2 + 3 + 3


def _masked_specs(numel: int, signature: dict, inplace_signature: dict) -> List[dict]:
    """AOT specs of the masked variant, functional (every autotune config) and in place (INPLACE_CONFIG:
    FastSampler's inpainting step)."""
    name, flags = _MASKED_VARIANT
    k = flags["NUM_HIST"]
    extra_unfused = _MASKED_UNFUSED_PASSES * numel * 4
    fused = hbm_bytes_fused(numel, 4, False, k, False) + 2 * numel * 4
    unfused = hbm_bytes_unfused(numel, 4, False, k, False, True, False) + extra_unfused
    out = _config_specs(f"sampler_step[{name}]", _sampler_step_kernel, signature, flags, fused, unfused)
    fused = ((1 + 1 + k + 2) + (1 + k)) * numel * 4
    unfused = hbm_bytes_inplace_unfused(numel, 4, False, k, False, True) + extra_unfused
    return out + _config_specs(f"sampler_step_inplace[{name}]", _sampler_step_inplace_kernel, inplace_signature,
                               flags, fused, unfused, [INPLACE_CONFIG])

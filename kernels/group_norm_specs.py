"""Traffic model and ahead-of-time spec lists of the GroupNorm(+SiLU) kernels in `kernels/group_norm.py`.

Modelled HBM traffic, forward + backward, 32x128x64x64 bf16, groups=32, affine + scale/shift + SiLU
(E = 16,777,216 elements, one pass over an [N, C, H, W] bf16 tensor = 2E = 33,554,432 bytes; small
[C], [N, C] and [N, G] tensors counted exactly in ``modelled_hbm_bytes``):

    fused forward   read x (stats), read x + write y (apply)                           3 passes
    fused backward  read dy, x (sums), read dy, x + write dx                           5 passes
    fused total                                                                        8 passes
    eager forward   native_group_norm: read x (moments), read x + write y              3
                    y * (1 + scale): read y, write t1                                  2
                    t1 + shift:     read t1, write t2                                  2
                    silu(t2):       read t2, write out                                 2   -> 9
    eager backward  silu_backward: read dout, t2, write dt2                            3
                    dshift = dt2.sum(hw): read dt2                                     1
                    d t1 -> dy = dt2 * (1 + scale): read, write                        2
                    dscale = (dt2 * y).sum(hw): read dt2, y, write tmp; read tmp       4
                    native_group_norm_backward: read dy, x (sums); read dy, x, write dx 5  -> 15
    eager total                                                                        24 passes
    => fused / unfused = 268,593,152 / 805,381,632 bytes = 0.3335  (target <= 0.45)
       (forward 100,688,384 vs 302,031,360; backward 167,904,768 vs 503,350,272)
    (exact figures incl. small tensors: ``modelled_hbm_bytes(32, 128, 64, 64, 32, 2)``)
    Groups that fit one tile (CIFAR-10 shapes, e.g. 128x256x16x16) take 2 + 3 passes: ratio 0.210.

Saved for backward: fused keeps x (the op's input) + mean/rstd (2 x N*G fp32); eager autograd keeps
x, y (for mul's dscale), t2 (silu's input), mean/rstd: two extra full activations (2 x 33.5 MB here).
The second read of x in each fused pass usually hits L2 (a 32 KiB group, a few programs per SM), so
the measured DRAM traffic is closer to 2 + 3 passes; the model counts every pass.
"""
from __future__ import annotations

from typing import Optional

import torch

from .group_norm import (CONFIGS, _FP_FUSION, _align, _gn_bwd_dx_kernel, _gn_bwd_reduce_kernel, _gn_bwd_single_kernel,
                         _gn_fwd_kernel, _gn_fwd_single_kernel, _gn_stats_kernel, _single_tile, _tiles)

__all__ = ["modelled_hbm_bytes", "aot_specs"]

def modelled_hbm_bytes(n: int, c: int, h: int, w: int, groups: int, elem_bytes: int = 2,
                       param_bytes: Optional[int] = None) -> dict[str, int]:
    """Modelled HBM bytes of group_norm_silu (affine + scale/shift + SiLU, no add), forward + backward.

    Returns a dict with fused_fwd, fused_bwd, fused, unfused_fwd, unfused_bwd, unfused,
    saved_fused, saved_unfused (bytes kept for backward). Every kernel pass over an activation tensor
    is counted as a full read/write (see the module docstring for the pass list); groups that fit
    one tile (next_pow2(CPG) * next_pow2(HW) <= SINGLE_MAX) take the single-tile kernels: 2 + 3 passes.
    """
    pb = elem_bytes if param_bytes is None else param_bytes
    act = n * c * h * w * elem_bytes          # one pass over an activation tensor
    chan = c * pb                              # weight or bias
    nc = n * c * pb                            # scale, shift or their grads
    stats = n * groups * 4                     # mean or rstd (fp32)
    nc32 = n * c * 4                           # fp32 [N, C] partial
    if _single_tile(c // groups, h * w) is not None:
        # single-tile kernels: the group stays in registers, one read per input
        fused_fwd = 2 * act + 2 * chan + 2 * nc + 2 * stats
        fused_bwd = 3 * act + 2 * chan + 2 * nc + 2 * stats
    else:
        fused_fwd = 3 * act + 2 * chan + 2 * nc + 2 * stats
        fused_bwd = (2 * act + 2 * chan + 2 * nc + 2 * stats             # pass 1 reads
                     + 3 * act + 2 * chan + 2 * nc + 2 * stats)          # pass 2
    fused_bwd += (2 * nc + 2 * nc32                                      # dscale, dshift, dw/db partials
                  + 2 * nc32 + 2 * chan)                                 # torch sum over N
    # eager: native_group_norm (moments pass + apply pass), mul, add, silu
    unfused_fwd = (3 * act + 2 * chan + 2 * stats) + (2 * act + nc) + (2 * act + nc) + 2 * act + 2 * nc
    unfused_bwd = (3 * act                      # silu_backward
                   + act + nc                   # dshift = sum_hw
                   + 2 * act + nc               # d(t1) * (1 + scale)
                   + 4 * act + nc               # dscale: mul -> tmp, sum
                   + 5 * act + 2 * stats + 2 * chan + 2 * chan)  # native_group_norm_backward
    return {
        "fused_fwd": fused_fwd, "fused_bwd": fused_bwd, "fused": fused_fwd + fused_bwd,
        "unfused_fwd": unfused_fwd, "unfused_bwd": unfused_bwd, "unfused": unfused_fwd + unfused_bwd,
        "saved_fused": act + 2 * stats, "saved_unfused": 3 * act + 2 * stats,
    }


_AOT_SHAPE = (32, 128, 64, 64, 32)  # N, C, H, W, groups


def aot_specs() -> list[dict]:
    """One dict per kernel per config, all options on (add, affine, scale, shift, SiLU: the largest
    variant): the looped/split kernels for every CONFIGS entry in bf16 (plus gn_fwd and gn_bwd_dx in
    fp32 at BLOCK=1024, 8 warps), and the single-tile kernels at the three group shapes of the DDPM CIFAR-10
    U-Net (4x1024, 8x256, 8x64) in bf16.

    Tile split of the looped kernels: 32x128x64x64, 32 groups (CPG=4, HW=4096; the split path of
    1x128x256x256 has the same tiles). hbm_bytes_* on every row are the modelled forward+backward
    totals of the whole op at 32x128x64x64 bf16 (looped path there; see modelled_hbm_bytes).
    """
    n, c, h, w, groups = _AOT_SHAPE
    cpg, hw = c // groups, h * w
    model = modelled_hbm_bytes(n, c, h, w, groups, 2)
    flags = dict(HAS_ADD=True, HAS_W=True, HAS_B=True, HAS_SCALE=True, HAS_SHIFT=True, SILU=True,
                 CHANNELS_LAST=False, ALIGN=1)
    ints = {"C": "i32", "VS": "i32", "HW": "i32", "CPG": "i32", "G": "i32", "HW_PER_SPLIT": "i32", "S": "i32"}
    specs = []
    for ci, (block, warps) in enumerate(CONFIGS):
        bc, bhw = _tiles(block, cpg, hw)
        tiles = dict(BLOCK_C=bc, BLOCK_HW=bhw, BLOCK=block)
        for dt in (["bf16", "fp32"] if ci == 1 else ["bf16"]):
            p = "*" + dt
            kernels = [
                ("gn_stats", _gn_stats_kernel,
                 {"X": p, "ADD": p, "PMEAN": "*fp32", "PM2": "*fp32", **ints},
                 dict(HAS_ADD=True, CHANNELS_LAST=False, ALIGN=1)),
                ("gn_fwd", _gn_fwd_kernel,
                 {"X": p, "ADD": p, "W": p, "B": p, "SCALE": p, "SHIFT": p, "Y": p, "MEAN": "*fp32",
                  "RSTD": "*fp32", "PMEAN": "*fp32", "PM2": "*fp32", **ints, "eps": "fp32"},
                 dict(flags, FUSED_STATS=True)),
                ("gn_fwd_split", _gn_fwd_kernel,
                 {"X": p, "ADD": p, "W": p, "B": p, "SCALE": p, "SHIFT": p, "Y": p, "MEAN": "*fp32",
                  "RSTD": "*fp32", "PMEAN": "*fp32", "PM2": "*fp32", **ints, "eps": "fp32"},
                 dict(flags, FUSED_STATS=False)),
                ("gn_bwd_reduce", _gn_bwd_reduce_kernel,
                 {"DY": p, "X": p, "ADD": p, "W": p, "B": p, "SCALE": p, "SHIFT": p, "MEAN": "*fp32",
                  "RSTD": "*fp32", "PSG": "*fp32", "PSGY": "*fp32", **ints},
                 flags),
                ("gn_bwd_dx", _gn_bwd_dx_kernel,
                 {"DY": p, "X": p, "ADD": p, "W": p, "B": p, "SCALE": p, "SHIFT": p, "MEAN": "*fp32",
                  "RSTD": "*fp32", "PSG": "*fp32", "PSGY": "*fp32", "DX": p, "DADD": p, "DSCALE": p,
                  "DSHIFT": p, "DWP": "*fp32", "DBP": "*fp32", **ints},
                 dict(flags, FUSED=True)),
                ("gn_bwd_dx_split", _gn_bwd_dx_kernel,
                 {"DY": p, "X": p, "ADD": p, "W": p, "B": p, "SCALE": p, "SHIFT": p, "MEAN": "*fp32",
                  "RSTD": "*fp32", "PSG": "*fp32", "PSGY": "*fp32", "DX": p, "DADD": "*fp32",
                  "DSCALE": p, "DSHIFT": p, "DWP": "*fp32", "DBP": "*fp32", **ints},
                 dict(flags, FUSED=False)),
            ]
            if dt == "fp32":  # fp32 rows: only the base-path kernels, at one config (compile time)
                kernels = [k for k in kernels if k[0] in ("gn_fwd", "gn_bwd_dx")]
            for name, fn, sig, consts in kernels:
                specs.append(_spec(name, f"BLOCK={block},warps={warps},{dt}", fn, sig,
                                   dict(consts, **tiles), warps, model))
    # single-tile kernels at the DDPM CIFAR-10 group shapes: 128 ch @ 32x32 (4 x 1024),
    # 256 ch @ 16x16 (8 x 256), 256 ch @ 8x8 (8 x 64); 32 groups, bf16
    for cpg_s, hw_s in ((4, 1024), (8, 256), (8, 64)):
        bc, bhw, warps = _single_tile(cpg_s, hw_s)
        bwd_warps = _single_tile(cpg_s, hw_s, backward=True)[2]
        p = "*bf16"
        cfg = f"TILE={bc}x{bhw},warps={warps},bf16"
        specs.append(_spec("gn_fwd_single", cfg, _gn_fwd_single_kernel,
                           {"X": p, "ADD": p, "W": p, "B": p, "SCALE": p, "SHIFT": p, "Y": p,
                            "MEAN": "*fp32", "RSTD": "*fp32", "C": "i32", "VS": "i32", "HW": "i32", "CPG": "i32",
                            "G": "i32", "eps": "fp32"},
                           dict(flags, BLOCK_C=bc, BLOCK_HW=bhw), warps, model))
        specs.append(_spec("gn_bwd_single", f"TILE={bc}x{bhw},warps={bwd_warps},bf16", _gn_bwd_single_kernel,
                           {"DY": p, "X": p, "ADD": p, "W": p, "B": p, "SCALE": p, "SHIFT": p,
                            "MEAN": "*fp32", "RSTD": "*fp32", "DX": p, "DADD": p, "DSCALE": p,
                            "DSHIFT": p, "DWP": "*fp32", "DBP": "*fp32", "C": "i32", "VS": "i32", "HW": "i32",
                            "CPG": "i32", "G": "i32"},
                           dict(flags, BLOCK_C=bc, BLOCK_HW=bhw), bwd_warps, model))
    return specs + _channels_last_specs(model)


# The channels-last variants aot_specs adds: one config of the looped/split kernels (BLOCK=2048 with
# 8 warps: 8 elements per thread, the most register pressure in CONFIGS) and the single-tile kernels
# at the U-Net's group shapes, bf16; (label, C, CPG, HW, S).
_AOT_CL_BLOCK = (2048, 8)
_AOT_CL_LOOPED = (("32x128x64x64", 128, 4, 64 * 64, 1), ("1x128x256x256", 128, 4, 256 * 256, 16))
_AOT_CL_SINGLE = ((128, 4, 32 * 32), (256, 8, 16 * 16), (256, 8, 8 * 8))


def _channels_last_specs(model: dict) -> list[dict]:
    """CHANNELS_LAST=True specs as a GPU launch builds them: `kernels.aot.runtime_spec` on the launchers'
    argument lists (meta tensors: 16-byte aligned pointers; C, VS, HW divisible by 16 get Triton's
    divisibility attribute, S = 1 becomes a constant), so the ALIGN vector accesses along C are what is
    compiled. Looped/split kernels at `_AOT_CL_BLOCK` (S = 1 at 32x128x64x64, S = 16 at 1x128x256x256),
    single-tile kernels at the DDPM CIFAR-10 group shapes; all options on, bf16."""
    from .aot import runtime_spec

    def t(dt=torch.bfloat16):
        return torch.empty(1, dtype=dt, device="meta")

    x, v, f32 = t(), t(), torch.float32
    flags = dict(HAS_ADD=True, HAS_W=True, HAS_B=True, HAS_SCALE=True, HAS_SHIFT=True, SILU=True,
                 CHANNELS_LAST=True)
    specs = []

    def add(name: str, config: str, fn, args: list, consts: dict, warps: int) -> None:
        spec = runtime_spec(fn, args, consts)
        spec.update(kernel=name, config=config, fn=fn, num_warps=warps, num_stages=1,
                    options={"enable_fp_fusion": _FP_FUSION}, hbm_bytes_fused=model["fused"],
                    hbm_bytes_unfused=model["unfused"])
        specs.append(spec)

    block, warps = _AOT_CL_BLOCK
    for label, c, cpg, hw, S in _AOT_CL_LOOPED:
        bc, bhw = _tiles(block, cpg, hw, True)
        tiles = dict(ALIGN=_align(cpg, True), BLOCK_C=bc, BLOCK_HW=bhw, BLOCK=block)
        ints = [c, c, hw, cpg, 32, min(hw, 4096), S]
        cfg = f"BLOCK={block},warps={warps},bf16,channels_last,{label}"
        fwd = [x, v, v, v, v, v, x, t(f32), t(f32), t(f32), t(f32), *ints, 1e-5]
        bwd = [x, x, v, v, v, v, v, t(f32), t(f32), t(f32), t(f32)]
        grads = [x, t(f32) if S > 1 else v, v, v, t(f32), t(f32)]
        if S > 1:
            add("gn_stats", cfg, _gn_stats_kernel, [x, v, t(f32), t(f32), *ints],
                dict(HAS_ADD=True, CHANNELS_LAST=True, **tiles), warps)
            add("gn_bwd_reduce", cfg, _gn_bwd_reduce_kernel, bwd + ints, dict(flags, **tiles), warps)
        add("gn_fwd" if S == 1 else "gn_fwd_split", cfg, _gn_fwd_kernel, fwd,
            dict(flags, FUSED_STATS=S == 1, **tiles), warps)
        add("gn_bwd_dx" if S == 1 else "gn_bwd_dx_split", cfg, _gn_bwd_dx_kernel, bwd + grads + ints,
            dict(flags, FUSED=S == 1, **tiles), warps)
    for c, cpg, hw in _AOT_CL_SINGLE:
        bc, bhw, warps = _single_tile(cpg, hw)
        consts = dict(flags, ALIGN=_align(cpg, True), BLOCK_C=bc, BLOCK_HW=bhw)
        cfg = f"TILE={bc}x{bhw},warps={warps},bf16,channels_last"
        ints = [c, c, hw, cpg, 32]
        add("gn_fwd_single", cfg, _gn_fwd_single_kernel,
            [x, v, v, v, v, v, x, t(f32), t(f32), *ints, 1e-5], consts, warps)
        bwd_warps = _single_tile(cpg, hw, backward=True)[2]
        add("gn_bwd_single", f"TILE={bc}x{bhw},warps={bwd_warps},bf16,channels_last", _gn_bwd_single_kernel,
            [x, x, v, v, v, v, v, t(f32), t(f32), x, v, v, v, t(f32), t(f32), *ints], consts, bwd_warps)
    return specs


def _spec(name: str, config: str, fn, sig: dict, consts: dict, warps: int, model: dict) -> dict:
    return {
        "kernel": name,
        "config": config,
        "fn": fn,
        "signature": dict(sig, **{k: "constexpr" for k in consts}),
        "constexprs": consts,
        "num_warps": warps,
        "num_stages": 1,
        "options": {"enable_fp_fusion": _FP_FUSION},
        "hbm_bytes_fused": model["fused"],
        "hbm_bytes_unfused": model["unfused"],
    }

"""Model-call precision: images/s of sampling with the model in bf16 / fp16 vs fp32 (x stays fp32).

    python benchmarks/bench_dtype.py                  # writes benchmarks/results/dtype_cpu.json
    python benchmarks/bench_dtype.py --batch 4 --steps 2 --repeats 3 --dtypes fp32,bf16,bf16-autocast

The DDPM CIFAR-10 U-Net (35.7M parameters, random weights: benchmarks.common.ddpm_cifar10_pair) in
fd.UNet form, one FastSampler per precision on the same DDIM steps, timed interleaved repeat by repeat
(on a shared CPU, load then hits every variant alike) on 1 thread by default; reported: images/s per
variant (median over repeats), its ratio to fp32, and the relative L2 error of one model call and of
the final samples against fp32. Variants: "bf16" / "fp16" (weights cast once, fastddpm.precision, what
FastSampler(dtype=) and `fastddpm sample --dtype` do) and "bf16-autocast" (torch.autocast around the
fp32 model, for the choice between the two). The CPU's bf16 support (avx512_bf16 / amx_bf16 in
/proc/cpuinfo) is recorded: without it oneDNN has no bf16 convolution and torch falls back to a slow
generic one.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fastddpm as fd  # noqa: E402
from benchmarks.common import cpu_flags, ddpm_cifar10_pair, write_result  # noqa: E402
from fastddpm.precision import parse_dtype  # noqa: E402


class _Autocast(torch.nn.Module):
    """The fp32 model under torch.autocast(dtype) (output as fp32)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype
        self.in_channels, self.image_size = model.in_channels, model.image_size

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x, t).float()


def cpu_bf16_flags() -> List[str]:
    return cpu_flags(sorted(("avx512_bf16", "amx_bf16", "avx512f", "avx512_fp16", "amx_fp16")))


def main(argv=None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="DDIM steps per sampling call (default: 2)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtypes", default="fp32,bf16,bf16-autocast")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, net = ddpm_cifar10_pair(device=args.device)
    diff = fd.GaussianDiffusion(fd.NoiseSchedule.linear(1000))
    smp = fd.DDIMSampler(diff, steps=args.steps)
    variants = args.dtypes.split(",")
    if "fp32" not in variants:
        variants.insert(0, "fp32")
    fast = {}
    for v in variants:
        if v.endswith("-autocast"):
            dt = parse_dtype(v.split("-")[0])
            fast[v] = fd.FastSampler(_Autocast(net, dt), smp, batch_size=args.batch, image_shape=(3, 32, 32))
        else:
            fast[v] = fd.FastSampler(net, smp, batch_size=args.batch, dtype=v)
    # one model call each: error against fp32
    x = torch.randn(args.batch, 3, 32, 32, device=args.device)
    t = torch.full((args.batch,), 500, device=args.device)
    with torch.no_grad():
        ref_out = fast["fp32"].model(x, t)
        call_err = {v: float((f.model(x, t).float() - ref_out).norm() / ref_out.norm()) for v, f in fast.items()}
    times: Dict[str, List[float]] = {v: [] for v in variants}
    samples: Dict[str, torch.Tensor] = {}
    for v in variants:  # warm-up (one call each)
        samples[v] = fast[v](seed=0)
    for r in range(args.repeats):
        for v in variants:
            t0 = time.perf_counter()
            samples[v] = fast[v](seed=0)
            times[v].append(time.perf_counter() - t0)
        print(f"repeat {r + 1}: " + ", ".join(f"{v} {times[v][-1]:.2f} s" for v in variants), flush=True)
    ips = {v: args.batch / statistics.median(times[v]) for v in variants}
    res = {
        "command": "python benchmarks/bench_dtype.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": "DDPM CIFAR-10 U-Net (fd.UNet, 35.7M parameters, random weights)",
        "batch": args.batch, "ddim_steps": args.steps, "repeats": args.repeats, "threads": args.threads,
        "cpu_bf16_flags": cpu_bf16_flags(),
        "images_per_s": ips, "ratio_to_fp32": {v: ips[v] / ips["fp32"] for v in variants},
        "model_call_rel_error": call_err,
        "sample_rel_error": {v: float((samples[v] - samples["fp32"]).norm() / samples["fp32"].norm()) for v in variants},
        "seconds": times,
    }
    for v in variants:
        print(f"{v:>14}: {ips[v]:.3f} images/s, {res['ratio_to_fp32'][v]:.2f}x fp32, call error "
              f"{call_err[v]:.2e}, sample error {res['sample_rel_error'][v]:.2e}")
    print(f"CPU bf16 flags: {res['cpu_bf16_flags'] or 'none'}")
    if not args.no_write:
        print("wrote", write_result(f"dtype_{args.device}", res))
    return res


if __name__ == "__main__":
    main()

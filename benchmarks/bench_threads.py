"""How many torch threads pay off on a small CPU: the bundled digits model vs a CIFAR-sized U-Net.

    python benchmarks/bench_threads.py --json            # prints JSON, writes results/threads_cpu.json

Run it with OMP_NUM_THREADS unset, so torch starts with its own default thread count (one per core).
Cases, each timed at every thread count of ``--threads`` (default: 1, 2 and torch's default), one call
of each (case, threads) pair per round, interleaved, after a warm-up call, so the ratios come from the
same minutes of machine load:

* ``sample_bundled``: `fastddpm sample`'s default work, the bundled model (701k parameters, 8x8) drawing
  64 digits with DPM-Solver++ in 20 steps;
* ``train_step_bundled``: one training step of the bundled model's recipe (batch 64: forward, hybrid
  MSE loss, backward, AdamW);
* ``forward_cifar``: the DDPM CIFAR-10 U-Net (35.7M parameters, random weights) forward at batch 2
  and 8, no grad.

The CLI's automatic thread count (`fastddpm.cli._common.auto_threads`) follows from these figures: one
thread for models below its parameter threshold, torch's default above. The machine this was written
on has 2 CPU cores shared with other processes: read the ratios (time at N threads over time at one),
not the absolute seconds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

import torch

import fastddpm as fd


def _bundled_cases() -> Dict[str, Callable[[], Any]]:
    from fastddpm.build import build_model, load_model

    model, diffusion, config = load_model(None)
    sampler = fd.DPMSolverSampler(diffusion, steps=20)

    def sample() -> Any:
        with torch.no_grad():
            return sampler.sample(model, (64, 1, 8, 8), seed=0)

    torch.manual_seed(0)
    net = build_model(config).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x0 = torch.rand(64, 1, 8, 8) * 2 - 1

    def train_step() -> Any:
        loss = diffusion.training_losses(net, x0)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return {"sample_bundled": sample, "train_step_bundled": train_step}


def _cifar_cases() -> Dict[str, Callable[[], Any]]:
    torch.manual_seed(0)
    unet = fd.UNet(image_size=32, base_channels=128, channel_mults=(1, 2, 2, 2), attention_resolutions=(16,)).eval()
    out = {}
    for batch in (2, 8):
        x, t = torch.randn(batch, 3, 32, 32), torch.randint(0, 1000, (batch,))

        def forward(x: torch.Tensor = x, t: torch.Tensor = t) -> Any:
            with torch.no_grad():
                return unet(x, t)

        out[f"forward_cifar_b{batch}"] = forward
    return out


def measure(thread_counts: List[int], rounds: int) -> Dict[str, Any]:
    """Median seconds per call of every case at every thread count, and the ratio to one thread."""
    cases = {**_bundled_cases(), **_cifar_cases()}
    times: Dict[str, Dict[int, List[float]]] = {c: {n: [] for n in thread_counts} for c in cases}
    for r in range(rounds + 1):  # round 0 is the warm-up
        for name, fn in cases.items():
            for n in thread_counts:
                torch.set_num_threads(n)
                t0 = time.perf_counter()
                fn()
                if r:
                    times[name][n].append(time.perf_counter() - t0)
    rows = []
    for name, per in times.items():
        one = statistics.median(per[thread_counts[0]])
        for n in thread_counts:
            med = statistics.median(per[n])
            rows.append({"case": name, "threads": n, "median_s": round(med, 4), "best_s": round(min(per[n]), 4),
                         f"time_vs_{thread_counts[0]}_thread": round(med / one, 3)})
    return {"rows": rows, "rounds": rounds}


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up (default: 3)")
    p.add_argument("--threads", default=None,
                   help="comma-separated thread counts, the first is the baseline (default: 1,2,torch's default)")
    p.add_argument("--json", action="store_true", help="print JSON and write results/threads_cpu.json")
    args = p.parse_args(argv)
    default_threads = torch.get_num_threads()
    counts = [int(v) for v in args.threads.split(",")] if args.threads else sorted({1, 2, default_threads})
    result = {"benchmark": "CPU threads: the bundled model vs the CIFAR-10 U-Net at one and two torch threads "
                           "(fp32, CPU)", **measure(counts, args.rounds)}
    result["torch_default_threads"] = default_threads
    result["command"] = "python benchmarks/bench_threads.py " + " ".join(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(default_threads)
    if args.json:
        from benchmarks.common import write_result

        write_result("threads_cpu", result)
        print(json.dumps(result, indent=2))
    else:
        for row in result["rows"]:
            print(f"{row['case']:>22} {row['threads']:>2} threads: {row['median_s']:.3f} s "
                  f"({row[f'time_vs_{counts[0]}_thread']:.2f}x one thread)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

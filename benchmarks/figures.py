"""Device-independent figures of the DDPM CIFAR-10 U-Net, fastddpm vs diffusers (same weights).

    python benchmarks/figures.py [--batch 2] [--json]

Prints and writes benchmarks/results/figures.json: parameters, bytes saved for backward per training
sample (fp32, parameters excluded, storages de-duplicated), ops dispatched per forward (views
included), non-view ops per forward and per training step (forward + backward: the stand-in for the
kernels launched on the CUDA path where no GPU profiler is at hand; on CUDA, `cuda_kernel_counts`
counts the kernels the profiler records instead), FLOPs per forward, ops per sampling step outside the model, and the modelled HBM bytes of
each fused kernel against the unfused PyTorch sequence it replaces (from the kernels' aot_specs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastddpm as fd  # noqa: E402
from benchmarks.common import ddpm_cifar10_pair, write_result  # noqa: E402
from fastddpm.profiling import count_flops, count_ops, saved_bytes, training_step_fn  # noqa: E402


def unet_figures(batch: int) -> dict:
    ref, ours = ddpm_cifar10_pair()
    x = torch.randn(batch, 3, 32, 32)
    t = torch.randint(0, 1000, (batch,))
    out = {}
    for name, model in (("diffusers", ref), ("fastddpm", ours)):
        model.train()
        for m in model.modules():  # dropout off: it saves a mask that is not part of the comparison
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        row = {"parameters": sum(p.numel() for p in model.parameters())}
        row["saved_bytes_per_sample"] = saved_bytes(training_step_fn(model, x, t), exclude=model.parameters()) / batch
        if hasattr(model, "recompute_norm"):  # the memory-lean mode is the default: show the cost without it
            model.recompute_norm = False
            row["saved_bytes_per_sample_without_recompute"] = saved_bytes(
                training_step_fn(model, x, t), exclude=model.parameters()) / batch
            model.recompute_norm = True
        step = training_step_fn(model, x, t)
        row["kernel_ops_per_training_step"] = sum(count_ops(lambda: step().backward(), views=False).values())
        model.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            row["ops_per_forward"] = sum(count_ops(lambda: model(x, t)).values())
            row["kernel_ops_per_forward"] = sum(count_ops(lambda: model(x, t), views=False).values())
            row["flops_per_forward_per_sample"] = count_flops(lambda: model(x, t)) / batch
        out[name] = row
    for key in ("saved_bytes_per_sample", "ops_per_forward", "kernel_ops_per_forward", "kernel_ops_per_training_step",
                "flops_per_forward_per_sample"):
        out[f"ratio_{key}"] = out["fastddpm"][key] / out["diffusers"][key]
    return out


def cuda_kernel_counts(batch: int) -> dict:
    """Kernels launched per U-Net forward and per training step (bf16 autocast) on CUDA, fastddpm vs
    diffusers, from the profiler's kernel events. Empty without CUDA."""
    if not torch.cuda.is_available():
        return {}
    from torch.profiler import ProfilerActivity, profile

    ref, ours = ddpm_cifar10_pair()
    x = torch.randn(batch, 3, 32, 32, device="cuda")
    t = torch.randint(0, 1000, (batch,), device="cuda")
    out = {}
    for name, model in (("diffusers", ref), ("fastddpm", ours)):
        model = model.cuda().train()
        step = training_step_fn(model, x, t)
        counts = {}
        for what, fn in (("forward", lambda: model(x, t)), ("training_step", lambda: step().backward())):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                fn()  # warm-up: compilation and autotuning outside the count
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    fn()
                    torch.cuda.synchronize()
            counts[f"kernels_per_{what}"] = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
        out[name] = counts
    return out


def sampling_step_ops() -> dict:
    """Ops dispatched per sampling step outside the model, for each way of sampling."""
    diff = fd.GaussianDiffusion(fd.NoiseSchedule.linear(1000))
    model_ops = {"n": 0}

    class Identity(torch.nn.Module):  # a model whose own ops are subtracted
        in_channels, image_size = 3, 32

        def forward(self, x, t):
            return x * 0.5

    model = Identity()
    x = torch.randn(8, 3, 32, 32)
    out = {}
    t0 = torch.zeros(8, dtype=torch.int64)  # made outside the counted call: only the model's own ops count
    model_counter = count_ops(lambda: model(x, t0))
    one_model_call = sum(model_counter.values())
    model_ops["n"] = one_model_call
    for name, sampler in (("ddpm", fd.DDPMSampler(diff, steps=20)), ("ddim", fd.DDIMSampler(diff, steps=20)),
                          ("dpm++", fd.DPMSolverSampler(diff, steps=20))):
        fast = fd.FastSampler(model, sampler, batch_size=8)
        fast._reset(0)  # step counter at row 0, as at the start of a call
        step_counter = count_ops(fast._step)
        per_step = sum(step_counter.values()) - one_model_call
        loop = sum(count_ops(lambda: sampler.sample(model, (8, 3, 32, 32), seed=0)).values())
        out[name] = {"fast_sampler": per_step, "sampler_sample": (loop - sampler.num_steps * one_model_call) / sampler.num_steps,
                     "fast_sampler_ops": dict(step_counter - model_counter)}
    try:
        import diffusers

        sched = diffusers.DDIMScheduler()
        sched.set_timesteps(20)
        eps = torch.randn_like(x)
        t0 = sched.timesteps[0]
        out["diffusers_ddim_step"] = sum(count_ops(lambda: sched.step(eps, t0, x)).values())
        sched = diffusers.DDPMScheduler()
        sched.set_timesteps(20)
        gen = torch.Generator().manual_seed(0)
        out["diffusers_ddpm_step"] = sum(count_ops(lambda: sched.step(eps, sched.timesteps[0], x, generator=gen)).values())
    except ImportError:
        pass
    return out


def kernel_hbm() -> list:
    rows = []
    for module in ("fastddpm.kernels.group_norm", "fastddpm.kernels.attention", "fastddpm.kernels.sampler_step"):
        try:
            mod = __import__(module, fromlist=["aot_specs"])
            specs = mod.aot_specs()
        except Exception as exc:  # noqa: BLE001 - report, don't fail the whole script
            rows.append({"module": module, "error": repr(exc)})
            continue
        seen = set()
        for spec in specs:
            if spec["kernel"] in seen:
                continue
            seen.add(spec["kernel"])
            rows.append({"kernel": spec["kernel"], "hbm_bytes_fused": int(spec["hbm_bytes_fused"]),
                         "hbm_bytes_unfused": int(spec["hbm_bytes_unfused"]),
                         "ratio": int(spec["hbm_bytes_fused"]) / max(int(spec["hbm_bytes_unfused"]), 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the JSON only")
    args = parser.parse_args()
    payload = {"unet_ddpm_cifar10_fp32": unet_figures(args.batch), "sampling_step_ops": sampling_step_ops(),
               "kernel_hbm": kernel_hbm(), "cuda_kernel_counts": cuda_kernel_counts(args.batch), "command": "python benchmarks/figures.py --batch %d" % args.batch}
    path = write_result("figures", payload)
    print(json.dumps(payload, indent=2))
    if not args.json:
        print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Shared set-up for the benchmarks: the DDPM CIFAR-10 U-Net in fastddpm and in diffusers, same weights."""
from __future__ import annotations

import json
import os
import platform
import subprocess
from typing import Any, Dict, List, Sequence

import torch

import fastddpm as fd

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# `fastddpm bench` points this at its --out-dir so that a run leaves the tracked results/ alone
RESULTS_ENV = "FASTDDPM_BENCH_RESULTS"


def results_dir() -> str:
    """Where write_result writes: $FASTDDPM_BENCH_RESULTS when set, else benchmarks/results/."""
    return os.environ.get(RESULTS_ENV) or RESULTS

# google/ddpm-cifar10-32's UNet2DModel config
DDPM_CIFAR10_DIFFUSERS = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
    attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
    norm_num_groups=32, act_fn="silu")


def ddpm_cifar10_pair(seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(diffusers UNet2DModel, fd.UNet) of the DDPM CIFAR-10 config with the same random weights."""
    import diffusers

    torch.manual_seed(seed)
    ref = diffusers.UNet2DModel(**DDPM_CIFAR10_DIFFUSERS)
    with torch.no_grad():  # leave no layer at zero so both models compute something non-trivial
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ours = fd.unet_from_diffusers(ref)
    return ref.to(device, dtype).eval(), ours.to(device, dtype).eval()


def machine() -> Dict[str, Any]:
    """What the figures ran on."""
    info: Dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        info["cpu"] = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
                                     capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001 - informational only
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    info["torch_threads"] = torch.get_num_threads()
    return info


def write_result(name: str, payload: Dict[str, Any]) -> str:
    """Write <results_dir()>/<name>.json (with the machine) atomically; returns the path."""
    os.makedirs(results_dir(), exist_ok=True)
    path = os.path.join(results_dir(), f"{name}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"machine": machine(), **payload}, fh, indent=2, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def text_table(cols, body) -> str:
    """Left-aligned plain-text table: a header row of `cols`, then the string rows of `body`."""
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def cpu_flags(names: Sequence[str]) -> List[str]:
    """Which of the CPU feature flags `names` /proc/cpuinfo lists, in the order of `names` ([] where it cannot be
    read)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = set(fh.read().split())
    except OSError:
        return []
    return [f for f in names if f in flags]

"""The backend choice of the fused ops (`fastddpm.ops.backend`): what a forced backend does where its
kernels cannot launch."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

_CPU_FORCED_TRITON = r"""
import os, sys
assert os.environ.get("TRITON_INTERPRET") != "1"
import torch
import triton  # noqa: F401  (installed: the forced backend is accepted; its kernels cannot launch on CPU)
from fastddpm.ops import group_norm_silu, sampler_step, sampler_step_, use_backend

g = torch.Generator().manual_seed(0)
x = torch.randn(2, 8, 4, 4, generator=g, requires_grad=True)
w, b, scale = torch.randn(8, generator=g), torch.randn(8, generator=g), torch.randn(2, 8, generator=g)
coefs = torch.rand(3, 11, generator=g, dtype=torch.float64).float()
step, seed, m = torch.tensor([1]), torch.tensor([5]), torch.randn(2, 8, 4, 4, generator=g)


def run():
    y = group_norm_silu(x, w, b, groups=4, scale=scale)
    (dx,) = torch.autograd.grad(y.square().sum(), x)
    xs = x.detach().clone()
    x_prev, x0 = sampler_step(xs, m, coefs, step, seed=seed)
    st, t_out = step.clone(), torch.zeros(2, dtype=torch.int64)
    sampler_step_(xs, m, coefs, st, t_out, torch.tensor([30, 20, 10]), seed=seed)
    return [y, dx, x_prev, x0, xs, st, t_out]


with use_backend("reference"):
    want = run()
with use_backend("triton"):
    got = run()
for a, r in zip(got, want):
    assert torch.equal(a, r), (a, r)
print("ok", len(got))
"""


def test_cpu_tensors_without_interpreter_take_the_reference_in_every_op():
    """group_norm_silu (forward and backward), sampler_step and sampler_step_ on CPU tensors under
    use_backend("triton") in a process without TRITON_INTERPRET: the kernels cannot launch there, so each
    op takes the reference path (bitwise the reference's results) instead of failing in the launcher."""
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _CPU_FORCED_TRITON], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "ok 7" in proc.stdout, proc.stderr[-3000:]

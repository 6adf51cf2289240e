"""Every public launcher in kernels/ runs under its tensors' CUDA device guard (checked on the CPU: the
guard's device choice with a tensor that reports itself as CUDA)."""
from __future__ import annotations

import contextlib

import pytest
import torch


def test_every_public_launcher_runs_under_the_device_guard():
    pytest.importorskip("triton")
    import fastddpm.kernels.attention as KA
    import fastddpm.kernels.group_norm as KG
    import fastddpm.kernels.sampler_step as KS

    launchers = [KA.attention_forward, KA.attention_backward, KG.group_norm_forward, KG.group_norm_backward,
                 KS.sampler_step_forward, KS.sampler_step_inplace]
    assert all(getattr(f, "device_guarded", False) for f in launchers)


def test_device_guard_enters_the_first_tensors_cuda_device(monkeypatch):
    from fastddpm.kernels import device_guard as D

    entered = []

    @contextlib.contextmanager
    def fake_device(dev):
        entered.append(dev)
        yield

    class CudaLike(torch.Tensor):  # a CPU tensor that reports itself as CUDA
        @property
        def is_cuda(self):
            return True

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    calls = []
    f = D.on_tensor_device(lambda *a, **k: calls.append((a, k)) or "ran")
    cpu = torch.zeros(1)
    assert f(3, cpu) == "ran" and entered == []  # CPU tensors: no guard
    fake = torch.zeros(1).as_subclass(CudaLike)
    assert f(1, x=fake) == "ran" and entered == [fake.device]
    assert len(calls) == 2

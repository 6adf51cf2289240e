"""Test set-up: without CUDA, Triton kernels run through Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.

On a GPU machine the interpreter stays off (the kernels compile for the device), so a test that forces
``use_backend("triton")`` on CPU tensors cannot launch anything: such tests take the `triton_on_cpu`
fixture, which skips them there (tests/gpu runs the kernels on the device instead). Tests that need
the device take `cuda_device` (skipped without CUDA or with the interpreter on). TRITON_INTERPRET=1
exported on a CUDA machine would skip every one of them, so the run stops there with a usage error.

Markers: `gpu` (set here, see below), `slow` (set by the test files on the tests that take tens of
seconds on a CPU: the AOT gate, end-to-end training runs, the wheel build; `python -m pytest -m "not
slow" tests` is the quick run, CI runs everything) and `compile_heavy` (set here on tests that call
torch.compile or take a truthy `compile` parameter: each costs an Inductor compile, tens of seconds on a
cold cache, so the one-shot GPU check deselects them).
"""
import inspect
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_default_dtype(torch.float32)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (set automatically: tests/gpu and every test "
                                       "skipped for 'needs CUDA'); `pytest -m gpu` runs them all")
    config.addinivalue_line("markers", "slow: takes tens of seconds on a CPU (the AOT gate, end-to-end training, "
                                       "the wheel build); `pytest -m \"not slow\"` leaves them out, CI runs them")
    config.addinivalue_line("markers", "compile_heavy: calls torch.compile (set automatically); "
                                       "benchmarks/gpu_check.py runs `-m 'gpu and not compile_heavy'`")
    if os.environ.get("TRITON_INTERPRET") == "1" and torch.cuda.is_available():
        raise pytest.UsageError("TRITON_INTERPRET=1 is set on a machine with CUDA: every GPU test would skip "
                                "(the kernels would run in Triton's interpreter). Unset it: `env -u TRITON_INTERPRET "
                                "python -m pytest ...`")


def _needs_cuda(item) -> bool:
    if "tests/gpu/" in item.path.as_posix() or "cuda_device" in getattr(item, "fixturenames", ()):
        return True
    return any("CUDA" in str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif"))


def _compiles(item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    if params.get("compile"):
        return True
    try:
        return "torch.compile" in inspect.getsource(item.function)
    except (AttributeError, OSError, TypeError):
        return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _needs_cuda(item):
            item.add_marker(pytest.mark.gpu)
        if _compiles(item):
            item.add_marker(pytest.mark.compile_heavy)


def interpreter_active() -> bool:
    """Whether Triton runs kernels in its interpreter (CPU tensors can then take the Triton path)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def triton_on_cpu() -> None:
    """Skip unless a forced-triton call on CPU tensors can run: triton installed, interpreter active."""
    pytest.importorskip("triton")
    if not interpreter_active():
        pytest.skip("forces the Triton backend on CPU tensors, which needs Triton's interpreter "
                    "(TRITON_INTERPRET=1); with a GPU, tests/gpu runs the kernels on the device")


@pytest.fixture
def cuda_device() -> torch.device:
    """The current CUDA device, for tests of the compiled kernels (skip without CUDA or under the interpreter)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if interpreter_active():
        pytest.skip("needs compiled kernels (TRITON_INTERPRET=1 is set)")
    pytest.importorskip("triton")
    return torch.device("cuda", torch.cuda.current_device())

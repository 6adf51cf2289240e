""".ci/aot_oldest_triton.py (CI compiles a representative set of the kernels with the oldest supported triton):
the set covers every kernel and every head dim of the real AOT specs once, on sm_90 where a spec is for it;
failures and warnings are told apart. The compile itself runs in CI (.ci/run), not here."""
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_aot_oldest_triton", ROOT / ".ci" / "aot_oldest_triton.py")
ci = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ci)


def test_head_dim_from_config():
    assert ci.head_dim("D=256,BLOCK_M=64,BLOCK_N=64,warps=8") == 256
    assert ci.head_dim("D=64,bf16 [64x4x256x64 contiguous]") == 64
    assert ci.head_dim("BLOCK=512,warps=4,bf16") is None and ci.head_dim("TILE=4x1024,warps=16") is None


def test_representative_set_covers_every_kernel_and_head_dim_once():
    from fastddpm.kernels import aot

    specs = [(m, i, s) for m in aot.KERNEL_MODULES for i, s in enumerate(importlib.import_module(m).aot_specs())]
    chosen = ci.representative(specs, list(aot.ARCHS))
    by_index = {(m, i): s for m, i, s in specs}
    keys = [(m, by_index[(m, i)]["kernel"], ci.head_dim(by_index[(m, i)]["config"])) for m, i, _ in chosen]
    everything = {(m, s["kernel"], ci.head_dim(s["config"])) for m, _, s in specs}
    assert len(keys) == len(set(keys)) and set(keys) == everything
    assert {d for _, k, d in keys if k.startswith("attn_fwd")} == {32, 64, 128, 256}
    for m, i, arch in chosen:
        allowed = by_index[(m, i)].get("archs", aot.ARCHS)
        assert arch in allowed and (arch == 90 or 90 not in allowed)


def test_representative_prefers_sm90_and_falls_back_to_the_specs_arch():
    specs = [("m", 0, {"kernel": "k", "config": "D=64", "archs": (80,)}),
             ("m", 1, {"kernel": "k", "config": "D=64"}),
             ("m", 2, {"kernel": "k", "config": "D=128"})]
    assert ci.representative(specs, [80, 90]) == [("m", 0, 80), ("m", 2, 90)]


def test_problems_fail_on_errors_and_shared_memory_and_warn_on_local_memory():
    limits = {90: 1000}
    assert ci.problems({"error": "CompilationError: x"}, limits)[0] == ["does not compile: CompilationError: x"]
    fail, warn = ci.problems({"arch": 90, "spills": 0, "stack": 32, "shared_bytes": 2000}, limits)
    assert fail == ["shared memory 2000 B over sm_90's 1000 B"] and warn == ["local memory (LOCAL 0 B, stack 32 B)"]
    assert ci.problems({"arch": 90, "spills": 0, "stack": 0, "shared_bytes": 1000}, limits) == ([], [])


def _fake_pip(fail: bool):
    """A stand-in for `pip install --target DIR triton==V`: writes a triton package, then fails if asked
    (as a kill or a network error mid-install would leave it)."""
    code = ("import pathlib, sys; a = sys.argv; t = pathlib.Path(a[a.index('--target') + 1]); "
            "(t / 'triton').mkdir(); (t / 'triton' / '__init__.py').write_text(repr(a[-1])); "
            f"sys.exit({int(fail)})")
    return [sys.executable, "-c", code]


def test_install_once_never_reuses_a_half_finished_install(tmp_path):
    target = tmp_path / "triton-3.6.0"
    with pytest.raises(subprocess.CalledProcessError):  # pip fails mid-install: nothing that looks finished
        ci.install_once(target, "3.6.0", pip=_fake_pip(fail=True))
    assert list(tmp_path.iterdir()) == []
    (target / "triton").mkdir(parents=True)  # what an install cut short by the old CI script left behind
    (target / "triton" / "half.py").write_text("")
    assert ci.install_once(target, "3.6.0", pip=_fake_pip(fail=False)) is True
    assert (target / "triton" / "__init__.py").read_text() == repr("triton==3.6.0")
    assert not (target / "triton" / "half.py").exists()
    assert (target / ci.MARKER).read_text().strip() == "3.6.0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["triton-3.6.0"]  # no temporary folder left
    assert ci.install_once(target, "3.6.0", pip=_fake_pip(fail=True)) is False  # finished: pip is not run
    assert ci.install_once(target, "3.7.0", pip=_fake_pip(fail=False)) is True  # another version: reinstalled
    assert (target / ci.MARKER).read_text().strip() == "3.7.0"

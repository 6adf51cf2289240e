"""Every kernel and autotune config compiles ahead of time for each arch of `kernels.arch.ARCHS` (sm_80,
sm_86, sm_89, sm_90), each arch's programs with its own configs, with no spills and shared memory within
that arch's limit (`kernels.arch.SHARED_LIMIT_BYTES`: 99 KiB on sm_86 / sm_89). Runs
benchmarks/kernel_report.py --json in a second process without TRITON_INTERPRET (this test process runs
Triton in interpreter mode; compilation needs the real JIT). sm_100 and sm_120 (EXTRA_ARCHS) are compiled
for the D = 256 attention programs, the heaviest in shared memory and registers.

The gate is CPU-heavy (several hundred compiles; docs/kernels.md gives its time on a cold
cache), so its tests are marked `slow`. Compiled resource figures are cached (kernels/aot.py,
~/.cache/fastddpm/aot or $FASTDDPM_AOT_CACHE), so only changed kernels are recompiled on a second run.
"""
import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from fastddpm.kernels.aot import (ARCHS, EXTRA_ARCHS, KERNEL_MODULES, MAX_REGISTERS, ROW_KEYS,  # noqa: E402
                                  SHARED_LIMIT_BYTES, parse_resource_usage)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _existing_modules():
    return [m for m in KERNEL_MODULES if importlib.util.find_spec(m) is not None]


def _run_report(*extra: str):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # keep triton 3.9's default, silence its warning
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "kernel_report.py"), "--json", "--jobs",
         str(max(2, os.cpu_count() or 1)), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000,
    )
    try:
        rows = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"kernel_report.py printed no JSON (rc={proc.returncode}):\n{proc.stdout[-2000:]}\n"
                    f"{proc.stderr[-4000:]}")
    return rows, proc


@pytest.fixture(scope="module")
def report():
    return _run_report()


@pytest.mark.slow
def test_report_rows_well_formed(report):
    rows, proc = report
    assert isinstance(rows, list) and rows, proc.stderr[-2000:]
    for r in rows:
        for k in ROW_KEYS:
            assert k in r, (k, r)
        assert r["arch"] in {f"sm_{a}" for a in ARCHS}
        for k in ("registers", "spills", "shared_bytes", "hbm_bytes_fused", "hbm_bytes_unfused"):
            assert isinstance(r[k], int) and r[k] >= 0, (k, r)
        assert 0 < r["registers"] <= MAX_REGISTERS, r
        assert r["hbm_bytes_fused"] > 0, r


@pytest.mark.slow
def test_no_spills_and_shared_within_limits(report):
    rows, proc = report
    bad = [r for r in rows if r["spills"] != 0]
    assert not bad, f"kernels spill to local memory: {bad}"
    # ptxas places spills in the stack frame: cuobjdump can show LOCAL:0 with STACK:48 for a kernel
    # that `ptxas -v` reports as spilling, so a stack frame counts as a spill too
    bad = [r for r in rows if r.get("stack", 0) != 0]
    assert not bad, f"kernels have a stack frame (spills): {bad}"
    for r in rows:
        limit = SHARED_LIMIT_BYTES[int(r["arch"][3:])]
        assert r["shared_bytes"] <= limit, r
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_every_spec_of_every_existing_module_is_reported_for_each_arch(report):
    rows, proc = report
    existing = _existing_modules()
    assert "fastddpm.kernels.sampler_step" in existing
    for module_name in existing:
        module = importlib.import_module(module_name)
        assert hasattr(module, "aot_specs"), f"{module_name} exists but has no aot_specs()"
        specs = module.aot_specs()
        assert specs, f"{module_name}.aot_specs() is empty"
        for arch in ARCHS:
            expected = {(s["kernel"], s["config"]) for s in specs if arch in s.get("archs", ARCHS)}
            got = {(r["kernel"], r["config"]) for r in rows
                   if r.get("module") == module_name and r["arch"] == f"sm_{arch}"}
            assert got == expected, (module_name, arch, expected - got, got - expected)
    for module_name in set(KERNEL_MODULES) - set(existing):
        assert f"{module_name}: module does not exist yet" in proc.stderr


@pytest.mark.slow
def test_attention_runs_on_tensor_cores(report):
    """bf16/fp16 attention (forward, dK/dV, dQ; every head dim, masked and unmasked, contiguous and the
    U-Net's pixel-major views) issues wgmma on sm_90 and mma.sync on sm_80 / sm_86 / sm_89. TF32 runs on
    tensor cores too: wgmma on sm_90 where its 64-row tiles fit (mma.sync for the D = 256 dK/dV tiles),
    mma.sync on the others (the 16-row D = 256 dK/dV and dQ tiles also on sm_90). The exact fp32
    ("highest") path issues neither (FMA dots)."""
    rows, _ = report
    attn = [r for r in rows if r["module"] == "fastddpm.kernels.attention" and r["kernel"] != "attn_bwd_preprocess"]
    assert attn
    head_dims = set()
    for r in attn:
        kind = r["config"].split(" [")[0].rsplit(",", 1)[1]  # bf16 | tf32 | ieee
        name, d = r["kernel"].split("[")[0], int(r["config"].split(",")[0][2:])
        if kind == "ieee":
            want = {"none"}
        elif r["arch"] != "sm_90":
            want = {"mma"}
        elif kind == "tf32" and d == 256 and name in ("attn_bwd_dkdv", "attn_bwd_dq"):
            want = {"wgmma", "mma"}  # the 16-row D = 256 TF32 tiles: mma.sync
        else:
            want = {"wgmma"}
        assert r["tensor_cores"] in want, r
        if r["tensor_cores"] != "none":
            head_dims.add((name, d, kind, r["arch"]))
    for name in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"):
        for d in (64, 128, 256):
            for kind in ("bf16", "tf32"):
                for arch in (f"sm_{a}" for a in ARCHS):
                    assert (name, d, kind, arch) in head_dims, (name, d, kind, arch)


def test_tensor_core_family():
    from fastddpm.kernels.aot import tensor_core_family

    assert tensor_core_family("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...}") == "wgmma"
    assert tensor_core_family("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...}") == "mma"
    assert tensor_core_family("fma.rn.f32 %f1, %f2, %f3, %f4;") == "none"


def test_parse_resource_usage():
    text = """
Resource usage:
 Common:
  GLOBAL:52 CONSTANT[4]:24
 Function _k:
  REG:69 STACK:8 SHARED:1024 LOCAL:16 CONSTANT[2]:8 CONSTANT[0]:456 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function other: REG:12 STACK:0 SHARED:0 LOCAL:0
"""
    usage = parse_resource_usage(text)
    assert usage["_k"]["REG"] == 69 and usage["_k"]["LOCAL"] == 16 and usage["_k"]["SHARED"] == 1024
    assert usage["_k"]["STACK"] == 8 and usage["_k"]["CONSTANT[0]"] == 456
    assert usage["other"] == {"REG": 12, "STACK": 0, "SHARED": 0, "LOCAL": 0}


def test_shared_memory_limits_per_arch():
    """The limits the gate checks (CUDA C++ Programming Guide, maximum shared memory per block, opt-in)."""
    assert SHARED_LIMIT_BYTES[80] == 163 * 1024 and SHARED_LIMIT_BYTES[90] == 227 * 1024
    assert SHARED_LIMIT_BYTES[86] == SHARED_LIMIT_BYTES[89] == 101_376
    assert set(ARCHS) == {80, 86, 89, 90} and set(EXTRA_ARCHS) <= set(SHARED_LIMIT_BYTES)


@pytest.mark.slow
def test_head_dim_256_attention_fits_sm100_and_sm120():
    """The D = 256 attention programs (the most shared memory and registers) compile for sm_100 (tcgen05,
    227 KiB) and sm_120 (mma.sync, 99 KiB) with their own configs: no spills, within the limit."""
    rows, proc = _run_report("--modules", "fastddpm.kernels.attention", "--arch", *map(str, EXTRA_ARCHS), "--match", "D=256,")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {r["arch"] for r in rows} == {f"sm_{a}" for a in EXTRA_ARCHS}
    assert {r["kernel"].split("[")[0] for r in rows} >= {"attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"}
    for r in rows:
        assert r["spills"] == 0 and r["stack"] == 0 and r["shared_bytes"] <= r["shared_limit_bytes"], r
        if "bf16" in r["config"] and r["kernel"] != "attn_bwd_preprocess":
            assert r["tensor_cores"] == ("tcgen05" if r["arch"] == "sm_100" else "mma"), r

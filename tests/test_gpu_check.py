"""benchmarks/gpu_check.py without a GPU: the --dry-run (every part's code path on the CPU, interpreter,
tiny shapes, no timings), the device peak table, --parts, the time budget, and report.py's rendering.

The dry run is one subprocess (~10 s of CPU; TRITON_INTERPRET must be set before triton is imported,
which the script does itself for --dry-run), shared by the tests below.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_{name}_under_test", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load("gpu_check")
report = _load("report")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("triton")
    pytest.importorskip("diffusers")
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    path = out / "gpu_dryrun.json"
    return json.loads(path.read_text()), proc.stdout


def _figures(obj, key=""):
    """Every (key, value) leaf whose key names a timing-derived figure."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _figures(v, k)
    elif isinstance(obj, list):
        for v in obj:
            yield from _figures(v, key)
    elif key.endswith(("_s", "GBps", "tflops", "pct_of_peak", "images_per_s", "_Bps", "_flops")) or key == "s":
        yield key, obj


@pytest.mark.slow  # the dry run runs every part of the GPU check on the CPU
def test_dry_run_runs_every_part_with_no_timings(dry_run):
    data, stdout = dry_run
    assert data["dry_run"] is True and list(data["parts"]) == list(gpu_check.PARTS)
    for name, entry in data["parts"].items():
        assert entry["status"] == "ok", (name, entry)
        assert f"[{name}] ok in" in stdout  # each part's time is printed
    parts = {k: v["result"] for k, v in data["parts"].items()}
    timed = [(k, v) for k, v in _figures(parts) if k not in ("budget_s",)]
    assert timed and all(v is None for _, v in timed), [kv for kv in timed if kv[1] is not None][:5]
    for key in ("torch", "triton", "cuda", "device_name", "driver"):
        assert key in data["versions"]
    # the fused ops were checked against torch before timing: bf16 errors at bf16 rounding
    for row in parts["group_norm"]["rows"]:
        assert row["fastddpm_rel_err"] <= 2 * row["torch_eager_rel_err"] + 2**-7
    assert len(parts["attention"]["rows"]) == 3 and all(r["fastddpm_rel_err"] <= 2e-2 for r in parts["attention"]["rows"])
    assert parts["attention"]["rows"][-1]["path"].startswith("sdpa")  # head_dim 512
    assert all(r["fused_rel_err"] <= 2e-2 for r in parts["step"]["rows"]) and len(parts["step"]["rows"]) == 4
    assert parts["unet"]["forward_rel_err_fastddpm_vs_diffusers"] <= 1e-4
    assert set(parts["unet"]["forward"]) == set(parts["unet"]["train_step"]) == {
        "fastddpm_eager", "diffusers_eager", "fastddpm_compiled", "diffusers_compiled"}
    layout = parts["layout"]
    assert {"nchw", "channels_last"} <= set(layout) and layout["rel_err_channels_last_vs_nchw"] <= 2e-2
    assert layout["verdict"] == "not measured"  # a dry run decides nothing
    rows = parts["sampling"]["rows"]
    assert [(r["sampler"], r["dtype"]) for r in rows] == [("ddim", "bfloat16"), ("ddim", "float32"),
                                                          ("ddpm", "bfloat16"), ("ddpm", "float32")]
    assert all(f"fast_sampler_{c}" in r for r in rows for c in ("step", "loop", "none"))
    assert parts["tests"]["ok"] and "tests/gpu" in parts["tests"]["command"]


@pytest.mark.slow
def test_report_renders_a_gpu_file_and_says_when_there_is_none(dry_run, tmp_path):
    data = copy.deepcopy(dry_run[0])
    assert "GPU check: not run on a GPU yet" in report.render(tmp_path)
    (tmp_path / "gpu_dryrun.json").write_text(json.dumps(data))
    text = report.render(tmp_path)
    assert "GPU check: not run on a GPU yet" in text and "GPU check on" not in text  # dry runs are not figures
    data.update(dry_run=False)
    data["versions"]["device_name"] = "NVIDIA H200"
    data["peaks"] = gpu_check.device_peaks("NVIDIA H200")
    data["parts"]["attention"]["result"]["rows"][0]["fastddpm"]["fwd_s"] = 0.00125
    (tmp_path / "gpu_dryrun.json").unlink()
    (tmp_path / "gpu_nvidia_h200.json").write_text(json.dumps(data))
    text = report.render(tmp_path)
    assert "### GPU check on NVIDIA H200" in text and "not run on a GPU yet" not in text
    assert "HBM 4.80 TB/s" in text and "| 1.25 |" in text  # 1.25 ms, the one figure set above
    for heading in ("GroupNorm+SiLU", "Attention", "Sampler step", "U-Net", "Activation layout",
                    "FastSampler end to end"):
        assert heading in text
    assert report.render(tmp_path) == text  # a pure function of the files


@pytest.mark.parametrize("name,hbm,flops", [
    ("NVIDIA H200", 4.8e12, 989e12), ("NVIDIA H100 80GB HBM3", 3.35e12, 989e12),
    ("NVIDIA H100 PCIe", 2.0e12, 756e12), ("NVIDIA A100-SXM4-80GB", 2.0e12, 312e12), ("Tesla T4", None, None)])
def test_device_peaks_by_name(name, hbm, flops):
    peaks = gpu_check.device_peaks(name)
    assert peaks["hbm_Bps"] == hbm and peaks["bf16_flops"] == flops
    assert gpu_check.pct(1.2e12, peaks["hbm_Bps"]) == (None if hbm is None else pytest.approx(100 * 1.2e12 / hbm))


def test_parts_option():
    assert gpu_check.parse_parts("attention,tests") == ["tests", "attention"]  # run in the script's order
    with pytest.raises(Exception, match="subset of tests,device"):
        gpu_check.parse_parts("attention,nope")
    assert math.isclose(sum(gpu_check.PART_BUDGETS.values()), 480)  # 8 minutes in all


def test_layout_verdict():
    """channels-last becomes the verdict only when faster than NCHW by the margin in both measurements."""
    v, m = gpu_check.layout_verdict, gpu_check.LAYOUT_MARGIN
    assert v(None, 0.5) == v(0.5, None) == "not measured"
    assert v(0.8, 0.9) == "channels_last"
    assert v(0.8, m) == v(m + 0.01, 0.8) == v(1.2, 1.1) == "nchw"


def test_spent_budget_skips_later_parts_cleanly(tmp_path, capsys):
    path, data = gpu_check.run(["device", "step"], budget_s=1e-9, dry=True, out_dir=tmp_path)
    for name in ("device", "step"):
        assert data["parts"][name]["status"].startswith("skipped"), data["parts"][name]
    out = capsys.readouterr().out
    assert "[device] skipped: time budget spent" in out and "[step] skipped" in out
    assert json.loads(path.read_text())["parts"]["step"]["status"].startswith("skipped")

"""benchmarks/gpu_check.py without a GPU: the --dry-run (every part's code path on the CPU, interpreter,
tiny shapes, no timings), a dry run interrupted by SIGINT / SIGTERM mid-way (finished parts and rows kept),
a part stopped at its hard deadline, the tests part's runner (per-test timeouts, exit 5, failures logged as
they happen), the headline figures, the device peak table, --parts, the budget, and report.py's rendering.

The full dry run is one subprocess (a process per part inside it; ~1 min of CPU), shared by the tests below.
"""
from __future__ import annotations

import builtins
import copy
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_{name}_under_test", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load("gpu_check")
report = _load("report")
from benchmarks import gpu_parts, gpu_summary  # noqa: E402


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
    assert not list(out.glob(".*")), list(out.iterdir())  # no part file or temporary file left behind
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
    assert data["dry_run"] is True and data["complete"] is True and list(data["parts"]) == list(gpu_check.PARTS)
    for name, entry in data["parts"].items():
        assert entry["status"] == "ok", (name, entry)
        assert f"[{name}] ok in" in stdout  # each part's time is printed
    parts = {k: v["result"] for k, v in data["parts"].items()}
    timed = [(k, v) for k, v in _figures(parts) if k not in ("budget_s",)]
    assert timed and all(v is None for _, v in timed), [kv for kv in timed if kv[1] is not None][:5]
    for key in ("torch", "triton", "cuda", "device_name", "driver", "diffusers"):
        assert key in data["versions"]
    # the fused ops were checked against torch before timing: bf16 errors at bf16 rounding
    for row in parts["group_norm"]["rows"]:
        assert row["fastddpm_rel_err"] <= 2 * row["torch_eager_rel_err"] + 2**-7
        assert row["fastddpm"]["timing"].startswith("graph")  # the graph-replay path ran (as Python in a dry run)
    rows = parts["attention"]["rows"]
    assert [(r["layout"], r["dtype"]) for r in rows] == [("unet", "bfloat16"), ("unet", "float32")] + [
        ("contiguous", "bfloat16")] * 3 + [("contiguous", "float32")]
    for r in rows:
        assert r["fastddpm_rel_err"] <= (2e-2 if r["dtype"] == "bfloat16" else 1e-4), r
        assert "attention" in r["sdpa_backend"], r  # which SDPA kernel ran is recorded
    assert rows[4]["path"].startswith("sdpa")  # head_dim 512
    assert all(r["fused_rel_err"] <= 2e-2 for r in parts["step"]["rows"]) and len(parts["step"]["rows"]) == 4
    grads = parts["grads"]
    assert grads["ok"] and set(grads["ops"]) == {"group_norm_silu float32", "group_norm_silu bfloat16",
                                                 "attention float32", "attention bfloat16"}
    assert set(grads["ops"]["attention bfloat16"]) == {"out", "dq", "dk", "dv"}
    assert grads["unet"]["ok"] and grads["unet"]["max_grad_rel_err"] <= grads["unet"]["threshold"]
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
    tests = parts["tests"]
    assert tests["ok"] and "tests/gpu" in tests["command"] and "gpu and not compile_heavy" in tests["command"]
    assert tests["counts"].get("skipped", 0) > 0 and not tests["failed"]  # on a CPU every GPU test skips
    # each part's figures are printed as it ends, and the README's figures are in the headline
    assert "SDPA ran _scaled_dot_product" in stdout and "U-Net fp32 Triton vs reference" in stdout
    head = data["headline"]
    assert set(gpu_summary.TARGETS) <= set(head)
    assert [r["dtype"] for r in head["attention_time_over_sdpa_unet_layout"]["rows"]] == ["bfloat16", "float32"]
    assert len(head["fast_sampler_speedup_vs_diffusers_eager"]["rows"]) == 4
    assert all(head[k]["met"] is None for k in gpu_summary.TARGETS)  # nothing measured, nothing claimed


def _dry(args, env_extra=None, **kw):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _wait_for(predicate, timeout=300.0):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail("timed out waiting for the dry run")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_dry_run_keeps_finished_parts(tmp_path, sig):
    """A signal mid-way: the finished part and the running part's finished rows are in the results file, the
    later part is recorded as not run, the part's process is gone, and the exit status says which signal."""
    pytest.importorskip("triton")
    part_file = tmp_path / ".part_step.json"

    def step_has_a_row():  # `step` saved its first row (the stall hook then holds it there)
        try:
            return bool(json.loads(part_file.read_text()).get("result"))
        except (OSError, ValueError):
            return False

    proc = _dry(["--parts", "device,step,layout", "--out", str(tmp_path), "--budget", "900"],
                {gpu_check.STALL_ENV: "step"})
    try:
        _wait_for(step_has_a_row)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, out[-3000:]
    data = json.loads((tmp_path / "gpu_dryrun.json").read_text())
    parts = data["parts"]
    assert data["complete"] is False
    assert parts["device"]["status"] == "ok" and "copy_Bps" in parts["device"]["result"]
    assert parts["step"]["status"] == f"interrupted by {sig.name}", parts["step"]
    assert len(parts["step"]["result"]["rows"]) == 1  # the row it finished before the signal
    assert parts["layout"]["status"].startswith("not run: interrupted")
    assert "interrupted" in out and not part_file.exists()


def test_part_past_its_deadline_is_stopped_and_keeps_its_rows(tmp_path):
    """A part that hangs (the stall hook) is stopped at its hard deadline; the run goes on and ends."""
    pytest.importorskip("triton")
    proc = _dry(["--parts", "step", "--out", str(tmp_path), "--budget", "30"], {gpu_check.STALL_ENV: "step"})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-3000:]  # a timed-out part is a failure
    entry = json.loads((tmp_path / "gpu_dryrun.json").read_text())["parts"]["step"]
    assert entry["status"].startswith("timed out: stopped at its deadline"), entry
    assert len(entry["result"]["rows"]) == 1


def _write_tests(folder: Path, body: str) -> None:
    folder.mkdir()
    (folder / "test_cases.py").write_text(body)


def test_tests_part_counts_timeouts_failures_and_exit_5(tmp_path):
    """The tests part's runner: a per-test timeout and an assertion are failures, named with their test; the run
    continues past a timeout; pytest's exit 5 (nothing ran) is a failure; results are saved while it runs."""
    _write_tests(tmp_path / "a", "import time\n"
                 "def test_ok():\n    assert 1 + 1 == 2\n"
                 "def test_slow():\n    time.sleep(60)\n"
                 "def test_wrong():\n    assert 1 + 1 == 3\n"
                 "def test_after():\n    pass\n")
    saved = []
    res = gpu_check.run_pytest([str(tmp_path / "a"), "--rootdir", str(tmp_path), "-c", os.devnull],
                               time.time() + 120, saved.append, per_test_timeout=2, cwd=tmp_path)
    assert not res["ok"] and res["returncode"] == 1
    assert res["counts"] == {"passed": 2, "failed": 2}
    names = sorted(f.split(" ")[0].split("::")[-1] for f in res["failed"])
    assert names == ["test_slow", "test_wrong"] and res["timeouts"][0].endswith("test_slow")
    assert saved and saved[-1]["counts"].get("failed", 0) >= 1  # recorded while pytest was still running
    _write_tests(tmp_path / "b", "def helper():\n    pass\n")
    res = gpu_check.run_pytest([str(tmp_path / "b"), "--rootdir", str(tmp_path), "-c", os.devnull],
                               time.time() + 120, saved.append, cwd=tmp_path)
    assert res["returncode"] == 5 and not res["ok"] and "pytest ran no test (exit 5)" in res["problems"]


def test_tests_part_stopped_at_its_deadline_is_a_failure(tmp_path):
    _write_tests(tmp_path / "c", "import time\ndef test_ok():\n    pass\ndef test_hang():\n    time.sleep(60)\n")
    res = gpu_check.run_pytest([str(tmp_path / "c"), "--rootdir", str(tmp_path), "-c", os.devnull],
                               time.time() + 15, lambda r: None, per_test_timeout=0, cwd=tmp_path)
    assert res["timed_out"] and not res["ok"] and res["counts"].get("passed") == 1
    assert "pytest was stopped at the part's deadline" in res["problems"]


def test_test_targets_put_kernel_tests_first():
    targets = gpu_check.test_targets()
    assert targets[:2] == ["tests/kernels", "tests/gpu"]
    assert "tests/test_gpu_check.py" in targets and len(set(targets)) == len(targets)
    assert not any(t.startswith(("tests/kernels/", "tests/gpu/")) for t in targets)  # nothing collected twice


def test_headline_from_made_up_figures():
    """The README's figures: worst GroupNorm+SiLU fwd+bwd % of the measured copy at the CIFAR shapes, worst
    attention / SDPA time in the U-Net layout (bf16, one head), worst FastSampler speedup (capture=step)."""
    gn = lambda shape, p: {"shape": shape, "fastddpm": {"fwd_pct_of_measured_copy": p + 5,  # noqa: E731
                                                        "fwd_bwd_pct_of_measured_copy": p}}
    att = lambda shape, dt, f, fb: {"layout": "unet", "shape": shape, "dtype": dt, "sdpa_backend": "x",  # noqa: E731
                                    "fwd_time_ratio_vs_sdpa": f, "fwd_bwd_time_ratio_vs_sdpa": fb}
    report_ = {"parts": {
        "device": {"result": {"copy_Bps": 3.0e12}},
        "group_norm": {"result": {"rows": [gn([32, 128, 64, 64], 50.0), gn([128, 256, 16, 16], 85.0),
                                           gn([128, 256, 4, 4], 81.0)]}},
        "attention": {"result": {"rows": [att([128, 1, 16, 16, 256], "bfloat16", 0.9, 1.05),
                                          att([128, 1, 16, 16, 256], "float32", 3.0, 3.0),
                                          att([64, 4, 16, 16, 256], "bfloat16", 2.0, 2.0)]}},
        "sampling": {"result": {"rows": [{"sampler": "ddim", "steps": 50, "dtype": "bfloat16", "batch": 256,
                                          "speedup_step_vs_diffusers": 2.5}]}}}}
    h = gpu_summary.headline(report_)
    assert h["measured_copy_TBps"] == pytest.approx(3.0)
    assert h["group_norm_silu_pct_of_measured_copy"]["worst_fwd_bwd"] == 81.0  # the 32x128x64x64 row is no CIFAR shape
    assert h["group_norm_silu_pct_of_measured_copy"]["met"] is True
    assert h["attention_time_over_sdpa_unet_layout"]["worst_bf16_one_head"] == 1.05
    assert h["attention_time_over_sdpa_unet_layout"]["met"] is True
    assert h["fast_sampler_speedup_vs_diffusers_eager"]["worst_capture_step"] == 2.5
    lines = gpu_summary.summary_lines("attention", report_["parts"]["attention"]["result"] | {
        "rows": [dict(report_["parts"]["attention"]["result"]["rows"][0], bhnd=[128, 1, 256, 256],
                      fastddpm={"fwd_s": 0.002}, sdpa={"fwd_s": 0.001})]}, {})
    assert lines == ["unet 128x1x16x16x256 bfloat16: fwd 2 ms vs SDPA 1 ms (0.9x), fwd+bwd 1.05x; SDPA ran x"]


def test_grad_threshold_rule():
    assert gpu_parts.grad_threshold(True, torch.float32, 1e-7) == 1e-5
    assert gpu_parts.grad_threshold(False, torch.float32, 1e-3) == 2e-3
    assert gpu_parts.grad_threshold(False, torch.bfloat16, 1e-3) == pytest.approx(2e-3 + 2**-7)


def test_interpreter_on_a_cuda_machine_fails_loudly(tmp_path):
    """TRITON_INTERPRET=1 exported where CUDA is available would skip every GPU test: conftest stops the run."""
    code = ("import sys, torch; torch.cuda.is_available = lambda: True; import pytest; "
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '--co', {str(ROOT / 'tests' / 'test_schedule.py')!r}]))")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "TRITON_INTERPRET=1" in proc.stdout + proc.stderr, proc.stdout[-2000:]
    env.pop("TRITON_INTERPRET")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.slow
def test_report_renders_a_gpu_file_and_says_when_there_is_none(dry_run, tmp_path):
    data = copy.deepcopy(dry_run[0])
    assert "GPU check: no results file from a GPU run" in report.render(tmp_path)
    (tmp_path / "gpu_dryrun.json").write_text(json.dumps(data))
    text = report.render(tmp_path)
    assert "GPU check: no results file from a GPU run" in text and "GPU check on" not in text  # dry runs are not figures
    data.update(dry_run=False)
    data["versions"]["device_name"] = "NVIDIA H200"
    data["peaks"] = gpu_check.device_peaks("NVIDIA H200")
    data["parts"]["attention"]["result"]["rows"][0]["fastddpm"]["fwd_s"] = 0.00125
    (tmp_path / "gpu_dryrun.json").unlink()
    (tmp_path / "gpu_nvidia_h200.json").write_text(json.dumps(data))
    text = report.render(tmp_path)
    assert "### GPU check on NVIDIA H200" in text and "GPU check: no results file" not in text
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
    assert gpu_summary.pct(1.2e12, peaks["hbm_Bps"]) == (None if hbm is None else pytest.approx(100 * 1.2e12 / hbm))


def test_parts_option():
    assert gpu_check.parse_parts("attention,tests") == ["tests", "attention"]  # run in the script's order
    with pytest.raises(Exception, match="subset of tests,device"):
        gpu_check.parse_parts("attention,nope")
    # the default budget plus the last part's kill grace stays within 8 minutes
    assert sum(gpu_check.PART_BUDGETS.values()) + gpu_check.KILL_GRACE_S <= 480


def test_layout_verdict():
    """channels-last becomes the verdict only when faster than NCHW by the margin in both measurements."""
    v, m = gpu_parts.layout_verdict, gpu_parts.LAYOUT_MARGIN
    assert v(None, 0.5) == v(0.5, None) == "not measured"
    assert v(0.8, 0.9) == "channels_last"
    assert v(0.8, m) == v(m + 0.01, 0.8) == v(1.2, 1.1) == "nchw"


def test_spent_budget_skips_later_parts_cleanly(tmp_path, capsys):
    path, data = gpu_check.run(["device", "step"], budget_s=1e-9, dry=True, out_dir=tmp_path)
    for name in ("device", "step"):
        assert data["parts"][name]["status"].startswith("skipped"), data["parts"][name]
    out = capsys.readouterr().out
    assert "[device] skipped: the time budget ran out" in out and "[step] skipped" in out
    assert json.loads(path.read_text())["parts"]["step"]["status"].startswith("skipped")


def test_a_part_the_budget_never_reached_fails_the_run(tmp_path):
    """A run that never starts `sampling` (the headline part) for want of time must not pass; a part skipped
    because something it needs is missing is no failure."""
    code = gpu_check.main(["--dry-run", "--parts", "device,sampling", "--budget", "1e-9", "--out", str(tmp_path)])
    assert code == 1
    parts = json.loads((tmp_path / "gpu_dryrun.json").read_text())["parts"]
    assert parts["sampling"]["status"] == gpu_check.BUDGET_SPENT
    missing = {"parts": {"device": {"status": "ok"}, "sampling": {"status": "skipped: diffusers is not installed: x"}}}
    assert gpu_check.exit_status(missing) == 0
    missing["parts"]["device"]["status"] = gpu_check.BUDGET_SPENT
    assert gpu_check.exit_status(missing) == 1


@pytest.mark.parametrize("where,sig", [("_record", signal.SIGINT), ("summary_lines", signal.SIGTERM),
                                       ("print", signal.SIGINT)])
def test_a_signal_between_parts_stops_cleanly(tmp_path, monkeypatch, where, sig):
    """SIGINT / SIGTERM while a part is recorded, its summary printed, or the final lines printed: no
    traceback, the results file is written, later parts are not run, the exit status says which signal."""
    real = getattr(gpu_check, where, None) or builtins.print
    sent = []

    def hook(*args, **kwargs):
        if not sent:
            sent.append(sig)
            os.kill(os.getpid(), sig)  # delivered here, inside the driver's code
        return real(*args, **kwargs)

    monkeypatch.setattr(gpu_check, where, hook, raising=False)
    outside = []  # a signal that escaped the driver's handling lands here, not in pytest's

    def catch(signum, frame):
        outside.append(signum)

    before = {s: signal.signal(s, catch) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = gpu_check.main(["--dry-run", "--parts", "device,step", "--budget", "1e-9", "--out", str(tmp_path)])
        restored = [signal.getsignal(s) for s in before]
    finally:
        for s, h in before.items():
            signal.signal(s, h)
    assert sent and not outside and code == 128 + sig
    assert restored == [catch, catch]  # the driver put the handlers it found back
    data = json.loads((tmp_path / "gpu_dryrun.json").read_text())
    assert data["parts"]["device"]["status"] == gpu_check.BUDGET_SPENT
    if where == "print":  # every part was done when the signal came
        assert data["parts"]["step"]["status"] == gpu_check.BUDGET_SPENT
    else:
        assert data["parts"]["step"]["status"] == f"not run: interrupted by {sig.name}" and not data["complete"]


def test_a_diffusers_that_does_not_import_skips_its_parts(tmp_path, monkeypatch):
    """has_diffusers imports diffusers: an import that raises anything makes `sampling` a one-line skip in the
    part's process (not a failure), and a diffusers that is not there says so."""
    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "diffusers" or name.startswith("diffusers."):
            raise RuntimeError("huggingface_hub 0.20 is too old\nsecond line")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(gpu_parts, "_DIFFUSERS_PROBLEM", [])
    monkeypatch.setattr(builtins, "__import__", broken)
    problem = gpu_parts.diffusers_problem()
    assert not gpu_parts.has_diffusers() and "\n" not in problem
    assert problem.startswith("diffusers does not import (RuntimeError: huggingface_hub 0.20 is too old)")
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:  # the sampling part as its process runs it
        gpu_check.child_main("sampling", tmp_path / "part.json", time.time() + 120, True, None)
    finally:
        for s, h in before.items():
            signal.signal(s, h)
    state = json.loads((tmp_path / "part.json").read_text())
    assert state["status"] == f"skipped: {problem}" and "traceback" not in state
    monkeypatch.setattr(builtins, "__import__", real_import)
    monkeypatch.setattr(gpu_parts, "_DIFFUSERS_PROBLEM", [])
    monkeypatch.setitem(sys.modules, "diffusers", None)  # not installed
    assert gpu_parts.diffusers_problem().startswith("diffusers is not installed: carry its wheels")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run without a CUDA device")
def test_a_run_without_cuda_stops_after_its_first_part(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--parts", "device,step",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    parts = json.loads(next(tmp_path.glob("gpu_*.json")).read_text())["parts"]
    assert parts["device"]["status"].startswith("failed: RuntimeError: no CUDA device")
    assert parts["step"]["status"].startswith("not run: no CUDA device")

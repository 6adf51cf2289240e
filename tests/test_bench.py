"""benchmarks/report.py (docs/performance.md's generated section from results JSON) and the `fastddpm bench` command.

Fast: no benchmark is run; report.py works on a small synthetic results folder, and the bench command
is driven on a stand-in checkout whose scripts are one-liners.
"""
import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fastddpm.cli import bench, build_parser

ROOT = Path(__file__).resolve().parents[1]


def _load_report():
    spec = importlib.util.spec_from_file_location("_report_under_test", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


report = _load_report()

CPU_MACHINE = {"python": "3.11.7", "torch": "2.13.0+cpu", "platform": "Linux", "cpu_count": 2, "cpu": "Test CPU",
               "torch_threads": 1}


def _impl(overhead, cpu_overhead, steady, no_views, amortised):
    return {"us_per_step": overhead + 10.0, "cpu_us_per_step": cpu_overhead + 5.0, "overhead_us_per_step": overhead,
            "overhead_cpu_us_per_step": cpu_overhead, "overhead_min_us_per_step": overhead,
            "ops_per_step": amortised, "ops_per_step_steady": steady, "ops_per_step_steady_no_views": no_views,
            "ops_steady_step": [], "ops_before_first_model_call": 0, "ops_after_last_model_call": 0,
            "model_ops_per_call": 2}


def _sampling_cpu():
    return {
        "machine": CPU_MACHINE, "command": "python benchmarks/bench_sampling.py --json", "threads": 1,
        "overhead": [{
            "sampler": "ddim", "batch": 8, "steps": 50, "model": "1x1 conv 3->3", "model_us_per_call": 10.0,
            "fast_sampler": _impl(100.0, 40.0, 5, 4, 11.04),
            "sampler_sample": _impl(150.0, 60.0, 3, 2, 9.06),
            "diffusers_loop": _impl(900.0, 300.0, 36, 32, 34.98),
            "overhead_cpu_ratio_sampler_sample_over_fast": 1.5, "overhead_cpu_ratio_diffusers_loop_over_fast": 7.5,
        }],
        "e2e_cpu": [{
            "sampler": "ddpm", "batch": 8, "steps": 20, "dtype": "float32", "model": "DDPM CIFAR-10",
            "fast_sampler": {"images_per_s": 0.25, "images_per_cpu_s": 0.5, "repeats": 2},
            "diffusers_pipeline": {"images_per_s": 0.2, "images_per_cpu_s": 0.4, "repeats": 2},
            "fast_sampler_unconverted": {"images_per_s": 0.21, "images_per_cpu_s": 0.42, "repeats": 2},
            "speedup_vs_diffusers": 1.25, "speedup_vs_diffusers_cpu": 1.25,
            "speedup_unconverted_vs_diffusers": 1.05, "speedup_unconverted_vs_diffusers_cpu": 1.05,
        }],
        "unet_forward_cpu": {"batch": 8, "repeats": 3, "fastddpm": {"s_per_forward": 2.0, "cpu_s_per_forward": 1.2},
                             "diffusers": {"s_per_forward": 1.9, "cpu_s_per_forward": 1.0},
                             "cpu_time_ratio_fastddpm_over_diffusers": 1.2},
    }


def _sampling_gpu():
    return {"machine": {**CPU_MACHINE, "gpu": "NVIDIA H100"}, "command": "python benchmarks/bench_sampling.py",
            "rows": [{"sampler": "ddim", "steps": 20, "batch": 256, "dtype": "bfloat16",
                      "fast_sampler": {"images_per_s": 3000.0}, "diffusers_eager": {"images_per_s": 1000.0},
                      "diffusers_compiled": {"images_per_s": 2000.0},
                      "speedup_vs_diffusers_eager": 3.0, "speedup_vs_diffusers_compiled": 1.5}]}


@pytest.fixture
def results(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    (d / "sampling_cpu.json").write_text(json.dumps(_sampling_cpu()))
    (d / "zz_custom.json").write_text(json.dumps({"machine": CPU_MACHINE, "benchmark": "custom thing",
                                                  "speed": {"ours_ms": 12.5, "peer_ms": 25.0}}))
    return d


PAGE_TEXT = "# title\n\nintro stays\n\n<!-- perf:begin -->\nold stuff\n<!-- perf:end -->\n\n## After\ntail stays\n"


def test_render_rows(results):
    text = report.render(results)
    # overhead rows: figures from the file, ratio to FastSampler read from the same run
    assert "| ddim | FastSampler | 100 | 40.0 | 1.00x | 5 (4) | 11.0 |" in text
    assert "| ddim | sampler.sample | 150 | 60.0 | 1.50x | 3 (2) | 9.06 |" in text
    assert "| ddim | diffusers pipeline loop | 900 | 300 | 7.50x | 36 (32) | 35.0 |" in text
    assert "| ddpm | FastSampler (converted fd.UNet) | 0.250 | 0.200 | 1.25x | 0.500 | 0.400 | 1.25x | 2 |" in text
    assert "| ddpm | FastSampler around diffusers' UNet2DModel | 0.210 | 0.200 | 1.05x | 0.420 | 0.400 | 1.05x | 2 |" in text
    assert "fd.UNet 1.20 s, diffusers UNet2DModel 1.00 s of CPU time per forward (fd.UNet / UNet2DModel 1.20x)" in text
    # command and machine of the run
    assert "Reproduce: `python benchmarks/bench_sampling.py --json` (results/sampling_cpu.json)" in text
    assert "Machine: Test CPU, 2 cores; 1 torch thread; torch 2.13.0+cpu; Python 3.11.7" in text
    # an unknown file gets a generic table of its numbers
    assert "### custom thing" in text
    assert "| speed.ours_ms | 12.5 |" in text and "| speed.peer_ms | 25.0 |" in text
    # no GPU results file: no GPU figures, only the note that there are none
    assert "img/s | diffusers eager" not in text
    assert "GPU figures: none (" in text
    assert report.render(results) == text  # no timestamps: a pure function of the files


def test_render_gpu_only_with_gpu_file(results):
    (results / "sampling_gpu.json").write_text(json.dumps(_sampling_gpu()))
    text = report.render(results)
    assert "| ddim | 20 | 256 | bfloat16 | 3,000 | 1,000 | 2,000 | 3.00x | 1.50x |" in text
    assert "Machine: GPU NVIDIA H100" in text
    assert "GPU figures: none (" not in text
    # known files come before unknown ones, CPU before GPU
    assert text.index("Sampling on the CPU") < text.index("Sampling on a GPU") < text.index("custom thing")


def test_render_empty(tmp_path):
    assert "No benchmark results yet" in report.render(tmp_path / "missing")


def test_splice_replaces_only_between_markers(results):
    section = report.render(results)
    new = report.splice(PAGE_TEXT, section)
    before, rest = new.split(report.BEGIN)
    inside, after = rest.split(report.END)
    assert before == "# title\n\nintro stays\n\n"
    assert after == "\n\n## After\ntail stays\n"
    assert inside == "\n" + section and "old stuff" not in new
    assert report.splice(new, section) == new  # idempotent
    with pytest.raises(ValueError, match="markers"):
        report.splice("# no markers here\n", section)
    with pytest.raises(ValueError, match="markers"):
        report.splice(f"{report.END}\n{report.BEGIN}\n", section)  # wrong order


def test_main_update_and_check(results, tmp_path, capsys):
    page = tmp_path / "performance.md"
    page.write_text(PAGE_TEXT)
    args = ["--results", str(results), "--page", str(page)]
    assert report.main(args + ["--check"]) == 1  # stale
    assert page.read_text() == PAGE_TEXT  # --check never writes
    assert report.main(args) == 0
    updated = page.read_text()
    assert updated.startswith("# title\n\nintro stays\n\n<!-- perf:begin -->\n")
    assert updated.endswith("<!-- perf:end -->\n\n## After\ntail stays\n")
    assert "| ddim | FastSampler |" in updated
    assert report.main(args + ["--check"]) == 0
    (results / "sampling_gpu.json").write_text(json.dumps(_sampling_gpu()))
    assert report.main(args + ["--check"]) == 1  # a new results file makes it stale again
    nomark = tmp_path / "NOMARK.md"
    nomark.write_text("# x\n")
    assert report.main(["--results", str(results), "--page", str(nomark)]) == 2
    assert "markers" in capsys.readouterr().err


def test_fmt():
    assert [report.fmt(v) for v in (1234567, 1234.5, 123.4, 12.34, 1.234, 0.01234)] == \
        ["1,234,567", "1,234", "123", "12.3", "1.23", "0.0123"]


# ------------------------------------------------------------------------------ fastddpm bench
def _parser():
    return build_parser()


def test_cli_rejects_unknown_suite(capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["bench", "--suite", "nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "nope" in err
    for name in ("all", "figures", "step", "sampling", "unet", "kernels"):
        assert f"'{name}'" in err


def test_cli_parses_known_suites():
    ns = _parser().parse_args(["bench", "--suite", "sampling", "--json"])
    assert (ns.suite, ns.json, ns._run) == ("sampling", True, bench.run)
    assert _parser().parse_args(["bench"]).suite == "all"


def test_run_suite_unknown_suite_is_value_error(tmp_path):
    with pytest.raises(ValueError, match="all, figures, step, sampling, unet, kernels"):
        bench.run_suite("nope", repo=tmp_path)
    with pytest.raises(ValueError, match="suite"):
        bench.suite_commands("", tmp_path)


def test_suite_commands_in_this_checkout():
    repo = bench.find_repo()
    assert repo == ROOT
    cmds = bench.suite_commands("sampling", repo, json_out=True)
    assert [c[1][1:] for c in cmds] == [[str(ROOT / "benchmarks" / "bench_sampling.py"), "--json"]]
    assert cmds[0][1][0] == sys.executable
    cmds = bench.suite_commands("step", repo, json_out=False)
    assert cmds[0][1][-1].endswith("bench_step.py")  # no --json unless asked
    kernels = bench.suite_commands("kernels", repo)
    assert all(a[-1] == "--json" for _, a in kernels)  # captured scripts always print JSON


def test_no_checkout_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "__file__", str(tmp_path / "site-packages" / "fastddpm" / "cli" / "bench.py"))
    monkeypatch.delenv("FASTDDPM_REPO", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(bench.BenchError, match="checkout"):
        bench.find_repo()
    ns = argparse.Namespace(suite="all", json=False, no_report=False)
    assert bench.run(ns) == 1


def _fake_repo(tmp_path):
    """A stand-in checkout: scripts that record that they ran, a report stub, and benchmarks/common.py."""
    repo = tmp_path / "repo"
    (repo / "fastddpm").mkdir(parents=True)
    b = repo / "benchmarks"
    b.mkdir()
    log = tmp_path / "ran.txt"
    (b / "common.py").write_text((ROOT / "benchmarks" / "common.py").read_text())
    (b / "figures.py").write_text(f"import sys\nopen({str(log)!r}, 'a').write('figures ' + ' '.join(sys.argv[1:]) + '\\n')\n")
    (b / "kernel_report.py").write_text("import json\nprint(json.dumps([{'kernel': 'k', 'registers': 32}]))\n")
    (b / "bench_group_norm.py").write_text("import json\nprint(json.dumps({'model': [1, 2]}))\n")
    (b / "bench_attention.py").write_text("print('not json')\n")
    (b / "report.py").write_text(f"open({str(log)!r}, 'a').write('report\\n')\n")
    return repo, log


def test_run_suite_on_a_checkout(tmp_path):
    repo, log = _fake_repo(tmp_path)
    real_before = sorted(p.name for p in (ROOT / "benchmarks" / "results").glob("*.json"))
    assert bench.run_suite("figures", json_out=True, repo=repo) == 0
    assert log.read_text() == "figures --json\nreport\n"
    # kernels: JSON stdout captured into results/<name>.json with the machine; a script without JSON fails
    assert bench.run_suite("kernels", repo=repo, report=False) == 1
    kern = json.loads((repo / "benchmarks" / "results" / "kernels.json").read_text())
    assert kern["rows"] == [{"kernel": "k", "registers": 32}] and "machine" in kern
    assert "kernel_report.py --json" in kern["command"]
    assert json.loads((repo / "benchmarks" / "results" / "group_norm.json").read_text())["model"] == [1, 2]
    assert not (repo / "benchmarks" / "results" / "attention.json").exists()
    # a suite whose script is absent: named explicitly -> error; within "all" -> skipped
    with pytest.raises(bench.BenchError, match="bench_unet.py"):
        bench.run_suite("unet", repo=repo)
    assert [a[1].rsplit("/", 1)[-1] for _, a in bench.suite_commands("all", repo)] == [
        "figures.py", "kernel_report.py", "bench_group_norm.py", "bench_attention.py"]
    assert sorted(p.name for p in (ROOT / "benchmarks" / "results").glob("*.json")) == real_before  # untouched


def test_render_unet_and_fallback(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    body = {"config": "cfg", "batch": 8, "reps": 5,
            "forward": {"diffusers": {"median_s": 3.0, "min_s": 2.5}, "fastddpm": {"median_s": 3.3, "min_s": 2.6}},
            "forward_ratio_fastddpm_vs_diffusers": 1.1,
            "saved_bytes_per_sample": {"diffusers": 50_000_000, "fastddpm": 21_000_000},
            "saved_bytes_ratio_fastddpm_vs_diffusers": 0.42}
    (d / "unet_cpu.json").write_text(json.dumps({"machine": CPU_MACHINE, "unet_cpu": body, "command": "cmd u"}))
    (d / "step_cpu.json").write_text(json.dumps({"rows": [{"sampler": "ddpm"}], "threads": 1}))  # not its format
    text = report.render(d)
    assert "| forward | fastddpm | 3.30 | 2.60 | 1.10x |" in text
    assert "| fastddpm | 21.0 MB | 0.42x |" in text
    assert "Reproduce: `cmd u` (results/unet_cpu.json)" in text
    # a known file in an unexpected format falls back to the generic table instead of failing
    assert "### step_cpu" in text and "rows:\n\n| sampler |\n|---|\n| ddpm |" in text
    assert "One sampler step()" not in text


def test_run_suite_with_out_dir_leaves_the_checkout_alone(tmp_path):
    repo, log = _fake_repo(tmp_path)
    out = tmp_path / "out"
    assert bench.run_suite("kernels", repo=repo, out_dir=out) == 1  # bench_attention.py prints no JSON
    assert json.loads((out / "kernels.json").read_text())["rows"] == [{"kernel": "k", "registers": 32}]
    assert json.loads((out / "group_norm.json").read_text())["model"] == [1, 2]
    assert not (repo / "benchmarks" / "results").exists()  # nothing written into the checkout
    timings = json.loads((out / "timings.json").read_text())["seconds"]
    assert set(timings) == {"benchmarks/kernel_report.py", "benchmarks/bench_group_norm.py",
                            "benchmarks/bench_attention.py"}
    assert (out / "performance.md").exists()  # the report, printed into the out dir, not docs/performance.md


def test_cli_writes_an_out_dir_unless_update_results(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(bench, "run_suite", lambda suite, json_out, report, out_dir, threads=None: calls.append((suite, out_dir)) or 0)
    from fastddpm.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--suite", "step"]) == 0
    assert main(["bench", "--out-dir", "x"]) == 0
    assert main(["bench", "--update-results", "--no-report"]) == 0
    assert calls == [("step", Path("bench-results")), ("all", Path("x")), ("all", None)]


def test_bench_help_states_each_suite_time(capsys):
    from fastddpm.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in bench.SUITES:
        assert f"{name}: {bench.SUITE_MINUTES[name]}" in text


def test_performance_page_is_current():
    """docs/performance.md's generated section is what report.py renders from the committed results files."""
    assert report.main(["--check"]) == 0

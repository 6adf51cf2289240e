"""``fastddpm bench``: run the benchmark scripts of a fastddpm checkout and report their figures.

    fastddpm bench --suite step         # one suite -> bench-results/step_cpu.json + bench-results/performance.md
    fastddpm bench --out-dir my-run     # every suite, results under my-run/
    fastddpm bench --update-results     # every suite -> benchmarks/results/ + docs/performance.md

The benchmarks live in the repository (``benchmarks/``), not in the installed package: the checkout is
found next to the package (an editable install), else in the current directory or one of its parents,
else in ``$FASTDDPM_REPO``; without one, the command says to run it from a checkout. Each suite's
figures are written as JSON with the machine they ran on (by the script itself, or, for scripts that
only print JSON, by this command) into ``--out-dir`` (default ``bench-results/`` in the current
directory), with the report rendered from them as ``performance.md`` beside them and each script's
wall time in ``timings.json``. Only ``--update-results`` writes the tracked ``benchmarks/results/``
and regenerates the generated part of ``docs/performance.md`` (``--no-report``: the results only).

``HELP`` / ``configure(parser)`` / ``run(args)`` are this command's entry in :mod:`fastddpm.cli`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["SUITES", "HELP", "configure", "run", "find_repo", "suite_commands",
           "BenchError"]

HELP = ("run the benchmarks of a fastddpm checkout (results into bench-results/; --update-results: "
        "benchmarks/results/ and docs/performance.md)")


@dataclass(frozen=True)
class Script:
    """One benchmark script: its path under the repo, its arguments, and the results file it fills when
    it only prints JSON (`capture`: the name under benchmarks/results/, None when it writes its own)."""

    path: str
    args: Tuple[str, ...] = ()
    capture: Optional[str] = None
    json_flag: bool = True  # accepts --json


# Suite name -> scripts, in the order they run.
SUITES: Dict[str, Tuple[Script, ...]] = {
    "figures": (Script("benchmarks/figures.py"),),
    "step": (Script("benchmarks/bench_step.py"),),
    "sampling": (Script("benchmarks/bench_sampling.py"),),
    "unet": (Script("benchmarks/bench_unet.py"),),
    "kernels": (Script("benchmarks/kernel_report.py", capture="kernels"),
                Script("benchmarks/bench_group_norm.py", capture="group_norm"),
                Script("benchmarks/bench_attention.py", capture="attention")),
}
SUITE_CHOICES = ("all",) + tuple(SUITES)
REPORT = "benchmarks/report.py"
DEFAULT_OUT_DIR = "bench-results"
# wall time of each suite (`fastddpm bench --suite X`, niced, on the 2-core x86_64 machine the results
# name while other jobs kept 7-14 processes runnable, so upper figures; "sampling" was stopped at 20 min)
SUITE_MINUTES = {"figures": "about 1 min", "step": "about 1 min", "sampling": "over 20 min",
                 "unet": "about 16 min", "kernels": "about 1 min"}


class BenchError(Exception):
    """A problem the user can fix (no checkout, a missing script); reported as one line."""


def _is_repo(path: Path) -> bool:
    return (path / "benchmarks" / "report.py").is_file() and (path / "fastddpm").is_dir()


def find_repo(start: Optional[Path] = None) -> Path:
    """The fastddpm checkout holding ``benchmarks/``: next to this package, else `start` (default: the
    current directory) or a parent of it, else ``$FASTDDPM_REPO``. Raises BenchError otherwise."""
    candidates: List[Path] = [Path(__file__).resolve().parents[2]]
    here = (start or Path.cwd()).resolve()
    candidates += [here, *here.parents]
    if os.environ.get("FASTDDPM_REPO"):
        candidates.append(Path(os.environ["FASTDDPM_REPO"]).expanduser().resolve())
    for c in candidates:
        if _is_repo(c):
            return c
    raise BenchError("the benchmarks live in the fastddpm repository, not in the installed package: run "
                     "`fastddpm bench` from a checkout (git clone ... && pip install -e .) or set FASTDDPM_REPO "
                     "to one (no benchmarks/report.py found next to the package or above " + str(here) + ")")


def _check_suite(suite: str) -> None:
    if suite not in SUITE_CHOICES:
        raise ValueError(f"suite must be one of {', '.join(SUITE_CHOICES)}; got {suite!r}")


def suite_commands(suite: str, repo: Path, json_out: bool = False) -> List[Tuple[Script, List[str]]]:
    """(script, argv) for every script of `suite` ("all" or one of SUITES). Raises ValueError for an
    unknown suite and BenchError when a script of an explicitly named suite is missing."""
    _check_suite(suite)
    names = list(SUITES) if suite == "all" else [suite]
    out = []
    for name in names:
        for script in SUITES[name]:
            path = repo / script.path
            if not path.is_file():
                if suite == "all":
                    print(f"fastddpm bench: note: {script.path} is not in this checkout; skipped", file=sys.stderr)
                    continue
                raise BenchError(f"{script.path} is not in this checkout ({repo})")
            argv = [sys.executable, str(path), *script.args]
            if script.json_flag and (json_out or script.capture):
                argv.append("--json")
            out.append((script, argv))
    return out


def _write_captured(repo: Path, name: str, data: Any, command: str, out_dir: Optional[Path] = None) -> Path:
    """results/<name>.json from a script's JSON stdout, with the machine (benchmarks.common)."""
    import importlib.util

    # load this checkout's common.py by path (a `benchmarks` package imported from elsewhere must not be reused)
    spec = importlib.util.spec_from_file_location("_fastddpm_bench_common", repo / "benchmarks" / "common.py")
    if spec is None or spec.loader is None:
        raise BenchError(f"benchmarks/common.py is missing from {repo}")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    payload = data if isinstance(data, dict) else {"rows": data}
    old = os.environ.get(common.RESULTS_ENV)
    if out_dir is not None:
        os.environ[common.RESULTS_ENV] = str(out_dir)
    try:
        return Path(common.write_result(name, {"command": command, **payload}))
    finally:
        if out_dir is not None:
            if old is None:
                os.environ.pop(common.RESULTS_ENV, None)
            else:
                os.environ[common.RESULTS_ENV] = old


def run_suite(suite: str = "all", json_out: bool = False, report: bool = True, repo: Optional[Path] = None,
              out_dir: Optional[Path] = None, threads: Optional[int] = None) -> int:
    """Run `suite`'s scripts (each in its own process, from the repo root), then the report.

    `out_dir` None writes the tracked ``benchmarks/results/`` and (`report`) regenerates
    docs/performance.md; a folder receives the results JSON, ``performance.md`` (the report rendered
    from them) and ``timings.json`` instead, and the checkout is left as it was.
    `threads` (``--threads``): OMP_NUM_THREADS / MKL_NUM_THREADS of every script (None: as set already).
    Returns 0 when every script succeeded, else 1 (the remaining scripts still run)."""
    import time

    _check_suite(suite)
    repo = repo or find_repo()
    if out_dir is not None:
        out_dir = Path(out_dir).resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
    failed, timings = [], {}
    for script, argv in suite_commands(suite, repo, json_out):
        command = "python " + " ".join([script.path, *argv[2:]])
        print(f"fastddpm bench: {command}", file=sys.stderr, flush=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = str(repo) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if out_dir is not None:
            env["FASTDDPM_BENCH_RESULTS"] = str(out_dir)
        if threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        t0 = time.perf_counter()
        if script.capture is None:
            rc = subprocess.call(argv, cwd=repo, env=env)
        else:
            proc = subprocess.run(argv, cwd=repo, env=env, stdout=subprocess.PIPE, text=True)
            rc = proc.returncode
            sys.stdout.write(proc.stdout)
            try:
                data = json.loads(proc.stdout)
            except ValueError:
                print(f"fastddpm bench: {script.path} printed no JSON; nothing written", file=sys.stderr)
                rc = rc or 1
            else:
                path = _write_captured(repo, script.capture, data, command, out_dir)
                print(f"fastddpm bench: written {path}", file=sys.stderr)
        timings[script.path] = round(time.perf_counter() - t0, 1)
        if rc != 0:
            failed.append(script.path)
            print(f"fastddpm bench: {script.path} exited with status {rc}", file=sys.stderr)
    if out_dir is not None:
        (out_dir / "timings.json").write_text(json.dumps({"seconds": timings}, indent=2) + "\n")
    if report and (repo / REPORT).is_file():
        report_argv = [sys.executable, str(repo / REPORT)]
        if out_dir is not None:
            report_argv += ["--results", str(out_dir), "--print"]
            proc = subprocess.run(report_argv, cwd=repo, stdout=subprocess.PIPE, text=True)
            rc = proc.returncode
            if rc == 0:
                (out_dir / "performance.md").write_text(proc.stdout)
                print(f"fastddpm bench: results and report in {out_dir} (the checkout is unchanged; "
                      "--update-results writes benchmarks/results/ and docs/performance.md)", file=sys.stderr)
        else:
            rc = subprocess.call(report_argv, cwd=repo)
        if rc != 0:
            failed.append(REPORT)
    if failed:
        print(f"fastddpm bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``--suite``, ``--out-dir``, ``--update-results``, ``--json`` and ``--no-report``."""
    took = "; ".join(f"{name}: {SUITE_MINUTES[name]}" for name in SUITES)
    parser.add_argument("--suite", default="all", choices=SUITE_CHOICES,
                        help=f"which benchmarks to run (default: all). Wall time on a shared 2-core CPU: {took}")
    parser.add_argument("--out-dir", default=None, metavar="DIR",
                        help=f"write the results JSON, performance.md and timings.json here (default: "
                             f"{DEFAULT_OUT_DIR}/ in the current directory)")
    parser.add_argument("--update-results", action="store_true",
                        help="write the tracked benchmarks/results/*.json and regenerate "
                             "docs/performance.md instead (for maintainers)")
    parser.add_argument("--json", action="store_true", help="the scripts print JSON instead of tables")
    parser.add_argument("--no-report", action="store_true", help="no report (performance.md)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads of every benchmark script (OMP_NUM_THREADS; default: as set in the "
                             "environment, else each script's own choice)")


def run(args: argparse.Namespace) -> int:
    """Run the ``bench`` sub-command; returns the exit status."""
    update, out_arg = getattr(args, "update_results", False), getattr(args, "out_dir", None)
    if update and out_arg:
        print("fastddpm bench: error: --out-dir and --update-results exclude each other", file=sys.stderr)
        return 2
    out_dir = None if update else Path(out_arg or DEFAULT_OUT_DIR)
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        print(f"fastddpm bench: error: --threads must be a positive int, got {threads}", file=sys.stderr)
        return 2
    try:
        return run_suite(args.suite, json_out=bool(args.json), report=not getattr(args, "no_report", False),
                         out_dir=out_dir, threads=threads)
    except BenchError as e:
        print(f"fastddpm bench: error: {e}", file=sys.stderr)
        return 1

"""A pytest plugin for benchmarks/gpu_check.py's `tests` part: per-test timeouts and a live result log.

    python -m pytest -p benchmarks.pytest_deadline --per-test-timeout 60 --result-log FILE ...

* ``--per-test-timeout S``: each test's setup, call and teardown get S seconds each (SIGALRM, main thread,
  Linux); a test over it fails with "per-test timeout" in its message, so a timeout counts as a failure.
  A test stuck inside C code (a compile, a device sync) is stopped only when control returns to Python;
  the caller's hard deadline (a kill of the whole process group) covers that case.
* ``--result-log FILE``: one JSON line per finished test phase (nodeid, when, outcome, seconds, and the
  first line of the failure), written and flushed as it happens, so a run killed mid-way still names every
  test that failed before the kill.

The plugin needs nothing beyond pytest (pytest-timeout is not assumed to be installed).
"""
from __future__ import annotations

import json
import signal
from typing import Any, Optional

import pytest

TIMEOUT_MESSAGE = "per-test timeout"


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("deadline", "per-test timeouts and a live result log (benchmarks/gpu_check.py)")
    group.addoption("--per-test-timeout", type=float, default=0.0,
                    help="seconds for each test phase (setup, call, teardown); 0 = none")
    group.addoption("--result-log", default=None, help="append one JSON line per finished test phase to this file")


class _Deadline:
    def __init__(self, seconds: float, log_path: Optional[str]):
        self.seconds = seconds
        self.log = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115 - closed at unconfigure

    def _alarm(self, signum: int, frame: Any) -> None:
        pytest.fail(f"{TIMEOUT_MESSAGE}: over {self.seconds:g} s", pytrace=False)

    def _guarded(self):
        if self.seconds <= 0 or not hasattr(signal, "setitimer"):
            return (yield)
        old = signal.signal(signal.SIGALRM, self._alarm)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        try:
            return (yield)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_setup(self, item: Any):
        yield from self._guarded()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item: Any):
        yield from self._guarded()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown(self, item: Any):
        yield from self._guarded()

    def pytest_runtest_logreport(self, report: Any) -> None:
        if self.log is None:
            return
        # a passed setup/teardown is noise; keep the call of every test and any phase that did not pass
        if report.when != "call" and report.outcome == "passed":
            return
        message = ""
        if report.outcome == "failed":
            message = (report.longreprtext or "").strip().splitlines()[-1:] or [""]
            message = message[0][:300]
        elif report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2])[:300]
        self.log.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                                   "seconds": round(report.duration, 3), "message": message}) + "\n")
        self.log.flush()

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def pytest_configure(config: Any) -> None:
    seconds, log = config.getoption("--per-test-timeout"), config.getoption("--result-log")
    if seconds or log:
        config.pluginmanager.register(_Deadline(seconds, log), "gpu_check_deadline")


def pytest_unconfigure(config: Any) -> None:
    plugin = config.pluginmanager.get_plugin("gpu_check_deadline")
    if plugin is not None:
        plugin.close()

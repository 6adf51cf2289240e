"""Every GPU-only check of fastddpm in one call: the GPU tests, then the GPU benchmarks.

    python3 benchmarks/gpu_check.py --out DIR                # everything, ends within its 450 s budget
    python3 benchmarks/gpu_check.py --out DIR --parts tests,attention --budget 120
    python3 benchmarks/gpu_check.py --dry-run --out DIR      # the same code paths on the CPU

Runs from a checkout with the image's python3 (no `pip install -e .` needed). Each part runs in a process
of its own with a hard deadline: at its deadline the process group gets SIGINT, then SIGKILL 5 s later.
The budget counts from this script's start (start-up and every part's imports included); a part's share
is its PART_BUDGETS weight, and time an earlier part left unused carries over. After every part the
results file DIR/gpu_<device>.json is rewritten atomically (temporary file + rename) and the part's
figures are printed. SIGINT or SIGTERM stops the run cleanly: the running part is stopped (keeping the
rows it finished), later parts are recorded as not run, the file is written, and the exit status is
130 / 143, wherever the signal finds the driver (a part running, its entry being written, a summary being
printed). A part's rows are saved as they finish, so a part stopped at its deadline keeps them too. The exit
status is 1 when a part failed, timed out, or was never started because the budget ran out before it; a
part skipped because something it needs is missing (diffusers) is not a failure.

Parts, in order (docs/gpu_check.md says what each records and how to read it):

  tests       GPU tests (`-m "gpu and not compile_heavy"`), kernel tests first, per-test timeouts,
              failures recorded as they happen; a timeout, a crash or "no tests ran" is a failure
  device      measured ceilings: device-to-device copy bandwidth, bf16 matmul rate
  group_norm  GroupNorm+SiLU: GB/s, % of the measured copy bandwidth and of the datasheet
  attention   fastddpm attention vs SDPA in the U-Net's layout and contiguous, bf16 and fp32
  step        the fused sampler step vs the unfused reference
  grads       gradient correctness on the device: each op vs float64, the U-Net Triton vs reference
  unet        the DDPM CIFAR-10 U-Net vs diffusers' UNet2DModel, eager and torch.compile
  layout      fd.UNet with NCHW vs channels-last activations: the CUDA default's verdict
  sampling    FastSampler vs diffusers' pipelines (eager), same weights and sampler: images/s

`headline` in the results holds the figures the README quotes (GroupNorm+SiLU % of measured copy
bandwidth, attention / SDPA time in the U-Net layout, FastSampler / diffusers' pipeline), each with its
target. --dry-run: CPU, TRITON_INTERPRET=1 in every part's process, tiny shapes, every timing null;
tests/test_gpu_check.py runs it, interrupts it, and runs a part past its deadline.
"""
from __future__ import annotations

import time

T0 = time.monotonic()  # the budget counts from here: interpreter start-up and imports are in it

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # script mode from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu_summary import headline, summary_lines  # noqa: E402

# Seconds per part, 450 in all: with the 5 s kill grace the default run ends within 8 minutes, start-up
# and a cold Triton / Inductor cache included. Unused time of a part carries over to the next.
PART_BUDGETS: Dict[str, float] = {"tests": 90, "device": 12, "group_norm": 40, "attention": 55, "step": 15,
                                  "grads": 28, "unet": 80, "layout": 25, "sampling": 105}
PARTS = tuple(PART_BUDGETS)
KILL_GRACE_S = 5.0    # after a part's deadline: SIGINT, then SIGKILL this much later
CHILD_MARGIN_S = 2.0  # a part stops starting new rows this long before its deadline
MIN_PART_S = 3.0      # a part with less time than this left is not started
PER_TEST_TIMEOUT_S = 40.0
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False); --dry-run exercises the script on a CPU"
BUDGET_SPENT = "skipped: the time budget ran out before this part"  # a failure in the exit status
STALL_ENV = "FASTDDPM_GPU_CHECK_STALL"  # tests only: "<part>" makes that part hang after its first save (dry run)


def device_peaks(name: str) -> Dict[str, Any]:
    from benchmarks.gpu_parts import device_peaks as peaks

    return peaks(name)


def layout_verdict(fwd_ratio: Optional[float], fwd_bwd_ratio: Optional[float]) -> str:
    from benchmarks.gpu_parts import layout_verdict as verdict

    return verdict(fwd_ratio, fwd_bwd_ratio)


def parse_parts(text: str) -> List[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"--parts takes a comma-separated subset of {','.join(PARTS)}, got {text!r}")
    return [p for p in PARTS if p in parts]


# ------------------------------------------------------------------------------ files
def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as JSON to a temporary file beside `path`, fsync it, rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------ the tests part
def test_targets() -> List[str]:
    """Kernel tests first, then tests/gpu, then every other test file (pytest runs them in this order)."""
    first = ["tests/kernels", "tests/gpu"]
    rest = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").iterdir()
                  if (p.is_dir() and p.relative_to(ROOT).as_posix() not in first and any(p.glob("test_*.py")))
                  or (p.is_file() and p.name.startswith("test_") and p.suffix == ".py"))
    return first + rest


def _read_log(path: Path) -> List[Dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]
    except (OSError, ValueError):
        return []


def tests_result(records: List[Dict[str, Any]], returncode: Optional[int], timed_out: bool, tail: str,
                 command: str) -> Dict[str, Any]:
    """The tests part's result from the live log: counts, failures (with their message), per-test
    timeouts. ok only when pytest exited 0, nothing failed, and the run was not cut: a per-test timeout,
    a kill at the deadline, a crash and pytest's exit 5 (no test ran) are failures."""
    counts: Dict[str, int] = {}
    failed: List[str] = []
    timeouts: List[str] = []
    for r in records:
        if r["when"] == "call" or r["outcome"] != "passed":
            key = {"failed": "failed" if r["when"] == "call" else "errors"}.get(r["outcome"], r["outcome"])
            counts[key] = counts.get(key, 0) + 1
        if r["outcome"] == "failed":
            failed.append(f"{r['nodeid']} ({r['when']}): {r.get('message', '')}"[:400])
            if "per-test timeout" in r.get("message", ""):
                timeouts.append(r["nodeid"])
    problems = list(failed)
    if timed_out:
        problems.append("pytest was stopped at the part's deadline")
    elif returncode == 5:
        problems.append("pytest ran no test (exit 5)")
    elif returncode not in (0, None) and not failed:
        problems.append(f"pytest exited with {returncode}")
    return {"command": command, "returncode": returncode, "counts": counts, "failed": failed[:100],
            "timeouts": timeouts, "timed_out": timed_out, "problems": problems,
            "ok": returncode == 0 and not problems, "tail": tail[-3000:]}


def run_pytest(args: Sequence[str], deadline: float, save: Callable[[Dict[str, Any]], None],
               per_test_timeout: float = PER_TEST_TIMEOUT_S, cwd: Path = ROOT,
               env_extra: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """pytest `args` in a subprocess with per-test timeouts and a live result log; the result is saved
    every second while it runs, and the run is stopped (SIGINT, then SIGKILL) at `deadline` (time.time())."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_tests_") as tmp:
        log, out = Path(tmp) / "results.jsonl", Path(tmp) / "stdout.txt"
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "--tb=line", "-p", "no:cacheprovider",
               "-p", "benchmarks.pytest_deadline", "--per-test-timeout", f"{per_test_timeout:g}",
               "--result-log", str(log), *args]
        command = "python3 -m pytest " + " ".join(cmd[3:]).replace(str(log), "<log>")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest decides
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
        env.update(env_extra or {})
        returncode, timed_out = None, False
        with open(out, "w") as fh:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
            try:
                while returncode is None:
                    try:
                        returncode = proc.wait(timeout=min(1.0, max(0.05, deadline - time.time())))
                    except subprocess.TimeoutExpired:
                        save(tests_result(_read_log(log), None, False, "", command))
                        if time.time() >= deadline:
                            timed_out = True
                            _stop(proc, grace=3.0)
                            returncode = proc.returncode
            finally:
                if proc.poll() is None:  # interrupted: stop pytest, then record what it finished
                    _stop(proc, grace=3.0)
                    save(tests_result(_read_log(log), proc.returncode, True, "", command))
        return tests_result(_read_log(log), returncode, timed_out, out.read_text(errors="replace"), command)


def part_tests(ctx: Any) -> Dict[str, Any]:
    """The GPU tests. The dry run runs tests/gpu with the same options and no visible GPU, so everything there
    skips (on a CUDA machine too)."""
    args = ["tests/gpu"] if ctx.dry else test_targets()
    return run_pytest([*args, "-m", "gpu and not compile_heavy"], ctx.deadline, ctx.save,
                      env_extra={"CUDA_VISIBLE_DEVICES": ""} if ctx.dry else None)


# ------------------------------------------------------------------------------ a part's process
def versions(device: Any) -> Dict[str, Any]:
    import torch

    info: Dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    for pkg in ("triton", "diffusers"):  # read off the installed metadata: importing diffusers takes seconds
        try:
            info[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            info[pkg] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                    sm_count=props.multi_processor_count, memory_bytes=props.total_memory)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.split("\n")[0].strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info.update(device_name="cpu (dry run)", driver=None)
    return info


def _fused_backend(part: str, dry: bool) -> Any:
    """Force the Triton kernels for fastddpm's ops (what "auto" picks for CUDA tensors), so a missing triton
    fails loudly instead of timing the reference. In the dry run the op-level parts run them in the
    interpreter; the whole-model parts (unet, layout, sampling) use the reference there, which is what an
    interpreted U-Net would compute, minutes faster."""
    from fastddpm.ops import triton_available, use_backend

    if dry and (part in ("unet", "layout", "sampling") or not triton_available()):
        return use_backend("reference")
    return use_backend("triton")  # raises when triton is missing: never time the reference as the kernels


class _Stop(BaseException):
    """SIGINT / SIGTERM in a part's process."""


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


def child_main(name: str, part_file: Path, deadline: float, dry: bool, copy_bps: Optional[float]) -> int:
    """Run one part in this process; its state goes to `part_file` (atomically) after every row."""
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    state: Dict[str, Any] = {"status": "running", "result": None}
    try:
        import torch

        if not dry and not torch.cuda.is_available():
            raise RuntimeError(NO_CUDA)
        from benchmarks import gpu_parts

        device = torch.device("cuda", torch.cuda.current_device()) if not dry else torch.device("cpu")
        state["versions"] = versions(device)
        from benchmarks.common import machine

        state["machine"] = machine()
        write_json_atomic(part_file, state)

        def save(result: Dict[str, Any]) -> None:
            state["result"] = result
            write_json_atomic(part_file, state)
            if os.environ.get(STALL_ENV) == name and dry:
                time.sleep(3600)

        ctx = gpu_parts.Context(device, dry, deadline - CHILD_MARGIN_S, save, copy_bps)
        func = part_tests if name == "tests" else gpu_parts.PART_FUNCS[name]
        with _fused_backend(name, dry) if name != "tests" else contextlib.nullcontext():
            state["result"] = func(ctx)
        state["status"] = "ok" if not ctx.skipped else "partial: its time ran out"
        if name == "tests" and not state["result"].get("ok", False):
            state["status"] = "failed: " + "; ".join(state["result"]["problems"][:3])[:300]
        if ctx.skipped:
            state["skipped"] = list(ctx.skipped)
    except _Stop as e:
        state["status"] = f"stopped by {e}"
    except Exception as e:  # noqa: BLE001 - recorded; the driver goes on with the next part
        from benchmarks.gpu_parts import Unavailable

        if isinstance(e, Unavailable):
            state["status"] = f"skipped: {e}"
        else:
            state["status"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
            state["traceback"] = traceback.format_exc()[-3000:]
            print(state["traceback"], file=sys.stderr, flush=True)
    write_json_atomic(part_file, state)
    return 0


# ------------------------------------------------------------------------------ the driver
class Interrupted(BaseException):
    """SIGINT / SIGTERM in the driver."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    def reason(self) -> str:
        return f"interrupted by {self}"


class NoDevice(Interrupted):
    """The first part found no CUDA device: the run stops there (exit status 2)."""

    def __init__(self):
        BaseException.__init__(self, "no CUDA device")
        self.signum = -126  # 128 + signum = 2

    def reason(self) -> str:
        return NO_CUDA


class _Signals:
    """SIGINT / SIGTERM in the driver, made safe to receive anywhere: the handler records the signal (and
    ignores any later one, so nothing cuts the final write short) and raises Interrupted only while the
    driver waits on a part's process (`interruptible`). Everywhere else (recording a part, writing the
    file, printing a summary) the run loop sees `signum` at its next check and stops cleanly there."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._raising = False
        self._depth = 0
        self._old: Dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        self.signum = signum
        if self._raising:
            self._raising = False
            raise Interrupted(signum)

    def __enter__(self) -> "_Signals":
        if self._depth == 0:  # the outermost use installs the handler; nested uses share its record
            self.signum, self._raising = None, False
            self._old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        self._depth += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._raising = False
            for s, h in self._old.items():
                signal.signal(s, h)

    def pending(self) -> Optional[Interrupted]:
        return None if self.signum is None else Interrupted(self.signum)

    @contextlib.contextmanager
    def interruptible(self) -> Any:
        """A signal received inside (or already received) raises Interrupted here."""
        if self.signum is not None:
            raise Interrupted(self.signum)
        self._raising = True
        try:
            yield
        finally:
            self._raising = False


SIGNALS = _Signals()


def _stop(proc: subprocess.Popen, grace: float = KILL_GRACE_S, group: bool = False) -> None:
    """SIGINT to the process (or its group), SIGKILL `grace` seconds later if it is still there."""
    def send(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            pass
    if proc.poll() is not None:
        return
    send(signal.SIGINT)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()


def run_part(name: str, deadline_mono: float, dry: bool, out_dir: Path, copy_bps: Optional[float]) -> Dict[str, Any]:
    """One part in a process group of its own, killed at its deadline; its entry for the results file."""
    part_file = out_dir / f".part_{name}.json"
    part_file.unlink(missing_ok=True)
    deadline = time.time() + (deadline_mono - time.monotonic())
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-part", name, "--part-file", str(part_file),
           "--deadline", repr(deadline)] + (["--dry-run"] if dry else [])
    if copy_bps:
        cmd += ["--copy-bps", repr(copy_bps)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler that reads SDPA's backend: no start/stop chatter
    if dry:
        env["TRITON_INTERPRET"] = "1"
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    why = None
    try:
        with SIGNALS.interruptible():
            proc.wait(timeout=max(0.1, deadline_mono - time.monotonic()))
    except subprocess.TimeoutExpired:
        why = f"timed out: stopped at its deadline after {time.monotonic() - t0:.0f} s"
        _stop(proc, group=True)
    except Interrupted as e:
        why = f"interrupted by {e}"
        _stop(proc, group=True)
        raise _PartInterrupted(_entry(part_file, why, proc, t0, deadline_mono), e) from None
    return _entry(part_file, why, proc, t0, deadline_mono)


class _PartInterrupted(BaseException):
    def __init__(self, entry: Dict[str, Any], cause: Interrupted):
        super().__init__(str(cause))
        self.entry, self.cause = entry, cause


def _entry(part_file: Path, why: Optional[str], proc: subprocess.Popen, t0: float, deadline_mono: float) -> Dict[str, Any]:
    state = read_json(part_file) or {"status": "running", "result": None}
    status = state.get("status", "running")
    if why:  # stopped from outside: keep what it finished, say why
        status = why + ("" if state.get("result") else " (nothing finished)")
    elif status == "running":
        status = f"failed: its process ended with exit code {proc.returncode} before finishing"
    entry = {"status": status, "budget_s": round(deadline_mono - t0, 1), "seconds": round(time.monotonic() - t0, 2),
             "result": state.get("result")}
    for key in ("skipped", "traceback", "versions", "machine"):
        if key in state:
            entry[key] = state[key]
    part_file.unlink(missing_ok=True)
    return entry


def _results_path(out_dir: Path, dry: bool, versions_: Optional[Dict[str, Any]]) -> Path:
    if dry:
        slug = "dryrun"
    else:
        name = (versions_ or {}).get("device_name") or "unknown device"
        slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return out_dir / f"gpu_{slug}.json"


def run(parts: Sequence[str], budget_s: float, dry: bool, out_dir: Path, t0: Optional[float] = None,
        echo: Callable[[str], None] = print) -> Tuple[Path, Dict[str, Any]]:
    """Run `parts` within `budget_s` seconds of `t0` (default: this module's start); write the results
    file after every part; on SIGINT / SIGTERM (received at any point) stop cleanly, write the file, and
    raise _Done."""
    start = T0 if t0 is None else t0
    end = start + budget_s
    scale = budget_s / sum(PART_BUDGETS[p] for p in parts)
    report: Dict[str, Any] = {"benchmark": "gpu_check", "dry_run": dry, "budget_s": budget_s,
                              "command": "python3 benchmarks/gpu_check.py" + (f" --parts {','.join(parts)}"
                                                                              if list(parts) != list(PARTS) else ""),
                              "versions": None, "peaks": None, "parts": {}, "headline": {}, "complete": False}
    path = _results_path(out_dir, dry, None)
    stop: Optional[Interrupted] = None
    with SIGNALS:
        for i, name in enumerate(parts):
            stop = stop or SIGNALS.pending()  # a signal received while recording or printing the last part
            deadline = min(end, start + sum(PART_BUDGETS[p] for p in parts[: i + 1]) * scale)
            entry, stop = _next_entry(name, deadline, stop, report, dry, out_dir, echo)
            path = _record(report, name, entry, out_dir, dry, path, start)
            echo(f"[{name}] {entry['status']}" + (f" in {entry['seconds']:.1f} s" if "seconds" in entry else ""))
            for line in summary_lines(name, entry.get("result"), report.get("peaks") or {}):
                echo("    " + line)
        stop = stop or SIGNALS.pending()
        report["complete"] = stop is None
        report["total_s"] = round(time.monotonic() - start, 2)
        write_json_atomic(path, report)
    if stop is not None:
        raise _Done(path, report, stop)
    return path, report


def _next_entry(name: str, deadline: float, stop: Optional[Interrupted], report: Dict[str, Any], dry: bool,
                out_dir: Path, echo: Callable[[str], None]) -> Tuple[Dict[str, Any], Optional[Interrupted]]:
    """Run part `name` (or say why it is not run): its entry, and the reason the run stops (None: go on)."""
    try:
        if stop is not None:
            entry = {"status": f"not run: {stop.reason()}"}
        elif deadline - time.monotonic() < MIN_PART_S:
            entry = {"status": BUDGET_SPENT}
        else:
            echo(f"[{name}] up to {deadline - time.monotonic():.0f} s")
            copy_bps = ((report["parts"].get("device") or {}).get("result") or {}).get("copy_Bps")
            entry = run_part(name, deadline, dry, out_dir, copy_bps)
    except _PartInterrupted as e:
        entry, stop = e.entry, e.cause
    if NO_CUDA in entry["status"] and stop is None:  # every later part would fail the same way
        stop = NoDevice()
    return entry, stop


def _record(report: Dict[str, Any], name: str, entry: Dict[str, Any], out_dir: Path, dry: bool, path: Path,
            start: float) -> Path:
    """Put a part's entry into the report (the first versions and machine seen become the run's) and
    write the results file atomically; returns its path (named after the device once it is known)."""
    report["parts"][name] = entry
    if report["versions"] is None and entry.get("versions"):
        from benchmarks.gpu_parts import device_peaks as peaks

        report["versions"], report["machine"] = entry["versions"], entry.get("machine")
        report["peaks"] = peaks(report["versions"].get("device_name", ""))
        new_path = _results_path(out_dir, dry, report["versions"])
        if new_path != path:
            path.unlink(missing_ok=True)
            path = new_path
    entry.pop("versions", None)
    entry.pop("machine", None)
    report["headline"] = headline(report)
    report["total_s"] = round(time.monotonic() - start, 2)
    write_json_atomic(path, report)
    return path


class _Done(BaseException):
    def __init__(self, path: Path, report: Dict[str, Any], stop: Interrupted):
        super().__init__(str(stop))
        self.path, self.report, self.stop = path, report, stop


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", type=parse_parts, default=list(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--budget", type=float, default=float(sum(PART_BUDGETS.values())),
                   help="seconds for the whole run from this script's start (split in proportion to the parts' weights)")
    p.add_argument("--dry-run", action="store_true", help="CPU, interpreter, tiny shapes, no timings")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default benchmarks/results; a temporary folder for --dry-run)")
    p.add_argument("--run-part", default=None, help=argparse.SUPPRESS)
    p.add_argument("--part-file", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--copy-bps", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_part:
        return child_main(args.run_part, args.part_file, args.deadline, args.dry_run, args.copy_bps)
    if args.budget <= 0:
        p.error(f"--budget must be positive seconds, got {args.budget}")
    if not args.dry_run and os.environ.get("TRITON_INTERPRET") == "1":
        p.error("TRITON_INTERPRET=1 is set: the kernels would run in Triton's interpreter, not on the GPU; "
                "unset it (or use --dry-run on a CPU machine)")
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu_check_")) if args.dry_run else ROOT / "benchmarks" / "results")
    with SIGNALS:  # a signal during the printout below is recorded too: no traceback, the exit status says it
        try:
            path, report = run(args.parts, args.budget, args.dry_run, out)
            stop = None
        except _Done as done:
            path, report, stop = done.path, done.report, done.stop
        print(f"wrote {path} ({report.get('total_s', 0):.0f} s{'' if report['complete'] else ', interrupted'})",
              flush=True)
        for name, entry in report["parts"].items():
            print(f"  {name:<11} {entry['status'][:70]:<70} {entry.get('seconds', 0):>7.1f} s", flush=True)
        stop = stop or SIGNALS.pending()
    return 128 + stop.signum if stop is not None else exit_status(report)


def exit_status(report: Dict[str, Any]) -> int:
    """1 when a part failed, timed out, or was not started because the budget ran out; 0 otherwise (a part
    skipped because something it needs is missing, e.g. diffusers, is not a failure)."""
    bad = ("failed", "timed out", BUDGET_SPENT)
    return 1 if any(e["status"].startswith(bad) for e in report["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())

"""CI: every kernel compiles with the oldest triton setup.py allows, not only with the newest.

    python .ci/aot_oldest_triton.py --install --triton-dir .ci/triton-oldest --expect 3.6.0

`--install` puts triton==<expect> into --triton-dir first (pip install --no-deps --target) unless a finished
install of that version is there: pip fills a temporary folder beside it, which is renamed into place only
once complete (with a marker file naming the version), so an install cut short is never reused.

A representative set of the kernels' AOT specs (kernels/<module>.aot_specs(), the programs the launchers
run): the first spec of every (kernel, head dim) pair, so every kernel and every attention head dim is
compiled at least once, for sm_90 where the spec is for it, else for its first arch. The compile runs in a
subprocess with the given folder first on PYTHONPATH and TRITON_INTERPRET unset; the subprocess checks
that it imported the expected triton from that folder. Each program must compile with its shared memory
within the arch's limit. Local memory (LOCAL spills or a stack frame, which tests/kernels/test_aot.py
forbids with the newest triton) is printed as a warning, and is a failure with --strict: an older triton
may keep a small runtime-indexed array in local memory that a newer one puts in registers. Exit status 1
on any failure, with one line per program.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
MARKER = ".fastddpm-install-complete"  # written last into a finished install; holds the triton version
PIP = (sys.executable, "-m", "pip", "install", "-q", "--no-deps")


def install_once(target: Path, version: str, pip: Sequence[str] = PIP) -> bool:
    """triton==`version` into `target` unless a finished install of it is there; returns whether it installed.
    pip fills a temporary folder beside `target`; the marker goes in last and the folder is then renamed to
    `target` (a stale or half-finished `target` is moved aside and removed first), so a kill, a network error
    or a full disk mid-install leaves no folder that looks finished."""
    target = Path(target)
    marker = target / MARKER
    if marker.is_file() and marker.read_text().strip() == version and (target / "triton").is_dir():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would otherwise become the install's
        subprocess.run([*pip, "--target", str(tmp), f"triton=={version}"], check=True)
        if not (tmp / "triton").is_dir():
            raise RuntimeError(f"pip left no triton package in {tmp}")
        (tmp / MARKER).write_text(version + "\n")
        if target.exists() or target.is_symlink():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def head_dim(config: str) -> Optional[int]:
    """The head dim a spec's config names ("D=64,BLOCK_M=..." -> 64), None for kernels without one."""
    m = re.search(r"(?:^|[,\s])D=(\d+)", config)
    return int(m.group(1)) if m else None


def representative(specs: Sequence[Tuple[str, int, dict]], archs: Sequence[int], prefer: int = 90
                   ) -> List[Tuple[str, int, int]]:
    """(module, spec index, arch) of the first spec of every (module, kernel, head dim), compiled for
    `prefer` where the spec is for it (its `archs`, default every arch), else for its first arch."""
    chosen: Dict[Tuple[str, str, Optional[int]], Tuple[str, int, int]] = {}
    for module, index, spec in specs:
        key = (module, spec["kernel"], head_dim(spec["config"]))
        if key in chosen:
            continue
        allowed = [a for a in spec.get("archs", archs) if a in archs]
        if allowed:
            chosen[key] = (module, index, prefer if prefer in allowed else allowed[0])
    return list(chosen.values())


def _compile(job: Tuple[str, int, int]) -> Dict[str, object]:
    from fastddpm.kernels import aot

    module, index, arch = job
    spec = importlib.import_module(module).aot_specs()[index]
    row: Dict[str, object] = {"module": module, "kernel": spec["kernel"], "config": spec["config"], "arch": arch}
    try:
        row.update(aot.compile_spec(spec, arch))
    except Exception as exc:  # noqa: BLE001 - reported per program
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"[:300]
    return row


def problems(row: Dict[str, object], shared_limit: Dict[int, int]) -> Tuple[List[str], List[str]]:
    """(failures, warnings) of one compiled program: a compile error or shared memory over the arch's
    limit fails; local memory (spills or a stack frame) warns."""
    if "error" in row:
        return [f"does not compile: {row['error']}"], []
    fail, warn = [], []
    if row.get("spills") or row.get("stack"):
        warn.append(f"local memory (LOCAL {row.get('spills')} B, stack {row.get('stack')} B)")
    if int(row.get("shared_bytes", 0)) > shared_limit[int(row["arch"])]:
        fail.append(f"shared memory {row['shared_bytes']} B over sm_{row['arch']}'s {shared_limit[int(row['arch'])]} B")
    return fail, warn


def child(expect: str, triton_dir: str, jobs: int, strict: bool) -> int:
    import triton

    from fastddpm.kernels import aot

    where = os.path.realpath(os.path.dirname(triton.__file__))
    if triton.__version__ != expect or not where.startswith(os.path.realpath(triton_dir)):
        print(f"expected triton {expect} from {triton_dir}, imported {triton.__version__} from {where}")
        return 1
    specs = [(m, i, s) for m in aot.KERNEL_MODULES for i, s in enumerate(importlib.import_module(m).aot_specs())]
    todo = representative(specs, list(aot.ARCHS))
    print(f"triton {triton.__version__}: compiling {len(todo)} of {len(specs)} programs "
          f"(every kernel and head dim once)", flush=True)
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        rows = list(pool.map(_compile, todo))
    failed = warned = 0
    for row in rows:
        fail, warn = problems(row, aot.SHARED_LIMIT_BYTES)
        if strict:
            fail, warn = fail + warn, []
        failed, warned = failed + bool(fail), warned + bool(warn)
        label = "FAIL" if fail else "warn" if warn else "ok  "
        figures = "" if "error" in row else (f"regs {row['registers']}, shared {row['shared_bytes']} B, "
                                             f"tensor cores {row['tensor_cores']}")
        print(f"  {label} sm_{row['arch']} {row['kernel']:<36} {row['config'][:44]:<44} "
              + "; ".join(fail + warn + ([figures] if figures else [])), flush=True)
    print(f"triton {triton.__version__}: {len(rows) - failed} of {len(rows)} programs compile within limits"
          + (f"; {warned} use local memory" if warned else ""))
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--triton-dir", required=True, help="a folder holding the triton to test (pip install --target)")
    p.add_argument("--expect", required=True, help="the triton version that folder must hold, e.g. 3.6.0")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--strict", action="store_true", help="local memory (spills, a stack frame) fails too")
    p.add_argument("--install", action="store_true",
                   help="first install triton==EXPECT into --triton-dir unless a finished install is there")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.expect, args.triton_dir, args.jobs, args.strict)
    if args.install:
        install_once(Path(args.triton_dir), args.expect)
    if not Path(args.triton_dir, "triton").is_dir():
        p.error(f"--triton-dir must hold a triton package (pip install --target DIR triton==...), got {args.triton_dir}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(args.triton_dir).resolve()), str(ROOT)])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--triton-dir", str(Path(args.triton_dir).resolve()),
           "--expect", args.expect, "--jobs", str(args.jobs)] + (["--strict"] if args.strict else [])
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())

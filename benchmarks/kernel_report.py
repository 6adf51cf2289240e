"""Kernel resource report: every kernel and autotune config compiled ahead of time for each arch.

    python benchmarks/kernel_report.py            # table + notes
    python benchmarks/kernel_report.py --json     # one JSON list of rows on stdout (notes on stderr)
    python benchmarks/kernel_report.py --arch 100 120 --modules fastddpm.kernels.attention --match D=256,

Archs: kernels/arch.py (ARCHS sm_80, sm_86, sm_89, sm_90 by default; EXTRA_ARCHS sm_100, sm_120), each
compiled with its own configs against its own shared-memory limit.

A row: kernel, config, arch, registers, spills (local-memory bytes per thread), shared_bytes,
hbm_bytes_fused, hbm_bytes_unfused (modelled HBM traffic of the fused kernel and of the unfused
PyTorch sequence it replaces, for the shape each kernel module states), plus module and
shared_limit_bytes. No GPU is needed: kernels are compiled with triton.compile for GPUTarget("cuda",
arch, 32) and measured with triton's bundled cuobjdump (see kernels/aot.py). Kernel modules that do not
exist yet or have no aot_specs() are skipped with a note; a spec that fails to compile gets an
"error:" note and no row. Exit status 1 when a spec fails to compile, or a row spills or exceeds the
shared-memory limit of its arch.
"""
from __future__ import annotations

import os
import sys

# Compilation needs real @triton.jit functions: drop the interpreter switch before triton is imported.
if os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules:
    del os.environ["TRITON_INTERPRET"]

import argparse  # noqa: E402
import json  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.common import text_table  # noqa: E402
from fastddpm.kernels.aot import ARCHS, EXTRA_ARCHS, KERNEL_MODULES, ROW_KEYS, collect  # noqa: E402


def _table(rows) -> str:
    cols = list(ROW_KEYS) + ["ratio"]
    body = []
    for r in rows:
        ratio = r["hbm_bytes_unfused"] / r["hbm_bytes_fused"] if r["hbm_bytes_fused"] else float("nan")
        body.append([str(r[c]) for c in ROW_KEYS] + [f"{ratio:.2f}x"])
    return text_table(cols, body)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON list of rows on stdout")
    p.add_argument("--modules", nargs="*", default=list(KERNEL_MODULES), help="kernel modules to report")
    p.add_argument("--arch", type=int, nargs="*", default=list(ARCHS),
                   help=f"compute capabilities (default {' '.join(map(str, ARCHS))}; also {' '.join(map(str, EXTRA_ARCHS))})")
    p.add_argument("--match", default=None, help="only the specs whose 'kernel config' contains this text")
    p.add_argument("--no-cache", action="store_true", help="recompile and re-measure everything")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many worker processes")
    args = p.parse_args(argv)
    rows, notes = collect(args.modules, args.arch, use_cache=not args.no_cache, jobs=max(1, args.jobs),
                          match=args.match)
    # a stack frame counts as a spill (ptxas may put spill stores there with LOCAL 0)
    bad = [r for r in rows if r["spills"] > 0 or r["stack"] > 0 or r["shared_bytes"] > r["shared_limit_bytes"]]
    if args.json:
        print(json.dumps(rows, indent=1))
        for n in notes:
            print(f"note: {n}", file=sys.stderr)
    else:
        print(_table(rows))
        for n in notes:
            print(f"note: {n}")
    for r in bad:
        print(f"FAIL: {r['kernel']} {r['config']} {r['arch']}: spills={r['spills']} stack={r['stack']} "
              f"shared={r['shared_bytes']} (limit {r['shared_limit_bytes']})", file=sys.stderr)
    errors = [n for n in notes if n.startswith("error:")]
    return 1 if bad or errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""Ahead-of-time compilation of the kernels for every configured arch and their resource use, without a GPU.

The archs and their shared-memory limits live in `kernels/arch.py` (ARCHS: sm_80, sm_86, sm_89, sm_90 by
default; EXTRA_ARCHS sm_100 and sm_120 on request).

Each kernel module in `kernels/` exposes `aot_specs() -> list[dict]`, one dict per kernel and autotune
config, with keys:
    kernel (str), config (str), fn (@triton.jit function), signature (dict name -> type string),
    constexprs (dict name -> value), num_warps (int), num_stages (int),
    hbm_bytes_fused (int), hbm_bytes_unfused (int)       (modelled, for a shape the module states)
and optionally `options` (extra compile options, e.g. {"enable_fp_fusion": False}) and `attrs`
(Triton's argument attributes, {(arg_index,): [["tt.divisibility", 16]]}) and `archs` (the
compute capabilities the spec is for, when its configs are chosen per arch; default: every arch). `runtime_spec(fn, args,
kwargs)` builds signature, constexprs and attrs exactly as Triton's launcher does for concrete
arguments (meta tensors stand in for device tensors: their data_ptr carries the storage offset), so a
spec made from the launcher's own argument list compiles the program a GPU would run: pointers
16-byte aligned and ints divisible by 16 get `tt.divisibility` 16, ints equal to 1 become constants.

`compile_spec(spec, arch)` compiles it with `triton.compile(ASTSource(...), target=GPUTarget("cuda",
arch, 32))` and reads registers, local memory and the stack frame (both count as spills: ptxas may
put spill stores in the stack frame with LOCAL 0) and shared memory from the cubin with the
`cuobjdump --dump-resource-usage` bundled in triton's package (backends/nvidia/bin), and the
tensor-core instruction family of the PTX (`tensor_cores`: "wgmma" for Hopper's warpgroup MMA,
"mma" for the sm_80-style `mma.sync`, "none" for an FMA loop). `collect()` does
this for every module and arch and returns report rows. Results are cached on disk (keyed by the
kernel source hash, signature, constexprs, options, arch and triton version), so a second run only
runs what changed.

This must run in a process where TRITON_INTERPRET is not "1" (interpreted functions cannot be
compiled); nothing is ever launched, so no GPU or driver is needed.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .arch import ARCHS, EXTRA_ARCHS, SHARED_LIMIT_BYTES

__all__ = [
    "KERNEL_MODULES", "ARCHS", "EXTRA_ARCHS", "SHARED_LIMIT_BYTES", "MAX_REGISTERS", "REQUIRED_SPEC_KEYS", "ROW_KEYS",
    "find_cuobjdump", "parse_resource_usage", "tensor_core_family", "runtime_spec", "compile_spec", "collect",
]

KERNEL_MODULES: Tuple[str, ...] = ("fastddpm.kernels.group_norm", "fastddpm.kernels.attention",
                                   "fastddpm.kernels.sampler_step")
MAX_REGISTERS = 255
REQUIRED_SPEC_KEYS = ("kernel", "config", "fn", "signature", "constexprs", "num_warps", "num_stages",
                      "hbm_bytes_fused", "hbm_bytes_unfused")
ROW_KEYS = ("kernel", "config", "arch", "tensor_cores", "registers", "spills", "shared_bytes", "hbm_bytes_fused",
            "hbm_bytes_unfused")
_CACHE_VERSION = 2


def _check_not_interpreting() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (it is '1' in this process)")


def find_cuobjdump() -> str:
    """Path of the cuobjdump that ships with triton (<triton>/backends/nvidia/bin/cuobjdump)."""
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        raise RuntimeError("triton is not installed")
    path = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise RuntimeError(f"cuobjdump not found at {path}")
    return path


def parse_resource_usage(text: str) -> Dict[str, Dict[str, int]]:
    """Parse `cuobjdump --dump-resource-usage` output: {function: {REG, STACK, SHARED, LOCAL, ...}}."""
    out: Dict[str, Dict[str, int]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*Function\s+(\S+?):\s*(.*)$", line)
        if not m:
            continue
        name, rest = m.group(1), m.group(2)
        if not rest.strip() and i + 1 < len(lines):
            rest = lines[i + 1]
        fields = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", rest)}
        out[name] = fields
    return out


def tensor_core_family(ptx: str) -> str:
    """"wgmma" when the PTX issues warpgroup MMAs (sm_90), "tcgen05" for the fifth-generation MMAs of
    sm_100 (accumulators in tensor memory), else "mma" for `mma.sync` (sm_80 style), else "none" (no
    tensor-core instruction: an FMA loop or no matrix product at all)."""
    if re.search(r"\btcgen05\.mma", ptx):
        return "tcgen05"
    if re.search(r"\bwgmma\.mma_async", ptx):
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "none"


def runtime_spec(fn, args: Sequence, kwargs: Dict) -> Dict[str, object]:
    """signature, constexprs and attrs of `fn[grid](*args, **kwargs)` as Triton's launcher derives them.

    Runs the launcher's own binder (`create_function_from_signature` + `_pack_args`, triton 3.9) on the
    arguments: tensors (meta tensors are fine) give "*bf16"-style types and `tt.divisibility` 16 when
    their data_ptr is 16-byte aligned; ints divisible by 16 get `tt.divisibility` 16 and ints equal to 1
    become constexprs; constexpr arguments keep their values. Compile options in `kwargs` (num_warps,
    num_stages, enable_fp_fusion) are left to the caller. Returns {"signature", "constexprs", "attrs"}
    with constexprs and attrs keyed by argument-index tuples, as ASTSource takes them.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if not isinstance(fn, JITFunction):  # an InterpretedFunction (TRITON_INTERPRET=1): same rules, same source
        fn = JITFunction(fn.fn)
    backend = make_backend(GPUTarget("cuda", 90, 32))  # the NVIDIA specialisation rules do not depend on arch
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, options, bound, specialization, options)
    return {"signature": signature, "constexprs": constexprs, "attrs": attrs}


def _validate_spec(spec: dict, where: str) -> None:
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: aot spec must be a dict, got {type(spec).__name__}")
    missing = [k for k in REQUIRED_SPEC_KEYS if k not in spec]
    if missing:
        raise ValueError(f"{where}: aot spec is missing keys {missing} (required: {list(REQUIRED_SPEC_KEYS)})")


def _jsonable(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return repr(v)


def _cache_key(spec: dict, arch: int) -> str:
    import triton
    from triton.compiler import ASTSource

    src = _source(spec)
    payload = json.dumps({
        "v": _CACHE_VERSION, "triton": triton.__version__, "src": src.hash(), "arch": arch,
        "num_warps": spec["num_warps"], "num_stages": spec["num_stages"],
        "options": {k: _jsonable(v) for k, v in sorted(spec.get("options", {}).items())},
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _source(spec: dict):
    from triton.compiler import ASTSource

    return ASTSource(fn=spec["fn"], signature=dict(spec["signature"]), constexprs=dict(spec["constexprs"]),
                     attrs=dict(spec.get("attrs") or {}))


def _cache_dir() -> str:
    d = os.environ.get("FASTDDPM_AOT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastddpm", "aot")
    return d


def compile_spec(spec: dict, arch: int, use_cache: bool = True) -> Dict[str, int]:
    """Compile one spec for sm_<arch>; returns {registers, spills, stack, shared_bytes, tensor_cores}.

    spills = LOCAL bytes per thread from cuobjdump; shared_bytes = Triton's dynamic shared memory
    (metadata.shared) plus any static SHARED in the cubin.
    """
    if arch not in SHARED_LIMIT_BYTES:
        raise ValueError(f"arch must be one of {sorted(SHARED_LIMIT_BYTES)}, got {arch!r}")
    _validate_spec(spec, spec.get("kernel", "?") if isinstance(spec, dict) else "?")
    _check_not_interpreting()
    key = _cache_key(spec, arch)
    cache_file = os.path.join(_cache_dir(), key + ".json")
    if use_cache and os.path.exists(cache_file):
        try:
            with open(cache_file) as f:
                return json.load(f)
        except (OSError, ValueError):
            pass

    import triton
    from triton.backends.compiler import GPUTarget

    src = _source(spec)
    options = {"num_warps": int(spec["num_warps"]), "num_stages": int(spec["num_stages"])}
    options.update(spec.get("options", {}))
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        proc = subprocess.run([find_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump failed on {spec['kernel']}: {proc.stderr.strip()}")
    usage = parse_resource_usage(proc.stdout)
    name = compiled.metadata.name
    if name not in usage:
        raise RuntimeError(f"cuobjdump output has no function {name!r}: {proc.stdout!r}")
    fields = usage[name]
    result = {
        "registers": fields.get("REG", 0),
        "spills": fields.get("LOCAL", 0),
        "stack": fields.get("STACK", 0),
        "shared_bytes": int(compiled.metadata.shared or 0) + fields.get("SHARED", 0),
        "tensor_cores": tensor_core_family(compiled.asm["ptx"]),
    }
    if use_cache:
        try:
            os.makedirs(_cache_dir(), exist_ok=True)
            tmp_file = cache_file + f".{os.getpid()}.tmp"
            with open(tmp_file, "w") as f:
                json.dump(result, f)
            os.replace(tmp_file, cache_file)
        except OSError:
            pass
    return result


def _load_specs(module_name: str) -> Tuple[Optional[List[dict]], Optional[str]]:
    """(specs, note): specs None with a note when the module is absent or has no aot_specs."""
    try:
        found = importlib.util.find_spec(module_name)
    except ModuleNotFoundError:
        found = None
    if found is None:
        return None, f"{module_name}: module does not exist yet, skipped"
    module = importlib.import_module(module_name)  # an import error is a real failure: let it raise
    if not hasattr(module, "aot_specs"):
        return None, f"{module_name}: no aot_specs(), skipped"
    specs = list(module.aot_specs())
    for i, spec in enumerate(specs):
        _validate_spec(spec, f"{module_name}.aot_specs()[{i}]")
    if not specs:
        return [], f"{module_name}: aot_specs() returned no specs"
    return specs, None


def _describe(exc: BaseException) -> str:
    """One line per exception in the cause chain: type, first line and last meaningful line."""
    parts = []
    seen = 0
    while exc is not None and seen < 4:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and set(ln.strip()) != {"^"}]
        text = " | ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else ""
        parts.append(f"{type(exc).__name__}: {text}")
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return " <- ".join(parts)[:600]


def _safe_compile(spec: dict, arch: int, use_cache: bool) -> Dict[str, object]:
    try:
        return compile_spec(spec, arch, use_cache)
    except Exception as exc:  # a kernel that does not compile is reported, not fatal to the report
        return {"error": _describe(exc)}


@functools.lru_cache(maxsize=None)
def _worker_specs(module_name: str) -> List[dict]:
    """A worker process's specs of one module, built once per process (building the attention specs
    runs the launcher's argument builders for every variant and arch: seconds, not per job)."""
    return _load_specs(module_name)[0] or []


def _worker(job: Tuple[str, int, int, bool]) -> Dict[str, object]:
    module_name, index, arch, use_cache = job
    return _safe_compile(_worker_specs(module_name)[index], arch, use_cache)


def collect(
    modules: Sequence[str] = KERNEL_MODULES, archs: Iterable[int] = ARCHS, use_cache: bool = True, jobs: int = 1,
    match: Optional[str] = None,
) -> Tuple[List[dict], List[str]]:
    """Compile every spec of every module for every arch; returns (rows, notes).

    `match`: compile only the specs whose "kernel config" text contains this string (e.g. "D=256,").

    A row: kernel, config, arch ("sm_80"), tensor_cores ("wgmma" / "mma" / "none"), registers, spills, shared_bytes, hbm_bytes_fused,
    hbm_bytes_unfused, plus module and shared_limit_bytes. Notes name the modules that were skipped
    ("<module>: ... skipped") and every spec that failed to compile ("error: ..."; it has no row).
    `jobs` > 1 compiles in worker processes.
    """
    _check_not_interpreting()
    archs = list(archs)
    for a in archs:
        if a not in SHARED_LIMIT_BYTES:
            raise ValueError(f"archs must be among {sorted(SHARED_LIMIT_BYTES)}, got {a!r}")
    notes: List[str] = []
    todo: List[Tuple[str, int, dict, int]] = []
    for module_name in modules:
        specs, note = _load_specs(module_name)
        if note:
            notes.append(note)
        for i, spec in enumerate(specs or []):
            if match is not None and match not in f"{spec['kernel']} {spec['config']}":
                continue
            for arch in archs:
                if arch in spec.get("archs", archs):
                    todo.append((module_name, i, spec, arch))
    if jobs > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(_worker, [(m, i, a, use_cache) for m, i, _, a in todo]))
    else:
        results = [_safe_compile(spec, arch, use_cache) for _, _, spec, arch in todo]
    rows = []
    for (module_name, _, spec, arch), res in zip(todo, results):
        if "error" in res:
            notes.append(f"error: {module_name} {spec['kernel']} {spec['config']} sm_{arch}: {res['error']}")
            continue
        rows.append({
            "kernel": spec["kernel"],
            "config": spec["config"],
            "arch": f"sm_{arch}",
            "tensor_cores": res["tensor_cores"],
            "registers": res["registers"],
            "spills": res["spills"],
            "stack": res["stack"],
            "shared_bytes": res["shared_bytes"],
            "hbm_bytes_fused": int(spec["hbm_bytes_fused"]),
            "hbm_bytes_unfused": int(spec["hbm_bytes_unfused"]),
            "module": module_name,
            "shared_limit_bytes": SHARED_LIMIT_BYTES[arch],
        })
    return rows, notes

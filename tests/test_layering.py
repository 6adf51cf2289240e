"""The package's layering (design.md, "Dependencies point one way"), checked on the source text.

* no import cycle among fastddpm's modules, counting imports inside functions (a lazy import that
  closes a circle is still a circle);
* `kernels/` (imported as `fastddpm.kernels`) knows only torch, triton and the standard library, and
  reaches its own modules by relative imports; only `fastddpm.ops` imports it, and holds no kernel code;
* op boundaries (custom autograd functions) live in `fastddpm.ops`, not in the modules that use them.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: str) -> Dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _targets(name: str, path: Path) -> Set[str]:
    """Every module name that module `name` (at `path`) imports anywhere in its source (module level or
    inside functions), relative imports resolved; `from a import b` counts as both a and a.b."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.update([target] + [f"{target}.{a.name}" for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def _imports(name: str, path: Path, known: Dict[str, Path]) -> Set[str]:
    """Modules of `known` that `name` imports anywhere in its source (module level or inside functions)."""
    # a module importing its own parent package (e.g. `from .. import __version__`) is not an edge
    return {c for c in _targets(name, path) if c in known and c != name and not name.startswith(c + ".")}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_fastddpm():
    mods = _modules("fastddpm")
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    assert "fastddpm.unet" in graph and "fastddpm.interop.diffusers" in graph
    assert _cycles(graph) == []


def _absolute_imports(path: Path) -> List[str]:
    """Every module named by an absolute import in `path` (module level or inside functions)."""
    out: List[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.append(node.module or "")
    return out


def test_kernels_import_only_torch_and_triton():
    allowed = {"torch", "triton"} | set(sys.stdlib_module_names)
    paths = sorted((ROOT / "kernels").rglob("*.py"))
    assert paths
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level > 1:
                raise AssertionError(f"kernels/{path.name} imports from outside kernels/ (level {node.level})")
        for n in _absolute_imports(path):
            # `kernels.x` (a top-level name PyPI's `kernels` owns) and `fastddpm.x` are both refused:
            # kernels/ reaches its own modules relatively, whatever name it is installed under
            assert n.split(".")[0] in allowed, f"kernels/{path.name} imports {n}"


def test_only_ops_import_kernels():
    """`fastddpm.ops` wraps the kernels; everything else in fastddpm uses the ops."""
    for name, path in _modules("fastddpm").items():
        if name == "fastddpm.kernels":  # the source tree's stub that loads kernels/ as this package
            continue
        for n in _targets(name, path):
            if n == "fastddpm.kernels" or n.startswith("fastddpm.kernels."):
                assert name.startswith("fastddpm.ops"), f"{name} imports {n}; only fastddpm.ops wraps the kernels"


def test_nothing_imports_the_top_level_name_kernels():
    """The kernels are `fastddpm.kernels` everywhere (PyPI's `kernels` package owns the top-level name)."""
    for folder in ("fastddpm", "benchmarks", "scripts", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for n in _absolute_imports(path):
                assert n.split(".")[0] != "kernels", f"{path.relative_to(ROOT)} imports {n}: use fastddpm.kernels"


def _classes_deriving(path: Path, base: str) -> List[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [c.name for c in ast.walk(tree) if isinstance(c, ast.ClassDef)
            and any(ast.unparse(b).endswith(base) for b in c.bases)]


def test_op_boundaries_live_in_ops():
    for name, path in _modules("fastddpm").items():
        if name.startswith("fastddpm.ops"):
            assert "triton.jit" not in path.read_text(encoding="utf-8"), f"kernel code in {name}"
            continue
        assert _classes_deriving(path, "autograd.Function") == [], f"custom autograd function in {name}"


def _private_imports(path: Path, package: str) -> List[str]:
    """`from M import _x` in `path` (a module of `package`) where M lies outside `package` and `_x` is a
    private (single-underscore) name; dunders such as `__version__` are public."""
    out: List[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        if module == package or module.startswith(package + "."):
            continue  # the package's own private helpers (e.g. `._common`)
        out += [f"{module}.{a.name}" for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    return out


def test_private_import_finder():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.py"
        p.write_text("from ..data import _x, y\nfrom ._common import _z\nfrom .. import __version__\n"
                     "def f():\n    from fastddpm.samplers import _w\n")
        assert _private_imports(p, "fastddpm.cli") == ["fastddpm.data._x", "fastddpm.samplers._w"]


def test_cli_imports_no_private_library_names():
    """The CLI is a client of the library's public API: `fastddpm/cli/*.py` imports no `_`-prefixed name
    from a library module (the CLI's own private modules, like `._common`, are its business)."""
    paths = sorted((ROOT / "fastddpm" / "cli").glob("*.py"))
    assert paths
    for path in paths:
        assert _private_imports(path, "fastddpm.cli") == [], f"fastddpm/cli/{path.name} imports private names"

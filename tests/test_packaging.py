"""The kernels are installed and imported as `fastddpm.kernels`, never under the top-level name `kernels`.

PyPI's `kernels` package owns that name. Each test puts a decoy top-level `kernels` package first on
sys.path (its import raises), then imports fastddpm and launches every fused op on its Triton path: a
single `import kernels` anywhere on that path would fail. Run from a clone (the path entry that `pip
install -e .` writes, or a script's own sys.path insert) and from a built wheel installed into a folder.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: every fused op forward and backward on the Triton path (the interpreter
# on CPU), then checks where each kernel module was read from.
_LAUNCH_ALL = r"""
import sys, torch
import fastddpm.ops as ops
from fastddpm.ops import use_backend
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
q = torch.randn(1, 1, 5, 16, generator=g, requires_grad=True)
with use_backend("triton"):
    y = ops.group_norm_silu(x, torch.ones(4), torch.zeros(4), groups=2)
    o = ops.attention(q, q, q)
    (y.sum() + o.sum()).backward()
    coefs = torch.rand(2, 11)
    xp, x0 = ops.sampler_step(x.detach(), x.detach(), coefs, torch.tensor([1]), seed=torch.tensor([3]))
assert torch.isfinite(xp).all() and x.grad is not None and q.grad is not None
assert "kernels" not in sys.modules, "the top-level name kernels was imported"
import fastddpm.kernels.group_norm, fastddpm.kernels.attention, fastddpm.kernels.sampler_step, fastddpm.kernels.aot
for name in ("group_norm", "attention", "sampler_step", "aot"):
    print(sys.modules["fastddpm.kernels." + name].__file__)
"""


# Runs in a fresh interpreter where triton cannot be imported (as on macOS / Windows): every op runs its
# reference, the argument checks it shares with the kernels included.
_WITHOUT_TRITON = r"""
import sys, torch
sys.modules["triton"] = None  # `import triton` raises ImportError; find_spec("triton") is None
import fastddpm as fd
import fastddpm.ops as ops
assert not ops.triton_available()
x = torch.randn(2, 4, 3, 3)
y = ops.group_norm_silu(x, torch.ones(4), torch.zeros(4), groups=2)
o = ops.attention(*(torch.randn(1, 1, 5, 8) for _ in range(3)))
xp, x0 = ops.sampler_step(x, x, torch.rand(2, 11), torch.tensor([1]), seed=torch.tensor([3]))
assert torch.isfinite(y).all() and torch.isfinite(o).all() and torch.isfinite(xp).all()
try:
    ops.sampler_step(x, x, torch.rand(2, 11), torch.tensor([1]), image_offset=-1)
except ValueError as e:
    print(e)
assert sys.modules["triton"] is None and "fastddpm.kernels.checks" in sys.modules
"""


def _decoy(tmp_path: Path) -> Path:
    """A folder holding a top-level package `kernels` whose import raises."""
    decoy = tmp_path / "decoy"
    (decoy / "kernels").mkdir(parents=True)
    (decoy / "kernels" / "__init__.py").write_text(
        "raise ImportError('the decoy top-level kernels package was imported')\n")
    return decoy


def _run(code: str, path: list[Path], cwd: Path) -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in path), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()


def test_setup_keeps_the_plain_path_entry_and_names_no_top_level_kernels(monkeypatch):
    """`pip install -e .` stays a plain path entry only while package_dir is {"": "."} (setup.py's
    docstring); the kernels are the package fastddpm.kernels, read from the folder kernels/."""
    pytest.importorskip("setuptools")
    from distutils.core import run_setup  # setuptools' distutils, once setuptools is imported

    monkeypatch.chdir(ROOT)
    dist = run_setup(str(ROOT / "setup.py"), stop_after="init")
    assert dist.package_dir == {"": "."}
    assert "fastddpm.kernels" in dist.packages and "fastddpm" in dist.packages
    assert not [p for p in dist.packages if p.split(".")[0] != "fastddpm"]
    build_py = dist.get_command_obj("build_py")
    build_py.ensure_finalized()
    assert Path(build_py.get_package_dir("fastddpm.kernels")) == Path("kernels")
    assert Path(build_py.get_package_dir("fastddpm.ops")) == Path("fastddpm/ops")


def test_clone_imports_the_kernels_as_fastddpm_kernels(tmp_path):
    """The clone on sys.path (editable install, or a script run from the clone): a decoy `kernels`
    first on sys.path is never imported, and the kernel modules are read from the clone's kernels/."""
    pytest.importorskip("triton")
    files = _run(_LAUNCH_ALL, [_decoy(tmp_path), ROOT], cwd=tmp_path)
    assert [Path(f).parent for f in files] == [ROOT / "kernels"] * 4


def test_ops_run_their_reference_where_triton_is_missing(tmp_path):
    """`import fastddpm` and every op work without triton; the checks shared with the kernels need only torch."""
    out = _run(_WITHOUT_TRITON, [ROOT], cwd=tmp_path)
    assert " ".join(out) == "image_offset must be a non-negative int, got -1"


@pytest.mark.slow
def test_wheel_holds_no_top_level_kernels_and_imports_from_itself(tmp_path):
    """`pip install .`: the wheel holds fastddpm/kernels/ (the folder's own files, not the clone's stub)
    and nothing else at the top level; installed into a folder, it runs every op with the decoy first."""
    pytest.importorskip("setuptools")
    pytest.importorskip("triton")
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("fastddpm", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True, capture_output=True, timeout=600)
    (wheel,) = out.glob("fastddpm-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        init = zf.read("fastddpm/kernels/__init__.py")
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"fastddpm"}
    assert init == (ROOT / "kernels" / "__init__.py").read_bytes()  # the package itself, not the stub
    kernel_files = {p.name for p in (ROOT / "kernels").glob("*.py")}
    assert {n.split("/")[-1] for n in names if n.startswith("fastddpm/kernels/")} == kernel_files

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    files = _run(_LAUNCH_ALL, [_decoy(tmp_path), target], cwd=tmp_path)
    assert [Path(f).parent for f in files] == [target / "fastddpm" / "kernels"] * 4

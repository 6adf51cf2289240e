"""fastddpm: fast, tested DDPM / Improved-DDPM in PyTorch with fused Triton kernels.

Supported versions: each lower bound below is the release the test suite (`.ci/run`, which installs
the newest release of every unpinned package, as `pip install -e ".[test]"` does for a newcomer) was
last run green with, except torch and triton, whose bounds are the oldest releases the code and kernels
support: torch 2.11 and triton 3.6 are what GPU images ship (torch 2.11 pins triton 3.6), and a bound above
them would make pip replace the image's multi-GB CUDA torch. Triton 3.6 is checked in CI: every kernel and
head dim compiles with it for sm_90 (`.ci/aot_oldest_triton.py`, beside the test suite's newest triton).
Torch 2.11 is not run in CI (its CPU wheel is not on the package index CI uses); the bound rests on the
APIs the code calls, all present in 2.11 (`torch.library.custom_op` / `register_autograd` / `register_fake`,
`torch.get_autocast_dtype`, `torch.compiler.is_compiling`, CUDA graphs). There are no upper bounds: CI
tests the newest.

``package_dir={"": "."}`` makes `pip install -e .` a plain path entry (the clone's folder on sys.path)
instead of setuptools' import hook: with the hook, Python started in the folder above a clone named
``fastddpm`` imports the clone itself as an empty namespace package (``module 'fastddpm' has no
attribute 'NoiseSchedule'``); a path entry holds the real package, which wins over a namespace folder.

The Triton kernels live in the clone's top-level ``kernels/`` folder but are installed and imported as
``fastddpm.kernels``: PyPI's ``kernels`` package owns the top-level name, and a second owner would
overwrite its files. Two mechanisms, one per way of running:

* a wheel (``pip install .``): ``build_py`` below maps the package ``fastddpm.kernels`` to the folder
  ``kernels/``, so the wheel holds ``fastddpm/kernels/*.py`` and no top-level ``kernels``. The mapping
  is given to ``build_py`` only, not as ``package_dir`` of the distribution: any entry besides ``""``
  there makes ``pip install -e .`` fall back to the import hook described above.
* a clone (``pip install -e .``, or a script run from the clone with the clone on sys.path): Python
  finds ``fastddpm/kernels/__init__.py``, a stub (never in a wheel) that loads ``kernels/__init__.py``
  as the package ``fastddpm.kernels`` with ``kernels/`` as its path, so every kernel module is read
  from the one copy under the name the wheel gives it. The clone's path entry also makes the folder
  findable as a top-level ``kernels``, but after every site-packages entry: an installed PyPI
  ``kernels`` wins, and fastddpm never imports that name (``tests/test_layering.py``).

``tests/test_packaging.py`` checks both: the wheel's file list, and the imports with a decoy top-level
``kernels`` first on sys.path.
"""
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPyKernelsInFastddpm(build_py):
    """build_py that reads the package fastddpm.kernels from the top-level kernels/ folder."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.package_dir = {**(self.package_dir or {}), "fastddpm.kernels": "kernels"}


setup(
    name="fastddpm",
    version="0.1.0",
    description="Denoising diffusion probabilistic models with fused Triton kernels and CUDA-graph sampling",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # fastddpm.kernels named explicitly: an sdist holds kernels/ but not the stub folder fastddpm/kernels/
    packages=find_packages(include=["fastddpm", "fastddpm.*"], exclude=["fastddpm.kernels"]) + ["fastddpm.kernels"],
    package_dir={"": "."},
    cmdclass={"build_py": BuildPyKernelsInFastddpm},
    package_data={"fastddpm": ["assets/*"]},
    install_requires=[
        "torch>=2.11",
        "numpy>=2.4",
        "tqdm>=4.70",
        "pillow>=13.0",
        "safetensors>=0.8",
        # No triton here: CUDA builds of torch already depend on the triton they were built with (the
        # kernels' GPU path), and a CPU-only install runs the reference path, so it need not download
        # triton. The tests run the kernels through Triton's interpreter on the CPU: the "test" extra.
    ],
    extras_require={
        "test": ["pytest>=9.2", "pytest-benchmark>=5.2", "scipy>=1.17", "diffusers>=0.42", "hypothesis>=6.155",
                 # Triton ships wheels for Linux x86_64 only; elsewhere its tests skip
                 "triton>=3.6; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        "diffusers": ["diffusers>=0.42"],
    },
    entry_points={"console_scripts": ["fastddpm=fastddpm.cli:main"]},
)

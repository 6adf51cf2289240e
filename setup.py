"""fastddpm: fast, tested DDPM / Improved-DDPM in PyTorch with fused Triton kernels.

Supported versions: each lower bound below is the release the test suite (`.ci/run`, which installs
the newest release of every unpinned package, as `pip install -e ".[test]"` does for a newcomer) was
last run green with; older releases are not tested. There are no upper bounds: CI tests the newest.

``package_dir={"": "."}`` makes `pip install -e .` a plain path entry (the clone's folder on sys.path)
instead of setuptools' import hook: with the hook, Python started in the folder above a clone named
``fastddpm`` imports the clone itself as an empty namespace package (``module 'fastddpm' has no
attribute 'NoiseSchedule'``); a path entry holds the real package, which wins over a namespace folder.
"""
from setuptools import find_packages, setup

setup(
    name="fastddpm",
    version="0.1.0",
    description="Denoising diffusion probabilistic models with fused Triton kernels and CUDA-graph sampling",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["fastddpm", "fastddpm.*", "kernels", "kernels.*"]),
    package_dir={"": "."},
    package_data={"fastddpm": ["assets/*"]},
    install_requires=[
        "torch>=2.13",
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
                 "triton>=3.9; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        "diffusers": ["diffusers>=0.42"],
    },
    entry_points={"console_scripts": ["fastddpm=fastddpm.cli:main"]},
)

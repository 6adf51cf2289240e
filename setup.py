"""fastddpm: fast, tested DDPM / Improved-DDPM in PyTorch with fused Triton kernels."""
from setuptools import find_packages, setup

setup(
    name="fastddpm",
    version="0.1.0",
    description="Denoising diffusion probabilistic models with fused Triton kernels and CUDA-graph sampling",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["fastddpm", "fastddpm.*", "kernels", "kernels.*"]),
    package_data={"fastddpm": ["assets/*"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "tqdm",
        "pillow",
        "safetensors",
        # Triton ships wheels for Linux x86_64 only; elsewhere the reference path is the only path.
        "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "scipy", "diffusers", "hypothesis"],
        "diffusers": ["diffusers"],
    },
    entry_points={"console_scripts": ["fastddpm=fastddpm.cli:main"]},
)

"""Conversion between fastddpm and other libraries (diffusers), both directions (`unet_from_diffusers`,
`export_diffusers`). diffusers is optional: it is imported
only by the functions that need it."""
from __future__ import annotations

from typing import Any

__all__ = ["unet_from_diffusers", "export_diffusers"]


def __getattr__(name: str) -> Any:
    if name == "unet_from_diffusers":
        from .diffusers import unet_from_diffusers

        return unet_from_diffusers
    if name == "export_diffusers":
        from .export import export_diffusers

        return export_diffusers
    raise AttributeError(f"module 'fastddpm.interop' has no attribute {name!r}")

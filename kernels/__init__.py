"""Triton kernels and their launchers. No autograd, no nn.Module: `fastddpm.ops` wraps these.

Imported as `fastddpm.kernels` (PyPI's `kernels` package owns the top-level name; setup.py says how a
wheel and a clone both give this folder that name); its modules import each other relatively.
The kernel modules import triton, and `fastddpm` imports them only when the Triton backend is used;
`checks` (the argument checks the ops share) and `device_guard` need only torch.
"""

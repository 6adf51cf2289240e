"""Triton kernels and their launchers. No autograd, no nn.Module: `fastddpm.ops` wraps these.

Importing a submodule imports triton; `fastddpm` only does so when the Triton backend is used.
"""

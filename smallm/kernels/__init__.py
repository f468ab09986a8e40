"""Triton kernels for the paged KV cache, with a pure-torch reference next to each.

Importing this package does not import Triton: each kernel module does, so the CPU runtime
never needs it. See docs/kernels.md for layouts and how each kernel was verified.
"""

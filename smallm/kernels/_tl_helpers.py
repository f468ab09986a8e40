"""Triton device functions shared by the attention kernels (imports Triton)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot`` with a float32 accumulator. ``UPCAST`` multiplies in float32: Triton 3.9's
    interpreter multiplies bfloat16 operands as their raw uint16 bits, so the interpreter path
    upcasts them (the GPU path never does)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def tanh(x):
    # Not every Triton backend has a tanh; this form is exact enough in float32 and never
    # overflows.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0

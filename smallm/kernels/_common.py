"""Small helpers shared by the kernel modules (no Triton import here)."""

from __future__ import annotations

import importlib.util
import os

import torch


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (and >= 1): Triton block shapes must be powers of two."""
    return 1 << max(n - 1, 0).bit_length()


def interpreter_enabled() -> bool:
    """Whether Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_unavailable_reason(device: torch.device | str = "cpu") -> str | None:
    """Why Triton kernels cannot run on ``device`` here, or None when they can."""
    if not triton_installed():
        return "Triton is not installed (pip install 'triton>=3.0')"
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return None
    if interpreter_enabled():
        return None
    return (
        "Triton kernels need a CUDA GPU; on a machine without one they only run in Triton's "
        "interpreter: set TRITON_INTERPRET=1 before starting (slow; for testing), or use "
        "--attention-backend torch_native"
    )


def dot_precision(dtype: torch.dtype) -> str | None:
    """``tl.dot`` input precision: exact IEEE for float32 (TF32 would cost ~1e-3 relative
    error, far from the CPU path); Triton's default for 16-bit types (None)."""
    return "ieee" if dtype == torch.float32 else None


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` operands of ``dtype`` must be upcast to float32 (see
    ``_tl_helpers.dot``: only the interpreter, only for bfloat16)."""
    return dtype == torch.bfloat16 and interpreter_enabled()

"""Building blocks shared by the decoder-only models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """``nn.Linear`` whose multiply the runner chooses after loading: a ``kernel`` from
    linear_kernels.py (prepacked bfloat16, packed int4/int8), or plain torch, or numpy's OpenBLAS.

    On AVX2-only CPUs torch's MKL path for small batches is single-threaded and reaches about
    half the memory bandwidth, while OpenBLAS's threaded GEMV/GEMM saturates it (decode at
    batch 1 is reading-weights-bound). Arrays are shared, not copied, in both directions.
    """

    use_openblas: bool = False
    kernel = None  # a LinearKernel, set by linear_setup.setup_linears

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x)
        if not self.use_openblas:
            return super().forward(x)
        out = matmul_weight_t(x, self.weight, openblas=True)
        if self.bias is not None:
            out += self.bias
        return out


def matmul_weight_t(x: torch.Tensor, weight: torch.Tensor, openblas: bool) -> torch.Tensor:
    """``x @ weight.T`` for x [..., in] and weight [out, in], optionally through OpenBLAS."""
    if not openblas:
        return x @ weight.T
    flat = x.reshape(-1, x.shape[-1]).contiguous().numpy()
    return torch.from_numpy(flat @ weight.numpy().T).view(*x.shape[:-1], -1)


def set_matmul_backend(model: nn.Module, backend: str) -> None:
    """Choose how every ``Linear`` in ``model`` multiplies: ``torch`` or ``openblas``
    (float32 on CPU only)."""
    if backend not in ("torch", "openblas"):
        raise ValueError(f"matmul backend must be torch or openblas, got {backend!r}")
    for module in model.modules():
        if isinstance(module, Linear):
            if backend == "openblas" and module.weight.dtype != torch.float32:
                raise ValueError("the openblas matmul backend needs float32 weights")
            module.use_openblas = backend == "openblas"


def set_kernel_backend(model: nn.Module, backend: str) -> None:
    """Run norms and rotary through ``torch`` ops (the default) or smallm's ``triton`` kernels
    (chosen by the runner together with the Triton attention backend)."""
    if backend not in ("torch", "triton"):
        raise ValueError(f"kernel backend must be torch or triton, got {backend!r}")
    for module in model.modules():
        if hasattr(module, "use_triton"):
            module.use_triton = backend == "triton"


class RMSNorm(nn.Module):
    """RMS normalisation computed in float32, as HF does, then cast back."""

    use_triton: bool = False

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_triton:
            from smallm.kernels.dispatch import rms_norm

            return rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``h = residual + x``; returns ``(self(h), h)`` (one fused kernel on the Triton path)."""
        if self.use_triton:
            from smallm.kernels.dispatch import fused_add_rms_norm

            return fused_add_rms_norm(x, residual, self.weight, self.eps)
        h = residual + x
        return self(h), h


class GatedMLP(nn.Module):
    """SwiGLU feed-forward with gate and up projections fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)

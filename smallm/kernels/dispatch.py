"""Entry points the model and sampler call on the Triton path.

Each function imports its kernel module on first use, so nothing here pulls in Triton until a
kernel actually runs. The model calls these only after the runner selected the Triton
attention backend (``layers.set_kernel_backend``); the default CPU path never comes here.
"""

from __future__ import annotations

import torch

from smallm.kernels._common import triton_unavailable_reason


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm over the last dimension (see ``kernels.rmsnorm``)."""
    from smallm.kernels.rmsnorm import rms_norm as kernel

    return kernel(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual``; returns ``(rms_norm(h), h)`` in one Triton kernel."""
    from smallm.kernels.rmsnorm import fused_add_rms_norm as kernel

    return kernel(x, residual, weight, eps)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton rotate-half rotary embedding with per-token ``cos`` / ``sin`` rows."""
    from smallm.kernels.rotary import apply_rotary as kernel

    return kernel(q, k, cos, sin)


def apply_token_bitmask_(
    logits: torch.Tensor, bitmask: torch.Tensor, use_triton: bool | None = None
) -> torch.Tensor:
    """Mask disallowed tokens to -inf in place; returns ``logits``.

    ``use_triton=None`` picks the Triton kernel when it can run on ``logits``' device (a CUDA
    GPU, or the interpreter) and the sampler's vectorised torch version otherwise.
    """
    if use_triton is None:
        use_triton = logits.is_cuda and triton_unavailable_reason(logits.device) is None
    if not use_triton:
        from smallm.runtime.sampling.batch_info import apply_token_bitmask_ as torch_version

        return torch_version(logits, bitmask)
    from smallm.kernels.token_bitmask import apply_token_bitmask

    apply_token_bitmask(logits, bitmask.to(device=logits.device, dtype=torch.int32))
    return logits

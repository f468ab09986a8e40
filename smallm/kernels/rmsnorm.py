"""RMSNorm, optionally fused with the residual add that precedes it.

Numerics follow ``smallm.runtime.model.layers.RMSNorm`` (and HF): the sum ``x + residual`` is
rounded to the activation dtype (it is the new residual stream), normalised in float32, the
result rounded to the activation dtype and then multiplied by the weight. Layout: rows of the
last dimension, ``[..., N]``, each row contiguous; one program per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from smallm.kernels._common import next_power_of_2


@triton.jit
def _rmsnorm_kernel(
    X,
    Residual,
    Weight,
    Out,
    Residual_out,
    n_cols,
    eps,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(X + r * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(Residual + r * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(Residual_out + r * stride_ro + offs, x, mask=mask)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / n_cols + eps)
    h = (h * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(Weight + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + r * stride_o + offs, (w * h).to(Out.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = x.shape[-1]
    x2 = _rows(x)
    # The output takes the weight's dtype like ``weight * h`` does in torch (same in practice).
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    res2 = res_out = None
    if residual is not None:
        res2 = _rows(residual)
        res_out = torch.empty_like(x2)
    if x2.shape[0]:
        _rmsnorm_kernel[(x2.shape[0],)](
            x2,
            res2 if res2 is not None else x2,
            weight,
            out,
            res_out if res_out is not None else out,
            n,
            eps,
            x2.stride(0),
            res2.stride(0) if res2 is not None else 0,
            out.stride(0),
            res_out.stride(0) if res_out is not None else 0,
            HAS_RESIDUAL=residual is not None,
            BLOCK=next_power_of_2(n),
        )
    shape = x.shape
    return out.view(shape), (res_out.view(shape) if res_out is not None else None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / rms(x))`` over the last dimension; returns a new tensor."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual``; returns ``(rms_norm(h), h)`` with one read of each input."""
    out, h = _launch(x, residual, weight, eps)
    assert h is not None
    return out, h


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The specification of :func:`rms_norm` (``layers.RMSNorm.forward``)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification of :func:`fused_add_rms_norm`."""
    h = x + residual
    return rms_norm_reference(h, weight, eps), h

"""KV store: write a pass's new keys and values into their pool slots.

Layouts: k, v [T, Hk, D] (rows may be strided, e.g. views of a fused QKV output, but each row's
heads and dims contiguous); k_buffer / v_buffer [slots, Hk, D] contiguous per slot; loc [T]
integer slots. One program copies one token's K and V row (``Hk * D`` values each).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from smallm.kernels._common import next_power_of_2


@triton.jit
def _store_kv_kernel(
    K,
    V,
    K_buf,
    V_buf,
    Loc,
    stride_kt,
    stride_vt,
    stride_bkt,
    stride_bvt,
    ROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(Loc + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < ROW
    k = tl.load(K + t * stride_kt + offs, mask=mask)
    v = tl.load(V + t * stride_vt + offs, mask=mask)
    tl.store(K_buf + slot * stride_bkt + offs, k.to(K_buf.dtype.element_ty), mask=mask)
    tl.store(V_buf + slot * stride_bvt + offs, v.to(V_buf.dtype.element_ty), mask=mask)


def _check_rows(name: str, t: torch.Tensor) -> None:
    # Each token's [Hk, D] block must be one contiguous run for the flat row copy.
    if t.stride(-1) != 1 or t.stride(-2) != t.shape[-1]:
        raise ValueError(f"{name} needs contiguous [heads, head_dim] rows")


def store_kv(
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    loc: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """``k_buffer[loc[t]] = k[t]`` and ``v_buffer[loc[t]] = v[t]`` for every t, cast to the
    buffer's dtype. Slots in ``loc`` must be distinct."""
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    for name, t in (("k", k), ("v", v), ("k_buffer", k_buffer), ("v_buffer", v_buffer)):
        _check_rows(name, t)
    row = k.shape[1] * k.shape[2]
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_buffer,
        v_buffer,
        loc,
        k.stride(0),
        v.stride(0),
        k_buffer.stride(0),
        v_buffer.stride(0),
        ROW=row,
        BLOCK=next_power_of_2(row),
    )


def store_kv_reference(
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    loc: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """The specification of :func:`store_kv` (what ``KVPool.store`` does)."""
    k_buffer.index_copy_(0, loc.long(), k.to(k_buffer.dtype))
    v_buffer.index_copy_(0, loc.long(), v.to(v_buffer.dtype))

"""Extend (prefill) attention: new tokens attend to their cached prefix and causally to
themselves, for a batch of requests with different prefix and extend lengths, in one launch.

Each program owns ``BLOCK_M`` new tokens of one request and one query head. It first reads
the request's prefix keys/values from the paged pool through the request->token table, then
the new keys/values from the contiguous ``k_extend`` / ``v_extend`` (the same values the
backend has just stored in the pool; reading them contiguously is cheaper than through the
table), with one online softmax across both.

Layouts: q, o [T, Hq, D] and k_extend, v_extend [T, Hk, D] hold all requests' new tokens back
to back, request b's at rows ``qo_starts[b] .. qo_starts[b] + extend_lens[b]``; k_buffer /
v_buffer [slots, Hk, D] are one layer of the pool; req_to_token [max_requests, max_context].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from smallm.kernels._common import dot_precision, dot_upcast, next_power_of_2
from smallm.kernels._paged_attention import (
    NO_WINDOW,
    attend_paged_kv,
    attention_scores,
    online_softmax_step,
)


@triton.jit
def _extend_kernel(
    Q,
    K_ext,
    V_ext,
    Out,
    K_buf,
    V_buf,
    Req_to_token,
    Req_pool_indices,
    Prefix_lens,
    Extend_lens,
    Qo_starts,
    scale,
    logit_cap,
    window,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_bkt,
    stride_bkh,
    stride_bvt,
    stride_bvh,
    stride_table,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_CAP: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    m_block = tl.program_id(2)
    extend_len = tl.load(Extend_lens + b).to(tl.int32)
    # The grid covers the longest extend; shorter requests' surplus programs exit at once.
    if m_block * BLOCK_M >= extend_len:
        return
    prefix_len = tl.load(Prefix_lens + b).to(tl.int32)
    qo_start = tl.load(Qo_starts + b).to(tl.int64)
    row = tl.load(Req_pool_indices + b).to(tl.int64)
    kv_head = head // GROUP

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < extend_len
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_pos = prefix_len + offs_m  # absolute positions of this block's queries
    q = tl.load(
        Q + (qo_start + offs_m[:, None]) * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Keys before (first query position - window + 1) are outside every query's window.
    lo = tl.maximum(prefix_len + m_block * BLOCK_M - window + 1, 0)

    # Cached prefix, read through the request->token table.
    m_i, l_i, acc = attend_paged_kv(
        q,
        m_i,
        l_i,
        acc,
        Slots=Req_to_token + row * stride_table,
        K=K_buf + kv_head * stride_bkh,
        V=V_buf + kv_head * stride_bvh,
        stride_kt=stride_bkt,
        stride_vt=stride_bvt,
        lo=tl.minimum(lo, prefix_len),
        hi=prefix_len,
        window_lo=(q_pos - window + 1)[:, None],
        scale=scale,
        logit_cap=logit_cap,
        offs_d=offs_d,
        d_mask=d_mask,
        BLOCK_N=BLOCK_N,
        USE_CAP=USE_CAP,
        PRECISION=PRECISION,
        UPCAST=UPCAST,
    )

    # The new tokens, causally: only blocks up to this query block's last row matter.
    ext_lo = tl.maximum(lo - prefix_len, 0)
    ext_hi = tl.minimum((m_block + 1) * BLOCK_M, extend_len)
    for n0 in range(ext_lo, ext_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < ext_hi
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(
            K_ext
            + (qo_start + offs_n[:, None]) * stride_kt
            + kv_head * stride_kh
            + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        s = attention_scores(q, k, scale, logit_cap, USE_CAP, PRECISION, UPCAST)
        keep = (
            n_mask[None, :]
            & (offs_n[None, :] <= offs_m[:, None])
            & (offs_m[:, None] - offs_n[None, :] < window)
        )
        s = tl.where(keep, s, float("-inf"))
        v = tl.load(
            V_ext
            + (qo_start + offs_n[:, None]) * stride_vt
            + kv_head * stride_vh
            + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, PRECISION, UPCAST)

    # Every real query sees at least itself, so l > 0 on the rows that are stored.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        Out + (qo_start + offs_m[:, None]) * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


def extend_attention(
    q: torch.Tensor,
    k_extend: torch.Tensor,
    v_extend: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    qo_starts: torch.Tensor,
    max_extend_len: int,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    logit_cap: float = 0.0,
    sliding_window: int = 0,
    block_m: int = 32,
    block_n: int = 32,
) -> torch.Tensor:
    """Causal attention of each request's new tokens over its prefix and themselves.

    Writes rows ``qo_starts[b] .. + extend_lens[b]`` of ``out`` (``[T, Hq, D]``, allocated
    when None) for every request b and leaves other rows untouched, so decode rows of a mixed
    batch can be filled by another kernel. ``max_extend_len`` >= every extend length sizes the
    grid. ``logit_cap`` and ``sliding_window`` as in ``decode_attention``.
    """
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads is not a multiple of {num_kv_heads} KV heads")
    for name, t in (("q", q), ("k_extend", k_extend), ("v_extend", v_extend)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dimension")
    if out is None:
        out = torch.empty_like(q)
    batch = req_pool_indices.shape[0]
    if batch == 0 or max_extend_len == 0:
        return out
    grid = (batch, num_heads, triton.cdiv(max_extend_len, block_m))
    _extend_kernel[grid](
        q,
        k_extend,
        v_extend,
        out,
        k_buffer,
        v_buffer,
        req_to_token,
        req_pool_indices,
        prefix_lens,
        extend_lens,
        qo_starts,
        scale,
        float(logit_cap),
        sliding_window if sliding_window > 0 else NO_WINDOW,
        q.stride(0),
        q.stride(1),
        k_extend.stride(0),
        k_extend.stride(1),
        v_extend.stride(0),
        v_extend.stride(1),
        out.stride(0),
        out.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        req_to_token.stride(0),
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=next_power_of_2(head_dim),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        USE_CAP=logit_cap > 0,
        PRECISION=dot_precision(q.dtype),
        UPCAST=dot_upcast(q.dtype),
    )
    return out


def extend_attention_reference(
    q: torch.Tensor,
    k_extend: torch.Tensor,
    v_extend: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    qo_starts: torch.Tensor,
    scale: float,
    *,
    logit_cap: float = 0.0,
    sliding_window: int = 0,
) -> torch.Tensor:
    """The specification of :func:`extend_attention`, one request at a time, in float32.

    Rows of the result that belong to no request are zero.
    """
    num_heads, num_kv_heads = q.shape[1], k_buffer.shape[1]
    group = num_heads // num_kv_heads
    out = torch.zeros_like(q)
    for b in range(req_pool_indices.shape[0]):
        p, n, s = int(prefix_lens[b]), int(extend_lens[b]), int(qo_starts[b])
        slots = req_to_token[int(req_pool_indices[b]), :p].long()
        keys = torch.cat([k_buffer[slots], k_extend[s : s + n]]).float()
        values = torch.cat([v_buffer[slots], v_extend[s : s + n]]).float()
        keys = keys.repeat_interleave(group, dim=1)  # [p + n, Hq, D]
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("mhd,nhd->hmn", q[s : s + n].float(), keys) * scale
        if logit_cap > 0:
            scores = logit_cap * torch.tanh(scores / logit_cap)
        q_pos = torch.arange(p, p + n).unsqueeze(1)
        k_pos = torch.arange(p + n).unsqueeze(0)
        keep = k_pos <= q_pos
        if sliding_window > 0:
            keep &= q_pos - k_pos < sliding_window
        scores = scores.masked_fill(~keep, float("-inf"))
        out[s : s + n] = torch.einsum("hmn,nhd->mhd", scores.softmax(-1), values).to(q.dtype)
    return out

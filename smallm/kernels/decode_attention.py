"""Decode attention over the paged KV pool, split along the sequence (flash-decoding).

One query token per request attends to the request's whole sequence, whose KV slots are read
through the request->token table. Stage 1 gives every (request, KV head, split) program a
contiguous piece of the sequence and writes the piece's normalised partial output and its
log-sum-exp; stage 2 merges the pieces of each (request, query head). Splitting keeps the GPU
busy when the batch is small and sequences are long.

Layouts: q [B, Hq, D]; k_buffer / v_buffer [slots, Hk, D] (one layer of the KV pool);
req_to_token [max_requests, max_context] integer slot table; req_pool_indices [B] (row of each
request); seq_lens [B] (tokens in each sequence, including the query's own, already stored).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from smallm.kernels._common import dot_precision, dot_upcast, next_power_of_2
from smallm.kernels._paged_attention import NO_WINDOW, attend_paged_kv


@triton.jit
def _decode_stage1(
    Q,
    K_buf,
    V_buf,
    Req_to_token,
    Req_pool_indices,
    Seq_lens,
    Mid_out,
    Mid_lse,
    scale,
    logit_cap,
    window,
    num_splits,
    stride_qb,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_table,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_CAP: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # All query heads sharing this KV head are processed together, so each key is read once.
    offs_h = tl.arange(0, BLOCK_H)
    heads = kv_head * GROUP + offs_h
    h_mask = offs_h < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM

    row = tl.load(Req_pool_indices + b).to(tl.int64)
    seq_len = tl.load(Seq_lens + b).to(tl.int32)
    split_len = tl.cdiv(seq_len, num_splits)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    # The query sits at position seq_len - 1; key k is inside the window iff k >= seq_len - window.
    lo = tl.maximum(start, seq_len - window)

    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=h_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)

    m_i, l_i, acc = attend_paged_kv(
        q,
        m_i,
        l_i,
        acc,
        Slots=Req_to_token + row * stride_table,
        K=K_buf + kv_head * stride_kh,
        V=V_buf + kv_head * stride_vh,
        stride_kt=stride_kt,
        stride_vt=stride_vt,
        lo=lo,
        hi=end,
        window_lo=None,
        scale=scale,
        logit_cap=logit_cap,
        offs_d=offs_d,
        d_mask=d_mask,
        BLOCK_N=BLOCK_N,
        USE_CAP=USE_CAP,
        PRECISION=PRECISION,
        UPCAST=UPCAST,
    )

    # An empty split (past the sequence end, or outside the window) reports lse = -inf, which
    # gives it weight 0 in stage 2.
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    tl.store(
        Mid_out + b * stride_mb + heads[:, None] * stride_mh + split * stride_ms + offs_d[None, :],
        out,
        mask=h_mask[:, None] & d_mask[None, :],
    )
    tl.store(Mid_lse + b * stride_lb + heads * stride_lh + split, lse, mask=h_mask)


@triton.jit
def _decode_stage2(
    Mid_out,
    Mid_lse,
    Out,
    num_splits,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM

    lse = tl.load(
        Mid_lse + b * stride_lb + h * stride_lh + offs_s, mask=s_mask, other=float("-inf")
    )
    # Every sequence has at least its own token, so some split is non-empty and m is finite.
    m = tl.max(lse, 0)
    w = tl.exp(lse - m)
    part = tl.load(
        Mid_out + b * stride_mb + h * stride_mh + offs_s[:, None] * stride_ms + offs_d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    out = tl.sum(w[:, None] * part, 0) / tl.sum(w, 0)
    tl.store(
        Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=d_mask
    )


def default_num_kv_splits(max_seq_len: int, batch_size: int) -> int:
    """Splits per sequence: enough programs to fill a GPU for small batches, at least ~64 keys
    per split so the merge stays cheap."""
    by_length = max(1, max_seq_len // 64)
    by_occupancy = max(1, 64 // max(batch_size, 1))
    return max(1, min(16, by_length, by_occupancy))


def decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    num_kv_splits: int | None = None,
    logit_cap: float = 0.0,
    sliding_window: int = 0,
    block_n: int = 32,
) -> torch.Tensor:
    """Attention of one query token per request over its paged KV; returns ``[B, Hq, D]``.

    ``logit_cap > 0`` soft-caps scores as ``cap * tanh(score / cap)`` (after scaling);
    ``sliding_window > 0`` keeps only the last ``sliding_window`` keys (the query's own
    included). ``num_kv_splits`` defaults to :func:`default_num_kv_splits` of the longest
    sequence (pass it to avoid reading ``seq_lens`` back from the device).
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads is not a multiple of {num_kv_heads} KV heads")
    if q.stride(-1) != 1 or k_buffer.stride(-1) != 1 or v_buffer.stride(-1) != 1:
        raise ValueError("q, k_buffer and v_buffer need a contiguous last dimension")
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    if num_kv_splits is None:
        num_kv_splits = default_num_kv_splits(int(seq_lens.max()), batch)
    group = num_heads // num_kv_heads
    block_d = next_power_of_2(head_dim)
    mid_out = torch.empty(
        batch, num_heads, num_kv_splits, head_dim, dtype=torch.float32, device=q.device
    )
    mid_lse = torch.empty(batch, num_heads, num_kv_splits, dtype=torch.float32, device=q.device)
    _decode_stage1[(batch, num_kv_heads, num_kv_splits)](
        q,
        k_buffer,
        v_buffer,
        req_to_token,
        req_pool_indices,
        seq_lens,
        mid_out,
        mid_lse,
        scale,
        float(logit_cap),
        sliding_window if sliding_window > 0 else NO_WINDOW,
        num_kv_splits,
        q.stride(0),
        q.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        req_to_token.stride(0),
        mid_out.stride(0),
        mid_out.stride(1),
        mid_out.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        GROUP=group,
        HEAD_DIM=head_dim,
        # tl.dot needs every dimension >= 16 on GPUs.
        BLOCK_H=max(16, next_power_of_2(group)),
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        USE_CAP=logit_cap > 0,
        PRECISION=dot_precision(q.dtype),
        UPCAST=dot_upcast(q.dtype),
    )
    _decode_stage2[(batch, num_heads)](
        mid_out,
        mid_lse,
        out,
        num_kv_splits,
        mid_out.stride(0),
        mid_out.stride(1),
        mid_out.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_S=next_power_of_2(num_kv_splits),
    )
    return out


def decode_attention_reference(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    logit_cap: float = 0.0,
    sliding_window: int = 0,
) -> torch.Tensor:
    """The specification of :func:`decode_attention`, one request at a time, in float32."""
    num_heads, num_kv_heads = q.shape[1], k_buffer.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        slots = req_to_token[int(req_pool_indices[b]), :n].long()
        keys = k_buffer[slots].float().repeat_interleave(group, dim=1)  # [n, Hq, D]
        values = v_buffer[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), keys) * scale
        if logit_cap > 0:
            scores = logit_cap * torch.tanh(scores / logit_cap)
        if sliding_window > 0:
            scores[:, : max(0, n - sliding_window)] = float("-inf")
        probs = scores.softmax(-1)
        out[b] = torch.einsum("hn,nhd->hd", probs, values).to(q.dtype)
    return out

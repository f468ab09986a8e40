"""The online-softmax block loop shared by the decode and extend attention kernels (imports
Triton).

Both kernels fold a request's keys, ``BLOCK_N`` at a time, into a running max ``m``, sum ``l``
and unnormalised output ``acc`` per query row; they differ only in which query rows a program
owns, where the keys come from and what they do with the result. Everything here is inlined
into the calling kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from smallm.kernels._tl_helpers import dot, tanh

# Sliding window "off": larger than any context, so the window test always passes.
NO_WINDOW = 1 << 30


@triton.jit
def attention_scores(
    q, k, scale, logit_cap, USE_CAP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr
):
    """``q @ k^T * scale`` in float32, soft-capped as ``cap * tanh(s / cap)`` when ``USE_CAP``."""
    s = dot(q, tl.trans(k), PRECISION, UPCAST) * scale
    if USE_CAP:
        s = logit_cap * tanh(s / logit_cap)
    return s


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Folds one block of masked scores ``s`` and its values ``v`` into ``(m, l, acc)``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows with every key masked so far keep m = -inf; subtracting 0 instead avoids inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, UPCAST)
    return m_new, l_i, acc


@triton.jit
def attend_paged_kv(
    q,
    m_i,
    l_i,
    acc,
    Slots,
    K,
    V,
    stride_kt,
    stride_vt,
    lo,
    hi,
    window_lo,
    scale,
    logit_cap,
    offs_d,
    d_mask,
    BLOCK_N: tl.constexpr,
    USE_CAP: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Folds keys ``lo .. hi`` of one request, read from the paged pool, into ``(m, l, acc)``.

    ``Slots`` is the request's row of the request->token table; ``K`` / ``V`` point at one KV
    head of a pool layer (slot strides ``stride_kt`` / ``stride_vt``, contiguous head dim).
    There is no causal test: every key read here is at or before every query. ``window_lo``
    is each query row's first key inside its sliding window, a column ``[rows, 1]``, or None
    when ``lo`` already leaves out every key outside the window (all rows at one position, as
    in decode), which saves the per-key test.
    """
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        slots = tl.load(Slots + offs_n, mask=n_mask, other=0).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K + slots[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = attention_scores(q, k, scale, logit_cap, USE_CAP, PRECISION, UPCAST)
        keep = n_mask[None, :]
        if window_lo is not None:
            keep = keep & (offs_n[None, :] >= window_lo)
        s = tl.where(keep, s, float("-inf"))
        v = tl.load(V + slots[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, PRECISION, UPCAST)
    return m_i, l_i, acc

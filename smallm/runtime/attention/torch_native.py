"""Attention over the paged KV pool with torch's scaled_dot_product_attention (CPU-friendly)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from smallm.runtime.attention.base import AttentionBackend
from smallm.runtime.model.forward_batch import ForwardBatch


@dataclass
class _Group:
    """Requests whose new tokens (at most ``width`` each) share one padded SDPA call.

    Decodes are the ``width == 1`` case. Row b's query t is batch token ``q_idx[b, t]``
    (padding repeats its last token; its output is dropped).
    """

    width: int
    q_idx: torch.Tensor | None  # [B, width] rows of q; None: the whole batch, one token each
    slots: torch.Tensor  # [B, L] KV slots, padded past each sequence's end
    mask: torch.Tensor  # [B, width, L] True where query t may see key j
    src: torch.Tensor | None = None  # flat (b, t) positions of real tokens ...
    dest: torch.Tensor | None = None  # ... and the batch rows they answer
    # The mask per query position after folding G query heads into each KV head:
    # [B, 1, width * G, L], built by the first layer (G is known from q).
    sdpa_mask: torch.Tensor | None = None


@dataclass
class _Extend:
    start: int
    length: int
    slots: torch.Tensor  # [seq_len]
    mask: torch.Tensor | None  # [length, seq_len]; None = plain causal (no prefix)


@dataclass
class _Paged:
    """Tokens whose attention the fused kernel computes over the pool in place: batch rows
    ``rows`` (None: every token), each of request-table row ``req_rows[i]`` seeing its first
    ``kv_lens[i]`` tokens."""

    rows: torch.Tensor | None
    req_rows: torch.Tensor
    kv_lens: torch.Tensor


@dataclass
class _Metadata:
    groups: list[_Group]
    extends: list[_Extend]
    paged: _Paged | None = None


class TorchNativeBackend(AttentionBackend):
    """Decodes share one padded SDPA call; so do short extends (up to ``batched_extend_max``
    new tokens, e.g. jump-forward's forced tokens); long extends run one call per request.

    Long extends are compute-bound, so a per-request call costs little; decodes and short
    extends are many and tiny, and a call per request per layer would cost more than the math.
    """

    # Extends of at most this many tokens are batched (0: only decodes are); a switch to
    # measure the batching, set from RunnerConfig.batched_extend_max_tokens.
    batched_extend_max = 16
    # The fused CPU ops module (smallm/kernels/cpu): when set, decodes and short extends use its
    # paged attention, which reads each request's keys and values where they lie in the pool
    # instead of gathering them into padded copies in every layer.
    fused_ops = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Gathered keys/values of a decode batch are tens of MB per layer. Fresh tensors that
        # size come from newly mapped pages each time (measured: a 25 MB gather took 6.4 ms in
        # the model vs 1.1 ms into reused memory), so gathers go into grow-only buffers.
        self._scratch: list[torch.Tensor] = [torch.empty(0), torch.empty(0)]

    def _gather(self, which: int, buf: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        n = slots.numel()
        row = buf[0].numel()
        scratch = self._scratch[which]
        if scratch.numel() < n * row or scratch.dtype != buf.dtype:
            scratch = torch.empty(int(n * 1.25) * row, dtype=buf.dtype)
            self._scratch[which] = scratch
        out = scratch[: n * row].view(n, *buf.shape[1:])
        return torch.index_select(buf, 0, slots, out=out)

    def prepare(self, batch: ForwardBatch) -> None:
        table = self.req_to_token.table
        decode_rows, short_rows, extends = [], [], []
        for i, n in enumerate(batch.extend_lens):
            if n == 1:
                decode_rows.append(i)
            elif n <= self.batched_extend_max:
                short_rows.append(i)
            else:
                e, p = batch.entries[i], batch.prefix_lens[i]
                slots = table[e.req_pool_index, : p + n]
                mask = None
                if p > 0:
                    mask = torch.ones(n, p + n, dtype=torch.bool).tril_(diagonal=p)
                extends.append(_Extend(batch.extend_starts[i], n, slots, mask))
        if self.fused_ops is not None:
            batch.attn_metadata = _Metadata(
                [], extends, self._paged(batch, decode_rows + short_rows)
            )
            return
        whole = len(decode_rows) == batch.batch_size
        groups = [
            self._group(batch, rows, whole=whole and rows is decode_rows)
            for rows in (decode_rows, short_rows)
            if rows
        ]
        batch.attn_metadata = _Metadata(groups, extends)

    def _paged(self, batch: ForwardBatch, rows: list[int]) -> _Paged | None:
        if not rows:
            return None
        req_rows, kv_lens, tokens = [], [], []
        for i in sorted(rows):
            p, n, start = batch.prefix_lens[i], batch.extend_lens[i], batch.extend_starts[i]
            req_rows += [batch.entries[i].req_pool_index] * n
            kv_lens += range(p + 1, p + n + 1)
            tokens += range(start, start + n)
        whole = len(tokens) == len(batch.positions)
        return _Paged(
            None if whole else torch.tensor(tokens),
            torch.tensor(req_rows, dtype=torch.int64),
            torch.tensor(kv_lens, dtype=torch.int64),
        )

    def _group(self, batch: ForwardBatch, rows: list[int], whole: bool) -> _Group:
        table = self.req_to_token.table
        n = torch.tensor([batch.extend_lens[i] for i in rows])
        lens = torch.tensor([batch.seq_lens[i] for i in rows])
        width, max_len = int(n.max()), int(lens.max())
        req_rows = torch.tensor([batch.entries[i].req_pool_index for i in rows])
        keys = torch.arange(max_len)
        real = keys.unsqueeze(0) < lens.unsqueeze(1)  # [B, L]
        # Positions past a sequence's end may hold stale slot ids; point them at slot 0.
        slots = table[req_rows, :max_len].masked_fill(~real, 0)
        t = torch.minimum(torch.arange(width).unsqueeze(0), (n - 1).unsqueeze(1))  # [B, W]
        # Query t of row b sees keys up to its own position: (seq_len - n) + t.
        pos = (lens - n).unsqueeze(1) + t
        mask = (keys.view(1, 1, -1) <= pos.unsqueeze(2)) & real.unsqueeze(1)  # [B, W, L]
        if whole:
            return _Group(1, None, slots, mask)
        starts = torch.tensor([batch.extend_starts[i] for i in rows])
        q_idx = starts.unsqueeze(1) + t
        valid = torch.arange(width).unsqueeze(0) < n.unsqueeze(1)
        src = valid.view(-1).nonzero().squeeze(1)
        return _Group(width, q_idx, slots, mask, src, q_idx.view(-1)[src])

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: ForwardBatch
    ) -> torch.Tensor:
        self.kv_pool.store(layer, batch.out_cache_loc, k, v)
        return self.attend(q, layer, batch).reshape(q.shape[0], -1)

    def attend(self, q: torch.Tensor, layer: int, batch: ForwardBatch) -> torch.Tensor:
        pool = self.kv_pool
        k_buf, v_buf = pool.k(layer), pool.v(layer)
        meta: _Metadata = batch.attn_metadata
        num_tokens = q.shape[0]
        q = q.reshape(num_tokens, -1, k_buf.shape[2])
        if meta.paged is not None and meta.paged.rows is None:
            return self._paged_attention(q, k_buf, v_buf, meta.paged)
        groups = meta.groups
        if len(groups) == 1 and groups[0].q_idx is None:
            return self._batched(q, k_buf, v_buf, groups[0])
        if len(meta.extends) == 1 and meta.extends[0].length == num_tokens:
            return self._extend(q, k_buf, v_buf, meta.extends[0])  # one prompt: no copy out
        out = torch.empty_like(q)
        for ext in meta.extends:
            sl = slice(ext.start, ext.start + ext.length)
            out[sl] = self._extend(q[sl], k_buf, v_buf, ext)
        for group in groups:
            res = self._batched(q[group.q_idx.view(-1)], k_buf, v_buf, group)
            out[group.dest] = res[group.src]
        if meta.paged is not None:
            rows = meta.paged.rows
            out[rows] = self._paged_attention(q[rows].contiguous(), k_buf, v_buf, meta.paged)
        return out

    def _paged_attention(
        self, q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, paged: _Paged
    ) -> torch.Tensor:
        return self.fused_ops.paged_attention(
            q.contiguous(),
            k_buf,
            v_buf,
            self.req_to_token.table,
            paged.req_rows,
            paged.kv_lens,
            self.scale,
        )

    def _batched(
        self, q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, group: _Group
    ) -> torch.Tensor:
        """q: [B * width, Hq, D] -> [B * width, Hq, D]."""
        b, n = group.slots.shape
        w = group.width
        num_kv_heads, head_dim = k_buf.shape[1:]
        flat = group.slots.view(-1)
        # index_select on the flat slot list is several times faster than advanced indexing.
        keys = self._gather(0, k_buf, flat).view(b, n, num_kv_heads, head_dim).transpose(1, 2)
        values = self._gather(1, v_buf, flat).view(b, n, num_kv_heads, head_dim).transpose(1, 2)
        # The query heads sharing a KV head become that head's "query positions" (the mask
        # carries causality), so each KV head's keys are read once instead of once per query
        # head: [B, W, Hk, G, D] -> [B, Hk, W * G, D].
        queries = q.view(b, w, num_kv_heads, -1, head_dim)
        if w > 1:
            queries = queries.permute(0, 2, 1, 3, 4)
        queries = queries.reshape(b, num_kv_heads, -1, head_dim)
        if group.sdpa_mask is None:
            g = queries.shape[2] // w
            group.sdpa_mask = (
                group.mask.unsqueeze(2).expand(-1, -1, g, -1).reshape(b, 1, w * g, n)
                if w > 1
                else group.mask.unsqueeze(1)  # [B, 1, 1, L] broadcasts over the G heads
            )
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=group.sdpa_mask, scale=self.scale
        )
        if w > 1:
            out = out.view(b, num_kv_heads, w, -1, head_dim).permute(0, 2, 1, 3, 4)
        return out.reshape(b * w, -1, head_dim)

    def _extend(
        self, q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, ext: _Extend
    ) -> torch.Tensor:
        # Token-major views ([1, heads, tokens, D] with token stride H * D): torch's CPU flash
        # attention reads strided inputs and writes its output token-major, so neither the
        # inputs nor the result are copied into head-major layout.
        keys = k_buf.index_select(0, ext.slots).unsqueeze(0).transpose(1, 2)  # [1, Hk, S, D]
        values = v_buf.index_select(0, ext.slots).unsqueeze(0).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(0).transpose(1, 2),  # [1, Hq, n, D]
            keys,
            values,
            attn_mask=ext.mask,
            is_causal=ext.mask is None,
            scale=self.scale,
            enable_gqa=True,
        )
        return out.transpose(1, 2).squeeze(0)

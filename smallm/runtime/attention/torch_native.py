"""Attention over the paged KV pool with torch's scaled_dot_product_attention (CPU-friendly)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from smallm.runtime.attention.base import AttentionBackend
from smallm.runtime.model.forward_batch import ForwardBatch


@dataclass
class _DecodeGroup:
    token_idx: torch.Tensor | None  # rows of q that decode; None when every row does
    slots: torch.Tensor  # [B, L] KV slots, padded past each sequence's end
    mask: torch.Tensor  # [B, 1, 1, L] True where a key is real


@dataclass
class _Extend:
    start: int
    length: int
    slots: torch.Tensor  # [seq_len]
    mask: torch.Tensor | None  # [length, seq_len]; None = plain causal (no prefix)


@dataclass
class _Metadata:
    decode: _DecodeGroup | None
    extends: list[_Extend]


class TorchNativeBackend(AttentionBackend):
    """Decodes are batched into one padded SDPA call; extends run one SDPA call per request.

    Extends are compute-bound, so a per-request call costs little; decodes are many and tiny, so
    they share one call over keys gathered through the request->token table.
    """

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
        decode_rows = [i for i, n in enumerate(batch.extend_lens) if n == 1]
        extends = []
        for i, n in enumerate(batch.extend_lens):
            if n == 1:
                continue
            e, p = batch.entries[i], batch.prefix_lens[i]
            slots = table[e.req_pool_index, : p + n]
            mask = None
            if p > 0:
                mask = torch.ones(n, p + n, dtype=torch.bool).tril_(diagonal=p)
            extends.append(_Extend(batch.extend_starts[i], n, slots, mask))
        decode = None
        if decode_rows:
            lens = torch.tensor([batch.seq_lens[i] for i in decode_rows])
            max_len = int(lens.max())
            rows = torch.tensor([batch.entries[i].req_pool_index for i in decode_rows])
            mask = torch.arange(max_len).unsqueeze(0) < lens.unsqueeze(1)
            # Positions past a sequence's end may hold stale slot ids; point them at slot 0.
            slots = table[rows, :max_len].masked_fill(~mask, 0)
            token_idx = None
            if len(decode_rows) != batch.batch_size:
                token_idx = torch.tensor([batch.extend_starts[i] for i in decode_rows])
            decode = _DecodeGroup(token_idx, slots, mask[:, None, None, :])
        batch.attn_metadata = _Metadata(decode, extends)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: ForwardBatch
    ) -> torch.Tensor:
        pool = self.kv_pool
        pool.store(layer, batch.out_cache_loc, k, v)
        k_buf, v_buf = pool.k(layer), pool.v(layer)
        meta: _Metadata = batch.attn_metadata
        num_tokens = q.shape[0]
        if meta.decode is not None and meta.decode.token_idx is None and not meta.extends:
            return self._decode(q, k_buf, v_buf, meta.decode).reshape(num_tokens, -1)
        out = torch.empty_like(q)
        for ext in meta.extends:
            sl = slice(ext.start, ext.start + ext.length)
            out[sl] = self._extend(q[sl], k_buf, v_buf, ext)
        if meta.decode is not None:
            idx = meta.decode.token_idx
            out[idx] = self._decode(q[idx], k_buf, v_buf, meta.decode)
        return out.reshape(num_tokens, -1)

    def _decode(
        self, q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, group: _DecodeGroup
    ) -> torch.Tensor:
        b, n = group.slots.shape
        num_kv_heads, head_dim = k_buf.shape[1:]
        flat = group.slots.view(-1)
        # index_select on the flat slot list is several times faster than advanced indexing.
        keys = self._gather(0, k_buf, flat).view(b, n, num_kv_heads, head_dim).transpose(1, 2)
        values = self._gather(1, v_buf, flat).view(b, n, num_kv_heads, head_dim).transpose(1, 2)
        # The query heads sharing a KV head become that head's "query positions" (no causal
        # mask among them), so each KV head's keys are read once instead of once per query head.
        queries = q.view(b, num_kv_heads, -1, head_dim)
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=group.mask, scale=self.scale
        )
        return out.reshape(b, -1, head_dim)

    def _extend(
        self, q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, ext: _Extend
    ) -> torch.Tensor:
        keys = k_buf.index_select(0, ext.slots).transpose(0, 1).unsqueeze(0)  # [1, Hk, S, D]
        values = v_buf.index_select(0, ext.slots).transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),  # [1, Hq, n, D]
            keys,
            values,
            attn_mask=ext.mask,
            is_causal=ext.mask is None,
            scale=self.scale,
            enable_gqa=True,
        )
        return out.squeeze(0).transpose(0, 1)

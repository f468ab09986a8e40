"""Attention through smallm's Triton kernels, reading the paged KV pool in place.

Triton is imported only when this backend is constructed, so the CPU runtime never needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smallm.kernels._common import triton_unavailable_reason
from smallm.runtime.attention.base import AttentionBackend
from smallm.runtime.cache.kv_pool import KVPool
from smallm.runtime.cache.req_to_token import ReqToTokenPool
from smallm.runtime.model.forward_batch import ForwardBatch


@dataclass
class _DecodeRows:
    token_idx: torch.Tensor | None  # rows of q that decode; None when every row does
    req_pool_indices: torch.Tensor  # [B_decode]
    seq_lens: torch.Tensor  # [B_decode] int32
    num_kv_splits: int


@dataclass
class _ExtendRows:
    req_pool_indices: torch.Tensor  # [B_extend]
    prefix_lens: torch.Tensor  # [B_extend] int32
    extend_lens: torch.Tensor  # [B_extend] int32
    qo_starts: torch.Tensor  # [B_extend] offsets into the flat batch
    max_extend_len: int


@dataclass
class _Metadata:
    decode: _DecodeRows | None
    extend: _ExtendRows | None


class TritonAttentionBackend(AttentionBackend):
    """Decode rows (one new token) go through the split-KV decode kernel in one launch; every
    other row through one launch of the extend kernel. Both read KV through the table."""

    def __init__(
        self,
        kv_pool: KVPool,
        req_to_token: ReqToTokenPool,
        scale: float,
        *,
        logit_cap: float = 0.0,
        sliding_window: int = 0,
    ):
        super().__init__(kv_pool, req_to_token, scale)
        reason = triton_unavailable_reason(kv_pool.buffer.device)
        if reason is not None:
            raise ValueError(f"--attention-backend triton: {reason}")
        # Imported here, not at module level, so selecting torch_native never imports Triton.
        from smallm.kernels import decode_attention, extend_attention, kv_store

        self._decode_mod, self._extend_mod, self._store_mod = (
            decode_attention,
            extend_attention,
            kv_store,
        )
        self.logit_cap = logit_cap
        self.sliding_window = sliding_window
        self.device = kv_pool.buffer.device
        # On the CPU the kernels read the table's own memory; a GPU copy is refreshed per batch.
        self._table = req_to_token.table.to(self.device)

    def prepare(self, batch: ForwardBatch) -> None:
        dev = self.device
        rows = [e.req_pool_index for e in batch.entries]
        decode_i = [i for i, n in enumerate(batch.extend_lens) if n == 1]
        extend_i = [i for i, n in enumerate(batch.extend_lens) if n != 1]
        decode = extend = None
        if self._table.device != self.req_to_token.table.device:
            # Kernels read only this batch's rows: refresh those from the host table.
            idx = torch.tensor(rows)
            self._table[idx.to(dev)] = self.req_to_token.table[idx].to(dev, non_blocking=True)
        if decode_i:
            seq_lens = [batch.seq_lens[i] for i in decode_i]
            token_idx = None
            if len(decode_i) != batch.batch_size:
                token_idx = torch.tensor([batch.extend_starts[i] for i in decode_i], device=dev)
            decode = _DecodeRows(
                token_idx,
                torch.tensor([rows[i] for i in decode_i], device=dev),
                torch.tensor(seq_lens, dtype=torch.int32, device=dev),
                self._decode_mod.default_num_kv_splits(max(seq_lens), len(decode_i)),
            )
        if extend_i:
            ext_lens = [batch.extend_lens[i] for i in extend_i]
            extend = _ExtendRows(
                torch.tensor([rows[i] for i in extend_i], device=dev),
                torch.tensor(
                    [batch.prefix_lens[i] for i in extend_i], dtype=torch.int32, device=dev
                ),
                torch.tensor(ext_lens, dtype=torch.int32, device=dev),
                torch.tensor([batch.extend_starts[i] for i in extend_i], device=dev),
                max(ext_lens),
            )
        batch.attn_metadata = _Metadata(decode, extend)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: ForwardBatch
    ) -> torch.Tensor:
        pool = self.kv_pool
        k_buf, v_buf = pool.k(layer), pool.v(layer)
        k, v = k.to(pool.dtype), v.to(pool.dtype)
        self._store_mod.store_kv(k_buf, v_buf, batch.out_cache_loc, k, v)
        meta: _Metadata = batch.attn_metadata
        q = q if q.stride(-1) == 1 else q.contiguous()
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if meta.extend is not None:
            ext = meta.extend
            self._extend_mod.extend_attention(
                q,
                k,
                v,
                k_buf,
                v_buf,
                self._table,
                ext.req_pool_indices,
                ext.prefix_lens,
                ext.extend_lens,
                ext.qo_starts,
                ext.max_extend_len,
                self.scale,
                out=out,
                logit_cap=self.logit_cap,
                sliding_window=self.sliding_window,
            )
        if meta.decode is not None:
            dec = meta.decode
            idx = dec.token_idx
            q_dec = q if idx is None else q.index_select(0, idx)
            o_dec = out if idx is None else None
            o_dec = self._decode_mod.decode_attention(
                q_dec,
                k_buf,
                v_buf,
                self._table,
                dec.req_pool_indices,
                dec.seq_lens,
                self.scale,
                out=o_dec,
                num_kv_splits=dec.num_kv_splits,
                logit_cap=self.logit_cap,
                sliding_window=self.sliding_window,
            )
            if idx is not None:
                out.index_copy_(0, idx, o_dec)
        return out.view(q.shape[0], -1)

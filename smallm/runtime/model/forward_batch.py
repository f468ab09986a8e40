"""What one forward pass computes: a batch of requests, each extending its cached prefix."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class BatchEntry:
    """One request's part of a forward pass.

    ``token_ids`` are the new tokens (the extend); ``prefix_len`` tokens of this request are
    already in the KV pool, recorded in row ``req_pool_index`` of the request->token table, and
    the caller has already written the slots of the new tokens into that table. A decode step is
    simply an extend of one token.
    """

    req_pool_index: int
    prefix_len: int
    token_ids: list[int]
    # Input logprobs: score extend positions ``logprob_start ..`` against ``logprob_targets``
    # (the token that follows each scored position). None: no input logprobs.
    logprob_start: int | None = None
    logprob_targets: list[int] | None = None
    top_logprobs_num: int = 0
    # False for a chunk of a prompt whose last position nobody samples from.
    need_next_logits: bool = True
    # Embedding requests: also return the sum of this extend's last hidden states.
    pool_hidden: bool = False


@dataclass
class ForwardBatch:
    """Flattened tensors for one forward pass over ``len(entries)`` requests of ``T`` tokens."""

    entries: list[BatchEntry]
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    out_cache_loc: torch.Tensor  # [T] int64: the KV slots of the new tokens
    prefix_lens: list[int]
    extend_lens: list[int]
    seq_lens: list[int]
    extend_starts: list[int]  # offset of each request's first new token in the flat batch
    # Filled by the attention backend's `prepare`; shared by all layers of this pass.
    attn_metadata: Any = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return len(self.entries)

    @classmethod
    def build(cls, entries: list[BatchEntry], req_to_token: np.ndarray) -> ForwardBatch:
        """Flatten ``entries``; new tokens' slots are read from ``req_to_token`` (numpy table)."""
        if not entries:
            raise ValueError("empty batch")
        prefix_lens = [e.prefix_len for e in entries]
        extend_lens = [len(e.token_ids) for e in entries]
        if min(extend_lens) < 1:
            raise ValueError("every request in a batch must extend by at least one token")
        starts = np.cumsum([0, *extend_lens[:-1]]).tolist()
        total = sum(extend_lens)
        ids = np.empty(total, dtype=np.int64)
        pos = np.empty(total, dtype=np.int64)
        locs = np.empty(total, dtype=np.int64)
        for e, s, p, n in zip(entries, starts, prefix_lens, extend_lens):
            ids[s : s + n] = e.token_ids
            pos[s : s + n] = np.arange(p, p + n)
            locs[s : s + n] = req_to_token[e.req_pool_index, p : p + n]
        return cls(
            entries=entries,
            input_ids=torch.from_numpy(ids),
            positions=torch.from_numpy(pos),
            out_cache_loc=torch.from_numpy(locs),
            prefix_lens=prefix_lens,
            extend_lens=extend_lens,
            seq_lens=[p + n for p, n in zip(prefix_lens, extend_lens)],
            extend_starts=starts,
        )

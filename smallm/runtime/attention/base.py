"""The contract between the model and whatever computes attention over the paged KV pool."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from smallm.runtime.cache.kv_pool import KVPool
from smallm.runtime.cache.req_to_token import ReqToTokenPool
from smallm.runtime.model.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    """Computes causal attention for a batch that mixes extends and decodes.

    Contract:
    - ``prepare(batch)`` runs once per forward pass, before any layer, and may store anything
      layers share (gather indices, masks) in ``batch.attn_metadata``.
    - ``forward(q, k, v, layer, batch)`` first writes this pass's new keys/values into the pool at
      ``batch.out_cache_loc``, then returns attention output [T, Hq * D] where token t of request
      r attends to r's tokens ``0 .. prefix_len + t`` (its cached prefix and its own new tokens
      up to itself), read through the request->token table.
    - q is [T, Hq, D]; k and v are [T, Hk, D] with Hq a multiple of Hk (grouped-query attention).
    """

    def __init__(self, kv_pool: KVPool, req_to_token: ReqToTokenPool, scale: float):
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token
        self.scale = scale

    @abstractmethod
    def prepare(self, batch: ForwardBatch) -> None: ...

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: ForwardBatch
    ) -> torch.Tensor: ...

    def attend(self, q: torch.Tensor, layer: int, batch: ForwardBatch) -> torch.Tensor:
        """``forward`` for a caller that already wrote this pass's keys and values into the pool
        (the fused rotary + KV-store op): q is [T, Hq, D], the result [T, Hq, D]."""
        raise NotImplementedError(f"{type(self).__name__} has no attend()")

"""Request -> token-slot table: row r, column i holds the KV slot of request r's i-th token."""

from __future__ import annotations

import numpy as np
import torch

from smallm.runtime.cache.slot_allocator import SlotAllocator


class ReqToTokenPool:
    """A table of ``max_requests`` rows by ``max_context_len`` columns of KV slot ids.

    Written from numpy (cheap bookkeeping) and read by attention through a torch view of the
    same memory, so the two never go out of sync and no copy is made.
    """

    def __init__(self, max_requests: int, max_context_len: int):
        self.max_requests = max_requests
        self.max_context_len = max_context_len
        self.table_np = np.zeros((max_requests, max_context_len), dtype=np.int64)
        self.table = torch.from_numpy(self.table_np)
        self.rows = SlotAllocator(max_requests)

    def alloc(self) -> int:
        """Claim a free row for a new request."""
        return int(self.rows.alloc(1)[0])

    def free(self, row: int) -> None:
        self.rows.free([row])

    def write(self, row: int, start: int, slots: np.ndarray | list[int]) -> None:
        """Record ``slots`` as the KV slots of tokens ``start ..`` of request ``row``."""
        slots = np.asarray(slots, dtype=np.int64)
        end = start + slots.size
        if end > self.max_context_len:
            raise ValueError(f"request row {row} would hold {end} tokens > {self.max_context_len}")
        self.table_np[row, start:end] = slots

    def read(self, row: int, start: int, end: int) -> np.ndarray:
        return self.table_np[row, start:end]

    @property
    def num_free(self) -> int:
        return self.rows.num_free

"""Token-slot -> K/V memory: one K and one V buffer per layer, indexed by slot id."""

from __future__ import annotations

import numpy as np
import torch

from smallm.runtime.cache.slot_allocator import SlotAllocator


class KVPool:
    """KV memory for ``capacity`` tokens across all layers.

    Slot 0 is never handed out: it is the padding target of gathers, so padded positions in a
    batch read finite zeros rather than garbage. Usable slots are ``1 .. capacity``.
    """

    def __init__(
        self,
        capacity: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.capacity = capacity
        self.num_layers = num_layers
        self.dtype = dtype
        # One allocation keeps the pool contiguous and its size exact. Zeros (not empty) so the
        # padding slot and never-written slots can't inject NaN through a 0 attention weight.
        self.buffer = torch.zeros(
            num_layers, 2, capacity + 1, num_kv_heads, head_dim, dtype=dtype, device=device
        )
        self.allocator = SlotAllocator(capacity, first=1)

    def k(self, layer: int) -> torch.Tensor:
        return self.buffer[layer, 0]

    def v(self, layer: int) -> torch.Tensor:
        return self.buffer[layer, 1]

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write new keys/values [T, Hk, D] into ``slots`` [T] of ``layer``."""
        self.buffer[layer, 0].index_copy_(0, slots, k.to(self.dtype))
        self.buffer[layer, 1].index_copy_(0, slots, v.to(self.dtype))

    def alloc(self, n: int, contiguous: bool = False) -> np.ndarray:
        """``n`` free slots; ``contiguous``: in as few runs as possible (see
        ``SlotAllocator.alloc_contiguous``), for KV that another process will copy."""
        if contiguous:
            return self.allocator.alloc_contiguous(n)
        return self.allocator.alloc(n)

    def free(self, slots: np.ndarray | list[int]) -> None:
        self.allocator.free(slots)

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    @property
    def num_used(self) -> int:
        return self.allocator.num_used

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

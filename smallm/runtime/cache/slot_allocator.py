"""A free-list of integer slots with exact accounting, in numpy so it never touches torch."""

from __future__ import annotations

import numpy as np


class OutOfSlots(RuntimeError):
    """Raised when an allocation asks for more slots than are free."""


class SlotAllocator:
    """Hands out distinct slot ids from ``first .. first + capacity - 1``.

    ``alloc`` and ``free`` cost O(n) in the number of slots moved, never O(capacity).
    Invariant: ``num_free + num_used == capacity`` and no slot is handed out twice.
    """

    def __init__(self, capacity: int, first: int = 0):
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.first = first
        # A stack of free ids; the top `_num_free` entries are free. Popping from the end
        # hands out low ids first, which keeps recently freed memory warm.
        self._stack = np.arange(first + capacity - 1, first - 1, -1, dtype=np.int64)
        self._num_free = capacity
        self._in_use = np.zeros(first + capacity, dtype=bool)

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.capacity - self._num_free

    def alloc(self, n: int) -> np.ndarray:
        """Return ``n`` free slot ids (a fresh int64 array); raise OutOfSlots if fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} slots")
        if n > self._num_free:
            raise OutOfSlots(f"asked for {n} slots, {self._num_free} free")
        top = self._num_free
        slots = self._stack[top - n : top][::-1].copy()
        self._num_free = top - n
        self._in_use[slots] = True
        return slots

    def alloc_contiguous(self, n: int) -> np.ndarray:
        """Like ``alloc``, but ``n`` slots in as few runs of consecutive ids as the free set
        allows: the lowest run that holds all ``n`` if there is one, else the longest runs
        first, each in order. For memory that moves as byte ranges (a disaggregated server's
        KV: one range per run instead of one per token). O(capacity), not O(n); it also
        leaves the free stack sorted, so later plain allocations come out in runs too."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} slots")
        if n > self._num_free:
            raise OutOfSlots(f"asked for {n} slots, {self._num_free} free")
        free = np.flatnonzero(~self._in_use[self.first :]) + self.first  # ascending
        breaks = np.flatnonzero(np.diff(free) != 1) + 1
        starts = np.concatenate(([0], breaks))
        lengths = np.diff(np.concatenate((starts, [free.size])))
        fits = np.flatnonzero(lengths >= n)
        take = np.zeros(free.size, dtype=bool)
        if fits.size:
            start = starts[fits[0]]
            take[start : start + n] = True
        else:
            left = n
            for k in np.argsort(-lengths, kind="stable"):
                m = min(int(lengths[k]), left)
                take[starts[k] : starts[k] + m] = True
                left -= m
                if left == 0:
                    break
        slots = free[take]
        rest = free[~take]
        self._stack[: rest.size] = rest[::-1]  # popping from the end: low ids first
        self._num_free = rest.size
        self._in_use[slots] = True
        return slots

    def free(self, slots: np.ndarray | list[int]) -> None:
        """Give slots back. Freeing a slot that is not in use is a bug and raises."""
        slots = np.asarray(slots, dtype=np.int64)
        if slots.size == 0:
            return
        if not self._in_use[slots].all() or np.unique(slots).size != slots.size:
            raise ValueError("freeing slots that are not allocated (double free?)")
        self._in_use[slots] = False
        top = self._num_free
        self._stack[top : top + slots.size] = slots
        self._num_free = top + slots.size

    def is_used(self, slot: int) -> bool:
        return bool(self._in_use[slot])

"""Order of the waiting queue (``--schedule-policy``)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from smallm.runtime.cache.radix_cache import PrefixCache, RadixCache
from smallm.runtime.scheduler.request import Req

# Matching every waiting request against the tree each step costs O(queue * prompt); past
# this many, longest-prefix-first falls back to arrival order.
LPM_MAX_QUEUE = 128


def order_waiting(waiting: list[Req], policy: str, cache: PrefixCache) -> list[Req]:
    """``fcfs``: arrival order. ``lpm``: longest cached prefix first (ties by arrival), so
    requests that share what is in the cache run while it is there."""
    if policy == "fcfs" or len(waiting) > LPM_MAX_QUEUE:
        return sorted(waiting, key=lambda r: r.arrival)
    matched = {id(r): len(cache.match_prefix(r.all_ids, count=False).slots) for r in waiting}
    return sorted(waiting, key=lambda r: (-matched[id(r)], r.arrival))


# Sharing fewer uncached tokens than this with an in-flight prefill is not worth waiting for.
MIN_SHARED_PREFIX = 32


class InFlightPrefixes:
    """Prompts being prefilled right now, to spot waiting requests that will soon find their
    prefix in the cache. A scratch radix tree whose "slots" are dummies; nothing is freed."""

    def __init__(self, prompts: Iterable[list[int]]):
        self._tree = RadixCache(free_fn=lambda _slots: None)
        for ids in prompts:
            self.add(ids)

    def add(self, ids: list[int]) -> None:
        self._tree.insert(ids, np.zeros(len(ids), dtype=np.int64))

    def shares_uncached(self, ids: list[int], cache: PrefixCache) -> bool:
        if self._tree.total_size == 0:
            return False
        pending = len(self._tree.match_prefix(ids, count=False).slots)
        if pending < MIN_SHARED_PREFIX:
            return False
        return pending - len(cache.match_prefix(ids, count=False).slots) >= MIN_SHARED_PREFIX

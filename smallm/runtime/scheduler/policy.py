"""Order of the waiting queue (``--schedule-policy``)."""

from __future__ import annotations

from smallm.runtime.cache.radix_cache import PrefixCache
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

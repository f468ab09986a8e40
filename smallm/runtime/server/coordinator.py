"""The data-parallel coordinator: which scheduler replica (``--dp-size N``) serves a request.

It lives in the front end (one per server, called from the event loop, never blocking) and
decides from what the front end knows at the moment of placement:

- the **load** of each replica: the requests the front end has sent it that have not finished
  (exactly what the replica counts as running + waiting, without the half-second lag of its
  `SchedulerStats`);
- for ``cache_aware``, an **approximate prefix index** per replica: the chained hashes of the
  full pages of every prompt (and finished completion) it was given, kept in LRU order and
  bounded by the replica's KV capacity, like the replica's own radix cache (which also evicts
  least-recently-used leaves). It is approximate on purpose: the replica's real cache may have
  evicted a page the index still lists; the cost of that is one placement that finds less
  cache than hoped, never a wrong answer.

Methods (``--load-balance-method``):

- ``round_robin``: the next live replica in turn.
- ``shortest_queue``: the live replica with the fewest unfinished requests (ties: lowest rank).
- ``cache_aware`` (default): the replica whose index holds the longest prefix of the prompt,
  unless it is *overloaded*: busier than the idlest live replica by more than `BALANCE_ABS`
  requests and by more than `BALANCE_REL` times. Then, or when no replica holds any page of the
  prompt, the shortest queue (ties: the replica with the least indexed, so new prefixes spread). (sglang-router's cache_aware policy makes the same trade with an
  approximate tree of its own.)

An explicit ``data_parallel_rank`` on a request wins over every method.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

# Prompts are indexed in pages of this many tokens: a prefix shorter than a page is too short
# to be worth routing for, and hashing pages (not tokens) keeps the index small.
ROUTING_PAGE_TOKENS = 16
# cache_aware gives up a cache hit when the replica holding it is this much busier than the
# idlest one (both conditions): the hit saves a prefill, the queue costs every request in it.
BALANCE_ABS = 8
BALANCE_REL = 1.5


class PlacementError(ValueError):
    """A request names a replica that does not exist or is dead (HTTP 400 / 503)."""


def page_hashes(ids: Sequence[int], page: int = ROUTING_PAGE_TOKENS) -> list[int]:
    """Chained hashes of the full pages of ``ids``: entry k identifies the whole prefix
    ``ids[: (k + 1) * page]``, so two prompts share entry k exactly when they share it."""
    out: list[int] = []
    h = 0
    for start in range(0, len(ids) - page + 1, page):
        h = hash((h, tuple(ids[start : start + page])))
        out.append(h)
    return out


@dataclass
class _Replica:
    rank: int
    capacity_pages: int
    alive: bool = True
    load: int = 0  # unfinished requests placed here
    pages: OrderedDict[int, None] = field(default_factory=OrderedDict)  # LRU: oldest first

    def matched(self, hashes: list[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self.pages:
                break
            n += 1
        return n

    def remember(self, hashes: list[int]) -> None:
        for h in hashes:
            if h in self.pages:
                self.pages.move_to_end(h)
            else:
                self.pages[h] = None
        while len(self.pages) > self.capacity_pages:
            self.pages.popitem(last=False)


class DataParallelCoordinator:
    """Places requests on replicas and tracks their load (see the module docstring)."""

    def __init__(
        self,
        dp_size: int,
        method: str = "cache_aware",
        capacity_tokens: int = 0,
        route_by_room: bool = False,
    ):
        if dp_size < 1:
            raise ValueError("dp_size must be >= 1")
        if method not in ("round_robin", "shortest_queue", "cache_aware"):
            raise ValueError(f"unknown load balance method {method!r}")
        self.method = method
        # A prefill server's replica for a request with a bootstrap room is room % dp_size:
        # the decode side looks the room's prefill rank up by the same rule (SGLang's).
        self.route_by_room = route_by_room
        pages = max(capacity_tokens // ROUTING_PAGE_TOKENS, 1)
        self.replicas = [_Replica(r, pages) for r in range(dp_size)]
        self._next = 0  # round_robin's turn
        self.placed = [0] * dp_size  # requests placed on each replica, ever (for stats/tests)

    @property
    def dp_size(self) -> int:
        return len(self.replicas)

    @property
    def live_ranks(self) -> list[int]:
        return [r.rank for r in self.replicas if r.alive]

    def place(
        self, input_ids: Sequence[int], rank: int | None = None, room: int | None = None
    ) -> int:
        """The replica for a request (and count it as started there). Raises PlacementError
        for an explicit rank that is out of range or dead, or when no replica is alive.
        ``room``: the request's bootstrap room (decides on a prefill server)."""
        live = [r for r in self.replicas if r.alive]
        if not live:
            raise PlacementError("no data-parallel replica is alive")
        if rank is None and room is not None and self.route_by_room:
            rank = room % self.dp_size
        hashes: list[int] = []
        if self.method == "cache_aware":
            hashes = page_hashes(input_ids)
        if rank is not None:
            if not 0 <= rank < self.dp_size:
                raise PlacementError(
                    f"data_parallel_rank must be in [0, {self.dp_size}), got {rank}"
                )
            if not self.replicas[rank].alive:
                raise PlacementError(f"data-parallel replica {rank} is not alive")
            chosen = self.replicas[rank]
        elif self.method == "round_robin":
            chosen = self._round_robin()
        elif self.method == "shortest_queue":
            chosen = min(live, key=lambda r: r.load)
        else:
            chosen = self._cache_aware(live, hashes)
        if hashes:
            chosen.remember(hashes)
        chosen.load += 1
        self.placed[chosen.rank] += 1
        return chosen.rank

    def _round_robin(self) -> _Replica:
        for _ in range(self.dp_size):
            r = self.replicas[self._next % self.dp_size]
            self._next += 1
            if r.alive:
                return r
        raise PlacementError("no data-parallel replica is alive")  # place() checked; for mypy

    def _cache_aware(self, live: list[_Replica], hashes: list[int]) -> _Replica:
        # A prompt no replica has seen goes where the fewest requests wait and, among those,
        # where the least is cached: new prefixes spread over the replicas' memories.
        idlest = min(live, key=lambda r: (r.load, len(r.pages)))
        if not hashes:
            return idlest
        # Longest match first; among equal matches the less loaded.
        best = max(live, key=lambda r: (r.matched(hashes), -r.load))
        if best.matched(hashes) == 0:
            return idlest
        overloaded = best.load - idlest.load > BALANCE_ABS and best.load > BALANCE_REL * idlest.load
        return idlest if overloaded else best

    def finished(self, rank: int, ids: Sequence[int] | None = None) -> None:
        """A request placed on ``rank`` ended; ``ids`` (prompt + output) are cached there now."""
        r = self.replicas[rank]
        r.load = max(r.load - 1, 0)
        if ids is not None and self.method == "cache_aware" and r.alive:
            r.remember(page_hashes(ids))

    def mark_dead(self, rank: int) -> None:
        r = self.replicas[rank]
        r.alive = False
        r.load = 0
        r.pages.clear()

    def clear_cache(self) -> None:
        """Every replica's cache was flushed."""
        for r in self.replicas:
            r.pages.clear()

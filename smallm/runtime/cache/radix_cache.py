"""Prefix caches: map cached token-id prefixes to the KV-pool slots that hold their keys/values.

``RadixCache`` is a radix tree over token ids, so a request reuses the KV of the longest prefix
it shares with anything cached (system prompts, few-shot examples, chat history, forks).
``NoPrefixCache`` is the same interface with no reuse (``--disable-radix-cache``).

Ownership: every allocated KV slot belongs to exactly one of the tree (a node's ``value``) or one
running request privately. The tree frees its slots through ``free_fn`` when it evicts or
flushes; it never frees a slot it does not own.
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

FreeFn = Callable[[np.ndarray], None]
Clock = Callable[[], float]


class KVEventListener(Protocol):
    """Told which full pages of ``page_size`` tokens the tree stores and removes (KV events).

    Page ``k`` of a cached sequence is its tokens ``[kP, (k+1)P)``; it belongs to the node that
    holds its last token (``node.pages``: the handles of the pages ending inside that node),
    so evicting a leaf removes exactly the pages that lose a token. The handles are opaque to
    the tree (``smallm.runtime.server.kv_events.RadixEventRecorder`` is the implementation).
    """

    page_size: int

    def on_stored(self, parent: Any, token_ids: np.ndarray) -> list[Any]:
        """Pages ``token_ids`` (whole pages) are now cached after page ``parent`` (None: they
        start the sequence); return one handle per page."""

    def on_removed(self, pages: list[Any]) -> None:
        """These pages' handles are no longer cached."""

    def on_cleared(self) -> None:
        """The whole cache was flushed."""


# Edges at most this long are compared in Python: a numpy call costs microseconds of overhead,
# which would dominate walks down deep trees of short edges.
_SHORT_EDGE = 16
_EMPTY = np.empty(0, dtype=np.int64)


class TreeNode:
    """One edge of the radix tree: the tokens ``key`` and the KV slots ``value`` that hold them.

    ``end`` is the prefix length up to and including this edge (0 for the root). ``lock_ref``
    counts the requests whose locked node is this one or a descendant; a locked node is never
    evicted. ``parent`` is ``None`` for the root and for nodes that were evicted or flushed.
    """

    __slots__ = ("children", "end", "key", "last_access", "lock_ref", "pages", "parent", "value")

    def __init__(
        self,
        key: np.ndarray,
        value: np.ndarray,
        parent: TreeNode | None,
        end: int,
        last_access: float,
        lock_ref: int = 0,
    ):
        self.key = key
        self.value = value
        self.parent = parent
        self.end = end
        self.last_access = last_access
        self.lock_ref = lock_ref
        self.children: dict[int, TreeNode] = {}
        # KV events only: handles of the full pages whose last token is in this edge.
        self.pages: list[Any] | None = None

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def __repr__(self) -> str:
        return (
            f"TreeNode(key={_short(self.key)}, slots={_short(self.value)}, end={self.end}, "
            f"lock_ref={self.lock_ref}, last_access={self.last_access})"
        )


@dataclass
class MatchResult:
    """The longest cached prefix of a query.

    ``slots`` are the KV slots of the matched tokens (a fresh array; ``len(slots)`` is the
    match length). ``node`` is the deepest node covering the match (the root when nothing
    matched): lock it to keep the prefix from being evicted while a request uses it.
    """

    slots: np.ndarray
    node: TreeNode


class PrefixCache(ABC):
    """What the scheduler needs from a prefix cache; see ``RadixCache`` and ``NoPrefixCache``.

    Contract shared by both:

    - ``match_prefix(tokens)`` returns the longest cached prefix and the node to lock. The match
      may cover the whole query; a scheduler that needs logits for the last token must match
      ``tokens[:-1]`` itself.
    - ``lock(node)`` / ``unlock(node)`` pin / release the prefix ending at ``node``. The root
      may be locked and unlocked freely (a no-op), so callers can treat "no match" uniformly.
    - ``cache_request`` is the ownership-safe way to hand a request's KV to the cache: after it,
      every slot the request had is either owned by the cache, freed, or (unfinished) listed in
      the returned match as the cache's slots that the request now holds locked.
    - Hit-rate statistics: every counted ``match_prefix`` adds the matched length to
      ``hit_tokens`` and the query length to ``queried_tokens``.
    """

    def __init__(self) -> None:
        self.hit_tokens = 0
        self.queried_tokens = 0

    @abstractmethod
    def match_prefix(self, token_ids: Sequence[int], count: bool = True) -> MatchResult:
        """Return the longest cached prefix of ``token_ids``; ``count=False`` skips the stats."""

    @abstractmethod
    def lock(self, node: TreeNode) -> None:
        """Add a lock reference to ``node`` and its ancestors so none of them is evicted."""

    @abstractmethod
    def unlock(self, node: TreeNode) -> None:
        """Drop a lock reference taken by ``lock``; unlocking an unlocked node raises."""

    @abstractmethod
    def insert(self, token_ids: Sequence[int], slots: Sequence[int] | np.ndarray) -> int:
        """Cache ``token_ids -> slots``; return how many leading tokens were already cached."""

    @abstractmethod
    def cache_request(
        self,
        token_ids: Sequence[int],
        slots: Sequence[int] | np.ndarray,
        locked_node: TreeNode,
        finished: bool,
    ) -> MatchResult | None:
        """Hand a request's KV to the cache (see the implementations for ownership)."""

    @abstractmethod
    def set_event_listener(self, listener: KVEventListener | None) -> None:
        """Report the full pages the cache stores and removes to ``listener`` (KV events)."""

    @abstractmethod
    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` unlocked slots if possible; return how many were freed."""

    @abstractmethod
    def flush(self) -> bool:
        """Free everything if nothing is locked and return True; otherwise change nothing."""

    @property
    @abstractmethod
    def total_size(self) -> int:
        """Tokens (= slots) owned by the cache."""

    @property
    @abstractmethod
    def evictable_size(self) -> int:
        """Tokens in unlocked nodes."""

    @property
    @abstractmethod
    def protected_size(self) -> int:
        """Tokens in locked nodes; ``evictable_size + protected_size == total_size``."""

    def hit_rate(self) -> float:
        """Fraction of queried tokens found in the cache (0.0 before any query)."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def reset_stats(self) -> None:
        self.hit_tokens = 0
        self.queried_tokens = 0

    def _count(self, hit: int, queried: int) -> None:
        self.hit_tokens += hit
        self.queried_tokens += queried


class RadixCache(PrefixCache):
    """A radix tree from token-id prefixes to KV slots, evicting unlocked leaves LRU-first.

    ``free_fn`` receives the slots the tree gives up (evict, flush, duplicates in
    ``cache_request``). ``clock`` stamps accesses for LRU; the default is a counter that ticks
    once per ``match_prefix`` / ``insert``, which keeps tests deterministic.
    """

    def __init__(self, free_fn: FreeFn, clock: Clock | None = None):
        super().__init__()
        self._free_fn = free_fn
        self._clock: Clock = clock if clock is not None else itertools.count(1).__next__
        self._root = TreeNode(_EMPTY, _EMPTY, parent=None, end=0, last_access=0)
        self._evictable = 0
        self._protected = 0
        self._num_nodes = 0  # excluding the root
        # Min-heap of (last_access, tiebreak, node) with lazy deletion: an entry is acted on only
        # if the node is still an attached, unlocked leaf stamped with that same time. Every
        # evictable leaf has at least one valid entry (pushed when it became a leaf, was touched,
        # or was unlocked).
        self._heap: list[tuple[float, int, TreeNode]] = []
        self._tiebreak = itertools.count()
        # None unless KV events are on: then every branch that reports pages is skipped.
        self._events: KVEventListener | None = None

    def set_event_listener(self, listener: KVEventListener | None) -> None:
        """Report full pages stored / removed / flushed to ``listener`` from now on.

        Only while the cache is empty: pages cached before would never be announced.
        """
        if self._num_nodes:
            raise RuntimeError("set the KV event listener before anything is cached")
        self._events = listener

    # --- sizes -------------------------------------------------------------------------------

    @property
    def root(self) -> TreeNode:
        return self._root

    @property
    def total_size(self) -> int:
        return self._evictable + self._protected

    @property
    def evictable_size(self) -> int:
        return self._evictable

    @property
    def protected_size(self) -> int:
        return self._protected

    @property
    def num_nodes(self) -> int:
        """Nodes in the tree, not counting the root."""
        return self._num_nodes

    # --- lookup and insertion ----------------------------------------------------------------

    def match_prefix(self, token_ids: Sequence[int], count: bool = True) -> MatchResult:
        """Longest cached prefix of ``token_ids``.

        If the match ends inside an edge, that node is split so ``node`` ends exactly at the
        match. Every node on the matched path is stamped with the current time. The returned
        slots still belong to the tree: lock ``node`` before relying on them.
        """
        tokens = _as_int64(token_ids)
        path = self._walk(tokens, self._clock())
        if count:
            self._count(path[-1].end, len(tokens))
        node = path[-1]
        self._touch_leaf(node)
        slots = np.concatenate([n.value for n in path[1:]]) if len(path) > 1 else _EMPTY.copy()
        return MatchResult(slots=slots, node=node)

    def insert(self, token_ids: Sequence[int], slots: Sequence[int] | np.ndarray) -> int:
        """Cache the prefix ``token_ids -> slots`` (equal lengths) and return ``existing``.

        ``existing`` is how many leading tokens were already cached before this call. The tree
        takes ownership of ``slots[existing:]`` only; ``slots[:existing]`` stay with the caller
        (either they are the tree's own, obtained from ``match_prefix``, or they are duplicates
        the caller must free). Cached tokens keep their original slots.
        """
        tokens = _as_int64(token_ids)
        values = _as_int64(slots)
        if len(tokens) != len(values):
            raise ValueError(f"{len(tokens)} tokens but {len(values)} slots")
        if len(tokens) == 0:
            return 0
        now = self._clock()
        node = self._walk(tokens, now)[-1]
        existing = node.end
        if existing < len(tokens):
            # Copies: the caller's array may be a row of the request->token table, reused later.
            leaf = TreeNode(
                tokens[existing:].copy(),
                values[existing:].copy(),
                parent=node,
                end=len(tokens),
                last_access=now,
            )
            node.children[int(tokens[existing])] = leaf
            self._num_nodes += 1
            self._evictable += len(leaf.key)
            if self._events is not None:
                self._store_pages(node, leaf, tokens)
            node = leaf
        self._touch_leaf(node)
        return existing

    def _store_pages(self, attach: TreeNode, leaf: TreeNode, tokens: np.ndarray) -> None:
        """Announce the full pages that end inside the new ``leaf`` (hung under ``attach``)."""
        events = self._events
        assert events is not None
        p = events.page_size
        first, last = attach.end // p, leaf.end // p  # pages first..last-1 end in the leaf
        if last <= first:
            return
        parent = None
        if first > 0:
            # Page first-1 ends at first*P <= attach.end: it is the last page of the deepest
            # node on the path that has pages (the nodes below it hold no page end).
            node = attach
            while not node.pages:
                node = node.parent  # type: ignore[assignment]
            parent = node.pages[-1]  # type: ignore[index]
        leaf.pages = events.on_stored(parent, tokens[first * p : last * p])

    def _walk(self, tokens: np.ndarray, now: float) -> list[TreeNode]:
        """Follow ``tokens`` from the root, splitting the last edge if the match ends inside it.

        Returns the path root .. deepest matched node, each stamped with ``now``.
        """
        node = self._root
        path = [node]
        pos, n = 0, len(tokens)
        token_list: list[int] | None = None  # built lazily for short-edge comparisons
        while pos < n:
            child = node.children.get(int(tokens[pos]))
            if child is None:
                break
            edge = len(child.key)
            if edge == 1:
                m = 1  # the dict lookup already matched the first token
            elif edge <= _SHORT_EDGE:
                if token_list is None:
                    token_list = tokens.tolist()
                m = _common_prefix_list(child.key.tolist(), token_list, pos)
            else:
                m = _common_prefix_np(child.key, tokens[pos:])
            if m < edge:
                child = self._split(child, m)
            child.last_access = now
            path.append(child)
            node = child
            pos += m
            if m < edge:
                break
        return path

    def _split(self, child: TreeNode, m: int) -> TreeNode:
        """Cut ``child``'s edge after ``m`` tokens; return the new node holding the first part.

        ``child`` keeps its identity (locks and heap entries refer to it) and its end; the new
        parent inherits its lock_ref, since every lock through ``child`` also passes through the
        new parent, and its timestamp. Sizes do not change.
        """
        parent = child.parent
        assert parent is not None and 0 < m < len(child.key)
        # Copy the head (O(m), within the query's cost); the tail stays a view of the old buffer.
        head = TreeNode(
            child.key[:m].copy(),
            child.value[:m].copy(),
            parent=parent,
            end=child.end - len(child.key) + m,
            last_access=child.last_access,
            lock_ref=child.lock_ref,
        )
        parent.children[int(child.key[0])] = head
        if child.pages:
            # Pages ending in the first m tokens move to the head.
            p = self._events.page_size  # type: ignore[union-attr]
            start = child.end - len(child.key)
            n = (start + m) // p - start // p
            head.pages, child.pages = child.pages[:n] or None, child.pages[n:] or None
        child.key = child.key[m:]
        child.value = child.value[m:]
        child.parent = head
        head.children[int(child.key[0])] = child
        self._num_nodes += 1
        return head

    # --- locking -----------------------------------------------------------------------------

    def lock(self, node: TreeNode) -> None:
        """+1 lock reference on ``node`` and every ancestor (the root is excluded)."""
        self._check_attached(node)
        while node is not self._root:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: TreeNode) -> None:
        """-1 lock reference on ``node`` and its ancestors; raises if ``node`` is not locked."""
        if node is self._root:
            return
        self._check_attached(node)
        # Ancestors always hold at least the node's count, so checking the node suffices.
        if node.lock_ref <= 0:
            raise RuntimeError(f"unlock of a node that is not locked: {node!r}")
        start = node
        while node is not self._root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected -= len(node.key)
                self._evictable += len(node.key)
            node = node.parent  # type: ignore[assignment]
        # Only the starting node can be a leaf (ancestors have it as a descendant).
        if start.lock_ref == 0 and start.is_leaf:
            self._push(start)

    def _check_attached(self, node: TreeNode) -> None:
        if node is not self._root and node.parent is None:
            raise ValueError(f"node is no longer in the tree (evicted or flushed): {node!r}")

    # --- handing over a request's KV ---------------------------------------------------------

    def cache_request(
        self,
        token_ids: Sequence[int],
        slots: Sequence[int] | np.ndarray,
        locked_node: TreeNode,
        finished: bool,
    ) -> MatchResult | None:
        """Insert a request's KV and settle ownership of its slots.

        ``token_ids`` / ``slots`` are everything the request has KV for; it holds a lock on
        ``locked_node``, whose prefix ``slots[:locked_node.end]`` is already the tree's, and
        the rest are its private slots. Private slots for tokens that another request cached
        meanwhile are duplicates and are freed; the others pass to the tree.

        - ``finished``: release the lock and return None; the tree owns the whole prefix.
        - unfinished: lock the prefix's new deepest node, release the old one, and return the
          match, whose ``slots`` (the tree's, for all of ``token_ids``) should replace the
          request's row in the request->token table.
        """
        tokens = _as_int64(token_ids)
        values = _as_int64(slots)
        locked_len = locked_node.end
        if locked_len > len(tokens):
            raise ValueError(f"locked prefix of {locked_len} tokens > {len(tokens)} tokens")
        existing = self.insert(tokens, values)
        # The locked prefix was in the tree, so insert found at least that much.
        assert existing >= locked_len, (existing, locked_len)
        if existing > locked_len:
            self._free_fn(values[locked_len:existing].copy())
        if finished:
            self.unlock(locked_node)
            return None
        match = self.match_prefix(tokens, count=False)
        self.lock(match.node)
        self.unlock(locked_node)
        return match

    # --- eviction ----------------------------------------------------------------------------

    def evict(self, num_tokens: int) -> int:
        """Remove unlocked leaves, least recently used first, until ``num_tokens`` are freed.

        A parent whose last child goes becomes a candidate itself. Whole nodes are removed, so
        more than ``num_tokens`` may be freed; fewer if not enough is evictable. The freed slots
        go to ``free_fn`` in one call.
        """
        freed: list[np.ndarray] = []
        removed_pages: list[Any] = []
        total = 0
        # No local alias of the heap: _push may rebuild it.
        while total < num_tokens and self._heap:
            stamp, _, node = heapq.heappop(self._heap)
            if not self._evictable_leaf(node, stamp):
                continue
            parent = node.parent
            assert parent is not None
            del parent.children[int(node.key[0])]
            node.parent = None
            self._num_nodes -= 1
            self._evictable -= len(node.key)
            total += len(node.key)
            freed.append(node.value)
            if node.pages:
                removed_pages.extend(node.pages)
            if parent is not self._root and parent.is_leaf and parent.lock_ref == 0:
                self._push(parent)
        if freed:
            self._free_fn(np.concatenate(freed))
        if removed_pages:
            self._events.on_removed(removed_pages)  # type: ignore[union-attr]
        return total

    def _evictable_leaf(self, node: TreeNode, stamp: float) -> bool:
        return (
            node.parent is not None
            and not node.children
            and node.lock_ref == 0
            and node.last_access == stamp
        )

    def _touch_leaf(self, node: TreeNode) -> None:
        """Re-queue ``node`` if it is an evictable leaf whose timestamp just changed."""
        if node is not self._root and node.is_leaf and node.lock_ref == 0:
            self._push(node)

    def _push(self, node: TreeNode) -> None:
        heapq.heappush(self._heap, (node.last_access, next(self._tiebreak), node))
        # Stale entries pile up when the same leaf is matched again and again: rebuild the
        # heap from the live leaves once it is much larger than the tree.
        if len(self._heap) > 2 * self._num_nodes + 1024:
            self._heap = [
                (n.last_access, next(self._tiebreak), n)
                for n in self._nodes()
                if n.is_leaf and n.lock_ref == 0
            ]
            heapq.heapify(self._heap)

    def flush(self) -> bool:
        """Free every cached slot if no node is locked; otherwise change nothing.

        Returns whether the cache was flushed. Hit-rate statistics are kept (``reset_stats``).
        """
        if self._protected > 0:
            return False
        nodes = list(self._nodes())
        for node in nodes:
            node.parent = None  # stale handles now fail loudly in lock/unlock
        if nodes:
            self._free_fn(np.concatenate([n.value for n in nodes]))
        self._root.children = {}
        self._evictable = 0
        self._num_nodes = 0
        self._heap = []
        if self._events is not None:
            self._events.on_cleared()
        return True

    # --- debugging ---------------------------------------------------------------------------

    def _nodes(self) -> Iterator[TreeNode]:
        """Every node except the root, parents before children (iterative: trees can be deep)."""
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def pretty(self) -> str:
        """The tree, one node per line, indented by depth."""
        lines = [repr(self)]
        stack = [(child, 1) for child in reversed(list(self._root.children.values()))]
        while stack:
            node, depth = stack.pop()
            lines.append(
                f"{'  ' * depth}{_short(node.key)} -> {_short(node.value)}"
                f"  lock={node.lock_ref} t={node.last_access}"
            )
            stack.extend((c, depth + 1) for c in reversed(list(node.children.values())))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"RadixCache(total={self.total_size}, evictable={self._evictable}, "
            f"protected={self._protected}, nodes={self._num_nodes})"
        )


class NoPrefixCache(PrefixCache):
    """The prefix-cache interface with no reuse (``--disable-radix-cache``).

    Nothing is ever cached: ``match_prefix`` returns an empty match at a root sentinel,
    ``insert`` takes ownership of nothing and returns 0 (so, unlike ``RadixCache.insert``, the
    caller keeps all the slots: use ``cache_request`` for code that works with both), sizes are
    0, ``evict`` frees nothing and ``flush`` always succeeds. ``cache_request`` keeps the shared
    ownership contract: a finished request's slots (all private) are freed; an unfinished one
    keeps its slots and stays at the root.
    """

    def __init__(self, free_fn: FreeFn):
        super().__init__()
        self._free_fn = free_fn
        self._root = TreeNode(_EMPTY, _EMPTY, parent=None, end=0, last_access=0)

    @property
    def root(self) -> TreeNode:
        return self._root

    def match_prefix(self, token_ids: Sequence[int], count: bool = True) -> MatchResult:
        """An empty match at the root; counts the query as a miss."""
        if count:
            self._count(0, len(token_ids))
        return MatchResult(slots=_EMPTY.copy(), node=self._root)

    def lock(self, node: TreeNode) -> None:
        """No-op on the root sentinel (the only node this cache hands out)."""
        self._check_root(node)

    def unlock(self, node: TreeNode) -> None:
        """No-op on the root sentinel."""
        self._check_root(node)

    def insert(self, token_ids: Sequence[int], slots: Sequence[int] | np.ndarray) -> int:
        """Cache nothing and return 0; the caller keeps ownership of every slot."""
        if len(token_ids) != len(slots):
            raise ValueError(f"{len(token_ids)} tokens but {len(slots)} slots")
        return 0

    def cache_request(
        self,
        token_ids: Sequence[int],
        slots: Sequence[int] | np.ndarray,
        locked_node: TreeNode,
        finished: bool,
    ) -> MatchResult | None:
        """Finished: free all the request's slots (all private) and return None. Unfinished:
        return ``MatchResult(slots unchanged, root)``; the request keeps its private slots."""
        self._check_root(locked_node)
        values = _as_int64(slots)
        if len(token_ids) != len(values):
            raise ValueError(f"{len(token_ids)} tokens but {len(values)} slots")
        if finished:
            if len(values):
                self._free_fn(values.copy())
            return None
        return MatchResult(slots=values.copy(), node=self._root)

    def set_event_listener(self, listener: KVEventListener | None) -> None:
        """Nothing is ever cached, so there is nothing to report."""

    def evict(self, num_tokens: int) -> int:
        return 0

    def flush(self) -> bool:
        return True

    @property
    def total_size(self) -> int:
        return 0

    @property
    def evictable_size(self) -> int:
        return 0

    @property
    def protected_size(self) -> int:
        return 0

    def _check_root(self, node: TreeNode) -> None:
        if node is not self._root:
            raise ValueError("NoPrefixCache only hands out its root sentinel")

    def __repr__(self) -> str:
        return "NoPrefixCache()"


def create_prefix_cache(
    disable: bool, free_fn: FreeFn, events: KVEventListener | None = None
) -> PrefixCache:
    """``NoPrefixCache`` when the radix cache is disabled, else a ``RadixCache``; ``events``
    (KV events) is told the pages the cache stores and removes."""
    cache: PrefixCache = NoPrefixCache(free_fn) if disable else RadixCache(free_fn)
    cache.set_event_listener(events)
    return cache


def _as_int64(values: Sequence[int] | np.ndarray) -> np.ndarray:
    """A 1-D int64 view of ``values`` (no copy when it already is one)."""
    arr = np.asarray(values, dtype=np.int64)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    return arr


def _common_prefix_np(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def _common_prefix_list(edge: list[int], tokens: list[int], pos: int) -> int:
    """Length of the common prefix of ``edge`` and ``tokens[pos:]``."""
    n = min(len(edge), len(tokens) - pos)
    for i in range(1, n):  # edge[0] == tokens[pos]: the child was found by it
        if edge[i] != tokens[pos + i]:
            return i
    return n


def _short(arr: np.ndarray, limit: int = 8) -> str:
    items = arr[:limit].tolist()
    more = f" …(+{len(arr) - limit})" if len(arr) > limit else ""
    return f"{items}{more}"

"""Radix-tree prefix cache: matching, splitting, locking, LRU eviction and slot ownership."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from smallm.runtime.cache.radix_cache import (
    MatchResult,
    NoPrefixCache,
    PrefixCache,
    RadixCache,
    TreeNode,
    create_prefix_cache,
)
from smallm.runtime.cache.slot_allocator import SlotAllocator

# --- helpers ---------------------------------------------------------------------------------


def tree_map(cache: RadixCache) -> dict[tuple[int, ...], tuple[int, float, TreeNode]]:
    """Every cached prefix -> (slot of its last token, its node's last access, its node).

    Also checks the tree's structure on the way (parent links, child keys, node ends).
    """
    out: dict[tuple[int, ...], tuple[int, float, TreeNode]] = {}
    stack: list[tuple[TreeNode, tuple[int, ...]]] = [(cache.root, ())]
    nodes = 0
    while stack:
        node, prefix = stack.pop()
        for first, child in node.children.items():
            nodes += 1
            key, value = child.key.tolist(), child.value.tolist()
            assert child.parent is node
            assert len(key) == len(value) > 0
            assert key[0] == first
            assert child.end == len(prefix) + len(key)
            p = prefix
            for tok, slot in zip(key, value):
                p = (*p, tok)
                out[p] = (slot, child.last_access, child)
            stack.append((child, p))
    assert nodes == cache.num_nodes
    return out


def longest_cached(ref: dict[tuple[int, ...], int], tokens: list[int]) -> int:
    n = 0
    while n < len(tokens) and tuple(tokens[: n + 1]) in ref:
        n += 1
    return n


def path_slots(cache: RadixCache, node: TreeNode) -> list[int]:
    """Slots from the root down to ``node``, checking the node is still attached."""
    parts = []
    while node is not cache.root:
        parent = node.parent
        assert parent is not None, "locked node was evicted"
        assert parent.children[int(node.key[0])] is node, "locked node was detached"
        parts.append(node.value.tolist())
        node = parent
    return [s for part in reversed(parts) for s in part]


def make(capacity: int = 64, clock=None) -> tuple[SlotAllocator, RadixCache]:
    alloc = SlotAllocator(capacity)
    return alloc, RadixCache(alloc.free, clock=clock)


class ManualClock:
    def __init__(self) -> None:
        self.t = 0

    def __call__(self) -> int:
        return self.t


# --- unit tests ------------------------------------------------------------------------------


def test_split_on_partial_match():
    alloc, cache = make()
    slots = alloc.alloc(4)
    assert cache.insert([1, 2, 3, 4], slots) == 0
    assert cache.num_nodes == 1
    m = cache.match_prefix([1, 2, 9])
    assert m.slots.tolist() == slots[:2].tolist()
    assert m.node.end == 2 and m.node.key.tolist() == [1, 2]
    assert cache.num_nodes == 2
    (tail,) = m.node.children.values()
    assert tail.key.tolist() == [3, 4] and tail.value.tolist() == slots[2:].tolist()
    assert cache.match_prefix([1, 2, 3, 4, 5]).slots.tolist() == slots.tolist()
    assert cache.total_size == 4
    # Nothing matched: the root, and no split.
    m = cache.match_prefix([7])
    assert m.node is cache.root and m.slots.dtype == np.int64 and len(m.slots) == 0


def test_split_keeps_locks_and_sizes():
    _, cache = make()
    cache.insert([1, 2, 3, 4], np.arange(4))
    leaf = cache.match_prefix([1, 2, 3, 4]).node
    cache.lock(leaf)
    assert (cache.protected_size, cache.evictable_size) == (4, 0)
    head = cache.match_prefix([1, 2]).node
    assert head is not leaf and head.lock_ref == 1 and leaf.lock_ref == 1
    assert leaf.parent is head and leaf.end == 4
    assert (cache.protected_size, cache.evictable_size) == (4, 0)
    assert cache.evict(10) == 0
    cache.unlock(leaf)
    assert head.lock_ref == 0 and (cache.protected_size, cache.evictable_size) == (0, 4)


def test_insert_returns_existing_and_takes_only_new_slots():
    alloc, cache = make()
    a = alloc.alloc(3)
    assert cache.insert([1, 2, 3], a) == 0
    b = alloc.alloc(5)
    assert cache.insert([1, 2, 3, 4, 5], b) == 3
    alloc.free(b[:3])  # duplicates stay with the caller
    assert cache.total_size == 5
    assert cache.match_prefix([1, 2, 3, 4, 5]).slots.tolist() == [*a.tolist(), *b[3:].tolist()]
    assert cache.insert([1, 2], a[:2]) == 2  # already cached: takes nothing
    c = alloc.alloc(2)
    assert cache.insert([1, 7], c) == 1  # splits the [1, 2, 3] edge
    alloc.free(c[:1])
    assert cache.insert([], []) == 0
    assert cache.total_size == 6
    assert alloc.num_free + cache.total_size == alloc.capacity
    with pytest.raises(ValueError):
        cache.insert([1, 2], [1])


def test_insert_copies_the_callers_arrays():
    _, cache = make()
    tokens, slots = np.array([1, 2, 3]), np.array([10, 11, 12])
    cache.insert(tokens, slots)
    tokens[:] = 0
    slots[:] = 0
    assert cache.match_prefix([1, 2, 3]).slots.tolist() == [10, 11, 12]


def test_cache_request_frees_private_duplicates():
    alloc, cache = make()
    prompt = [1, 2, 3, 4]
    # Two requests start before either is cached: both compute the prompt privately.
    m_a, m_b = cache.match_prefix(prompt), cache.match_prefix(prompt)
    assert m_a.node is cache.root
    cache.lock(m_a.node)
    cache.lock(m_b.node)
    a = alloc.alloc(5)
    b = alloc.alloc(6)
    assert cache.cache_request([*prompt, 5], a, m_a.node, finished=True) is None
    assert cache.total_size == 5 and alloc.num_free == 64 - 11
    # B's first four slots duplicate A's: freed; its last two tokens pass to the tree.
    res = cache.cache_request([*prompt, 6, 7], b, m_b.node, finished=False)
    assert isinstance(res, MatchResult)
    assert res.slots.tolist() == [*a[:4].tolist(), *b[4:].tolist()]
    assert res.node.end == 6 and res.node.lock_ref == 1
    assert cache.total_size == 7 and alloc.num_free == 64 - 7
    assert all(not alloc.is_used(s) for s in b[:4].tolist())
    assert cache.protected_size == 6  # [1,2,3,4] and [6,7]; [5] is evictable
    # B continues decoding with one private slot, then finishes.
    more = alloc.alloc(1)
    slots = np.concatenate([res.slots, more])
    assert cache.cache_request([*prompt, 6, 7, 8], slots, res.node, finished=True) is None
    assert cache.protected_size == 0 and cache.total_size == 8
    assert alloc.num_free + cache.total_size == alloc.capacity


def test_cache_request_relocks_and_handles_empty():
    _, cache = make()
    res = cache.cache_request([], [], cache.root, finished=False)
    assert res is not None and res.node is cache.root and len(res.slots) == 0
    assert cache.cache_request([], [], cache.root, finished=True) is None
    res = cache.cache_request([1, 2], [5, 6], cache.root, finished=False)
    assert res is not None and res.node.lock_ref == 1
    res2 = cache.cache_request([1, 2, 3], [5, 6, 7], res.node, finished=False)
    assert res2 is not None and res2.node.lock_ref == 1 and res.node.lock_ref == 1
    assert res2.node.parent is res.node  # the old node is still locked only via its child
    cache.unlock(res2.node)
    assert res.node.lock_ref == 0 and cache.protected_size == 0


def test_evict_is_lru_and_frees_parents_that_become_leaves():
    clock = ManualClock()
    alloc, cache = make(clock=clock)
    seqs = {"a": [1, 2, 3], "b": [1, 2, 4, 4], "c": [5, 6]}
    slots = {}
    for t, (name, toks) in enumerate(seqs.items(), start=1):
        clock.t = t
        m = cache.match_prefix(toks, count=False)
        slots[name] = alloc.alloc(len(toks) - len(m.slots))
        cache.insert(toks, np.concatenate([m.slots, slots[name]]))
    clock.t = 4
    cache.match_prefix([1, 2, 3])  # "a" is now the most recent; "b"'s leaf [4, 4] the oldest
    assert cache.evict(1) == 2
    assert cache.match_prefix([1, 2, 4, 4], count=False).slots.tolist() == [0, 1]
    # Next: "c" (t=3), then "a"'s leaf [3], then [1, 2], which became a leaf.
    assert cache.evict(2) == 2
    assert len(cache.match_prefix([5, 6], count=False).slots) == 0
    assert cache.evict(1) == 1 and cache.total_size == 2
    assert cache.evict(1) == 2 and cache.total_size == 0
    assert cache.num_nodes == 0 and alloc.num_free == alloc.capacity
    assert cache.evict(1) == 0


def test_evict_never_touches_locked_paths():
    alloc, cache = make()
    cache.insert([1, 2, 3], alloc.alloc(3))
    cache.insert([1, 2, 4], np.concatenate([cache.match_prefix([1, 2]).slots, alloc.alloc(1)]))
    node = cache.match_prefix([1, 2, 3]).node
    cache.lock(node)
    assert cache.evict(100) == 1  # only [4]: [3] and its ancestor [1, 2] are locked
    assert cache.total_size == cache.protected_size == 3
    cache.unlock(node)
    assert cache.evict(100) == 3
    assert alloc.num_free == alloc.capacity


def test_lock_and_unlock_errors():
    alloc, cache = make()
    cache.insert([1, 2], alloc.alloc(2))
    node = cache.match_prefix([1, 2]).node
    with pytest.raises(RuntimeError, match="not locked"):
        cache.unlock(node)
    cache.lock(node)
    cache.unlock(node)
    with pytest.raises(RuntimeError):
        cache.unlock(node)
    cache.lock(cache.root)  # the root is a no-op either way
    cache.unlock(cache.root)
    cache.unlock(cache.root)
    assert cache.evict(2) == 2
    with pytest.raises(ValueError, match="no longer in the tree"):
        cache.lock(node)


def test_flush_refuses_while_locked():
    alloc, cache = make()
    cache.insert([1, 2, 3], alloc.alloc(3))
    cache.insert([4], alloc.alloc(1))
    node = cache.match_prefix([1, 2]).node
    cache.lock(node)
    assert cache.flush() is False
    assert cache.total_size == 4 and alloc.num_free == 60
    cache.unlock(node)
    assert cache.flush() is True
    assert cache.total_size == 0 and cache.num_nodes == 0 and alloc.num_free == 64
    assert len(cache.match_prefix([1, 2, 3]).slots) == 0
    assert cache.flush() is True  # empty: trivially


def test_hit_rate_counting():
    _, cache = make()
    assert cache.hit_rate() == 0.0
    cache.match_prefix([1, 2, 3, 4])
    cache.insert([1, 2, 3, 4], np.arange(4))
    cache.match_prefix([1, 2, 9, 9])
    cache.match_prefix([1, 2, 3, 4], count=False)
    assert (cache.hit_tokens, cache.queried_tokens) == (2, 8)
    assert cache.hit_rate() == 0.25
    cache.reset_stats()
    assert (cache.hit_tokens, cache.queried_tokens, cache.hit_rate()) == (0, 0, 0.0)


def test_no_prefix_cache_contract():
    alloc = SlotAllocator(16)
    cache = create_prefix_cache(disable=True, free_fn=alloc.free)
    assert isinstance(cache, NoPrefixCache) and isinstance(cache, PrefixCache)
    assert isinstance(create_prefix_cache(disable=False, free_fn=alloc.free), RadixCache)
    m = cache.match_prefix([1, 2, 3])
    assert len(m.slots) == 0
    cache.lock(m.node)
    slots = alloc.alloc(3)
    assert cache.insert([1, 2, 3], slots) == 0  # takes nothing
    assert len(cache.match_prefix([1, 2, 3]).slots) == 0
    assert (cache.total_size, cache.evictable_size, cache.protected_size) == (0, 0, 0)
    res = cache.cache_request([1, 2, 3], slots, m.node, finished=False)
    assert res is not None and res.node is m.node and res.slots.tolist() == slots.tolist()
    assert alloc.num_free == 13  # the request keeps its private slots
    assert cache.cache_request([1, 2, 3], slots, res.node, finished=True) is None
    assert alloc.num_free == 16  # ... and a finished one gives all of them back
    assert cache.evict(10) == 0 and cache.flush() is True
    assert (cache.hit_tokens, cache.queried_tokens) == (0, 6)
    with pytest.raises(ValueError):
        cache.lock(TreeNode(np.arange(1), np.arange(1), None, 1, 0))


def test_pretty_and_repr():
    _, cache = make()
    cache.insert(list(range(20)), np.arange(20))
    cache.insert([0, 1, 5], [0, 1, 30])
    text = cache.pretty()
    assert (
        text.splitlines()[0]
        == repr(cache)
        == ("RadixCache(total=21, evictable=21, protected=0, nodes=3)")
    )
    assert "(+10)" in text and "[5] -> [30]" in text


def test_repeated_matches_do_not_grow_the_heap():
    alloc, cache = make()
    cache.insert([1, 2, 3], alloc.alloc(3))
    for _ in range(5000):
        cache.match_prefix([1, 2, 3])
    assert len(cache._heap) <= 2 * cache.num_nodes + 1025
    assert cache.evict(1) == 3


def test_long_sequences_and_big_trees_are_fast():
    n = 10_000
    rng = np.random.default_rng(0)
    alloc, cache = make(capacity=4 * n)
    seq = rng.integers(0, 32_000, n).tolist()
    start = time.perf_counter()
    cache.insert(seq, alloc.alloc(n))
    assert len(cache.match_prefix(seq).slots) == n
    assert len(cache.match_prefix([*seq[:5000], -1]).slots) == 5000
    assert time.perf_counter() - start < 0.5  # a few ms in practice
    assert cache.evict(10**9) == n
    # A 10k-leaf tree under a shared prefix.
    cache.insert(seq[:100], alloc.alloc(100))
    prefix = cache.match_prefix(seq[:100]).slots
    for i in range(n):
        cache.insert([*seq[:100], i, 7, 7], np.concatenate([prefix, alloc.alloc(3)]))
    assert cache.num_nodes == n + 1
    start = time.perf_counter()
    assert cache.evict(3 * n) == 3 * n
    assert time.perf_counter() - start < 1.0  # tens of ms in practice
    assert cache.evict(10**9) == 100 and alloc.num_free == alloc.capacity


def test_deep_tree_does_not_recurse():
    # 3000 single-token nodes in a chain: walks, pretty() and flush() must be iterative.
    alloc, cache = make(capacity=3000)
    seq = [i % 2 for i in range(3000)]
    cache.insert(seq, alloc.alloc(3000))
    for k in range(1, 3000):
        cache.match_prefix(seq[: 3000 - k], count=False)
    assert cache.num_nodes == 3000
    assert len(cache.match_prefix(seq).slots) == 3000
    assert len(cache.pretty().splitlines()) == 3001
    assert cache.flush() and cache.total_size == 0 and alloc.num_free == 3000


# --- property tests against a reference model -------------------------------------------------

CAPACITY = 40
tokens_st = st.lists(st.integers(0, 3), max_size=8)


@dataclass
class Req:
    tokens: list[int]
    slots: list[int]
    node: TreeNode
    locked_len: int

    @property
    def private(self) -> int:
        return len(self.slots) - self.locked_len


class RadixMachine(RuleBasedStateMachine):
    """Random inserts, matches, request lifecycles, evictions and flushes.

    The reference is a dict from every cached prefix (a token tuple) to the slot of its last
    token, plus the time each prefix was last touched; simulated requests hold private slots.
    """

    @initialize()
    def setup(self) -> None:
        self.alloc = SlotAllocator(CAPACITY)
        self.clock = ManualClock()
        self.cache = RadixCache(self.alloc.free, clock=self.clock)
        self.ref: dict[tuple[int, ...], int] = {}
        self.times: dict[tuple[int, ...], int] = {}
        self.reqs: list[Req] = []
        self.hits = self.queried = 0

    def tick(self) -> int:
        self.clock.t += 1
        return self.clock.t

    def touch(self, tokens: list[int], n: int, t: int) -> None:
        for i in range(1, n + 1):
            self.times[tuple(tokens[:i])] = t

    def ref_insert(self, tokens: list[int], slots: list[int], t: int) -> int:
        existing = longest_cached(self.ref, tokens)
        for i in range(existing, len(tokens)):
            self.ref[tuple(tokens[: i + 1])] = slots[i]
        self.touch(tokens, len(tokens), t)
        return existing

    def alloc_or_evict(self, n: int) -> np.ndarray | None:
        if n > self.alloc.num_free:
            self.checked_evict(n - self.alloc.num_free)
        return self.alloc.alloc(n) if n <= self.alloc.num_free else None

    def checked_evict(self, n: int) -> None:
        before = tree_map(self.cache)
        freed = self.cache.evict(n)
        after = tree_map(self.cache)
        removed = before.keys() - after.keys()
        assert len(removed) == freed
        assert freed >= n or self.cache.evictable_size == 0
        for req in self.reqs:
            for p in removed:
                assert not (len(p) <= req.locked_len and list(p) == req.tokens[: len(p)])
        # LRU: nothing evicted was touched later than anything still evictable at a leaf.
        leaf_times = [t for _, t, node in after.values() if node.is_leaf and node.lock_ref == 0]
        if removed and leaf_times:
            assert max(self.times[p] for p in removed) <= min(leaf_times)
        for p in removed:
            del self.ref[p], self.times[p]

    def match(self, tokens: list[int]) -> MatchResult:
        t = self.tick()
        m = self.cache.match_prefix(tokens)
        n = longest_cached(self.ref, tokens)
        assert m.slots.tolist() == [self.ref[tuple(tokens[: i + 1])] for i in range(n)]
        assert m.node.end == n and (n > 0 or m.node is self.cache.root)
        self.touch(tokens, n, t)
        self.hits += n
        self.queried += len(tokens)
        return m

    # --- rules ---

    @rule(tokens=tokens_st)
    def insert(self, tokens: list[int]) -> None:
        slots = self.alloc_or_evict(len(tokens))
        if slots is None:
            return
        t = self.tick()
        existing = self.cache.insert(tokens, slots)
        assert existing == self.ref_insert(tokens, slots.tolist(), t)
        self.alloc.free(slots[:existing])  # our duplicates

    @rule(tokens=tokens_st)
    def match_only(self, tokens: list[int]) -> None:
        self.match(tokens)

    @rule(tokens=tokens_st)
    def start_request(self, tokens: list[int]) -> None:
        m = self.match(tokens)
        self.cache.lock(m.node)
        new = self.alloc_or_evict(len(tokens) - len(m.slots))
        if new is None:
            self.cache.unlock(m.node)
            return
        slots = [*m.slots.tolist(), *new.tolist()]
        self.reqs.append(Req(list(tokens), slots, m.node, len(m.slots)))

    @precondition(lambda self: self.reqs)
    @rule(pick=st.integers(0, 99), extra=st.lists(st.integers(0, 3), max_size=3))
    def fork_request(self, pick: int, extra: list[int]) -> None:
        # Shares another request's not-yet-cached tokens: the source of private duplicates.
        self.start_request([*self.reqs[pick % len(self.reqs)].tokens, *extra])

    @precondition(lambda self: self.reqs)
    @rule(pick=st.integers(0, 99), more=st.lists(st.integers(0, 3), min_size=1, max_size=3))
    def decode(self, pick: int, more: list[int]) -> None:
        req = self.reqs[pick % len(self.reqs)]
        new = self.alloc_or_evict(len(more))
        if new is not None:
            req.tokens += more
            req.slots += new.tolist()

    @precondition(lambda self: self.reqs)
    @rule(pick=st.integers(0, 99), finished=st.booleans())
    def cache_request(self, pick: int, finished: bool) -> None:
        req = self.reqs[pick % len(self.reqs)]
        t = self.tick()
        free_before = self.alloc.num_free
        res = self.cache.cache_request(req.tokens, np.array(req.slots), req.node, finished)
        existing = self.ref_insert(req.tokens, req.slots, t)
        assert self.alloc.num_free - free_before == existing - req.locked_len
        event(f"cache_request: duplicates freed={existing > req.locked_len}")
        if finished:
            assert res is None
            self.reqs.remove(req)
            return
        assert res is not None
        assert res.slots.tolist() == [
            self.ref[tuple(req.tokens[: i + 1])] for i in range(len(req.tokens))
        ]
        assert res.node.end == len(req.tokens)
        req.slots, req.node, req.locked_len = res.slots.tolist(), res.node, len(req.tokens)

    @precondition(lambda self: self.reqs)
    @rule(pick=st.integers(0, 99))
    def abort_request(self, pick: int) -> None:
        req = self.reqs.pop(pick % len(self.reqs))
        self.alloc.free(np.array(req.slots[req.locked_len :], dtype=np.int64))
        self.cache.unlock(req.node)

    @rule(n=st.integers(0, CAPACITY))
    def evict(self, n: int) -> None:
        self.checked_evict(n)

    @rule()
    def flush(self) -> None:
        expected = all(req.locked_len == 0 for req in self.reqs)
        total = self.cache.total_size
        assert self.cache.flush() is expected
        if expected:
            self.ref.clear()
            self.times.clear()
        else:
            assert self.cache.total_size == total

    # --- invariants ---

    @invariant()
    def tree_matches_reference(self) -> None:
        tm = tree_map(self.cache)
        assert {p: slot for p, (slot, _, _) in tm.items()} == self.ref
        assert all(self.times[p] == t for p, (_, t, _) in tm.items())
        slots = [slot for slot, _, _ in tm.values()]
        assert len(set(slots)) == len(slots), "a slot appears twice in the tree"
        assert all(self.alloc.is_used(s) for s in slots)
        private = {s for req in self.reqs for s in req.slots[req.locked_len :]}
        assert not private & set(slots)

    @invariant()
    def every_slot_owned_once(self) -> None:
        private = sum(req.private for req in self.reqs)
        assert self.alloc.num_free + self.cache.total_size + private == CAPACITY

    @invariant()
    def sizes_and_locks_are_consistent(self) -> None:
        cache = self.cache
        assert cache.evictable_size + cache.protected_size == cache.total_size
        expected: dict[int, int] = {}
        for req in self.reqs:
            assert req.node.end == req.locked_len
            assert path_slots(cache, req.node) == req.slots[: req.locked_len]
            node = req.node
            while node is not cache.root:
                expected[id(node)] = expected.get(id(node), 0) + 1
                node = node.parent
        protected = 0
        for _, _, node in tree_map(cache).values():
            assert node.lock_ref == expected.get(id(node), 0)
            protected += node.lock_ref > 0
        assert cache.protected_size == protected

    @invariant()
    def stats(self) -> None:
        assert (self.cache.hit_tokens, self.cache.queried_tokens) == (self.hits, self.queried)


RadixMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
test_radix_cache_against_reference = RadixMachine.TestCase


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["start", "decode", "cache", "finish"]), st.integers(0, 99)),
        max_size=30,
    )
)
def test_no_prefix_cache_ownership(ops):
    alloc = SlotAllocator(CAPACITY)
    cache = NoPrefixCache(alloc.free)
    reqs: list[Req] = []
    for op, k in ops:
        if op == "start":
            tokens = [k % 4] * (k % 5)
            m = cache.match_prefix(tokens)
            cache.lock(m.node)
            if len(tokens) <= alloc.num_free:
                reqs.append(Req(tokens, alloc.alloc(len(tokens)).tolist(), m.node, 0))
        elif reqs:
            req = reqs[k % len(reqs)]
            if op == "decode" and alloc.num_free:
                req.tokens.append(k % 4)
                req.slots += alloc.alloc(1).tolist()
            elif op in ("cache", "finish"):
                res = cache.cache_request(req.tokens, req.slots, req.node, op == "finish")
                if op == "finish":
                    assert res is None
                    reqs.remove(req)
                else:
                    assert res is not None and res.slots.tolist() == req.slots
                    assert res.node is cache.root
        assert alloc.num_free + sum(len(r.slots) for r in reqs) == CAPACITY
        assert cache.total_size == cache.evictable_size == cache.protected_size == 0

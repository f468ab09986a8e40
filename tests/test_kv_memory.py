"""KV memory accounting: slot allocator, KV pool and request->token table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smallm.runtime.cache.kv_pool import KVPool
from smallm.runtime.cache.req_to_token import ReqToTokenPool
from smallm.runtime.cache.slot_allocator import OutOfSlots, SlotAllocator

ops = st.lists(
    st.tuples(st.sampled_from(["alloc", "free"]), st.integers(0, 40), st.integers(0, 10**6)),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(1, 64), first=st.integers(0, 2), ops=ops)
def test_allocator_matches_reference(capacity, first, ops):
    alloc = SlotAllocator(capacity, first=first)
    held: list[np.ndarray] = []
    owned: set[int] = set()
    for op, n, pick in ops:
        if op == "alloc":
            if n > alloc.num_free:
                with pytest.raises(OutOfSlots):
                    alloc.alloc(n)
                continue
            slots = alloc.alloc(n)
            assert len(slots) == n
            got = set(slots.tolist())
            assert len(got) == n, "duplicate slot in one allocation"
            assert not got & owned, "slot handed out twice"
            assert all(first <= s < first + capacity for s in got)
            owned |= got
            held.append(slots)
        elif held:
            slots = held.pop(pick % len(held))
            alloc.free(slots)
            owned -= set(slots.tolist())
        assert alloc.num_free + alloc.num_used == capacity
        assert alloc.num_used == len(owned)
    for slots in held:
        alloc.free(slots)
    assert alloc.num_free == capacity


def runs(slots) -> list[int]:
    """Lengths of the runs of consecutive ids in sorted ``slots``."""
    a = np.sort(np.asarray(slots))
    if a.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(a) != 1) + 1
    return np.diff(np.concatenate(([0], breaks, [a.size]))).tolist()


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(1, 64), first=st.integers(0, 2), ops=ops)
def test_contiguous_alloc_keeps_accounting_and_takes_the_fewest_runs(capacity, first, ops):
    """Mixed with plain allocations and frees: distinct free slots, exact accounting, one run
    when the free set has a run long enough, else the fewest runs any choice could give."""
    alloc = SlotAllocator(capacity, first=first)
    held: list[np.ndarray] = []
    owned: set[int] = set()
    for op, n, pick in ops:
        if op == "alloc":
            if n > alloc.num_free:
                continue
            free = sorted(set(range(first, first + capacity)) - owned)
            contiguous = pick % 2 == 0
            slots = alloc.alloc_contiguous(n) if contiguous else alloc.alloc(n)
            got = set(slots.tolist())
            assert len(got) == n and not got & owned
            assert got <= set(free)
            if contiguous and n:
                best = sorted(runs(free), reverse=True)
                fewest = next(k for k in range(1, len(best) + 1) if sum(best[:k]) >= n)
                if best[0] >= n:
                    assert runs(slots) == [n]
                assert len(runs(slots)) == fewest
            owned |= got
            held.append(slots)
        elif held:
            slots = held.pop(pick % len(held))
            alloc.free(slots)
            owned -= set(slots.tolist())
        assert alloc.num_used == len(owned) and alloc.num_free + alloc.num_used == capacity
    for slots in held:
        alloc.free(slots)
    assert alloc.num_free == capacity
    assert len(alloc.alloc(capacity)) == capacity  # the stack still holds every slot once


def test_double_free_and_foreign_free_raise():
    alloc = SlotAllocator(8)
    slots = alloc.alloc(3)
    alloc.free(slots)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(slots)
    with pytest.raises(ValueError):
        alloc.free([1, 1])
    assert alloc.num_free == 8


def test_kv_pool_never_hands_out_padding_slot_and_stores():
    pool = KVPool(10, num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32)
    slots = pool.alloc(10)
    assert 0 not in slots.tolist() and sorted(slots.tolist()) == list(range(1, 11))
    k = torch.randn(10, 2, 4)
    v = torch.randn(10, 2, 4)
    idx = torch.from_numpy(slots)
    pool.store(1, idx, k, v)
    assert torch.equal(pool.k(1)[idx], k) and torch.equal(pool.v(1)[idx], v)
    assert torch.count_nonzero(pool.k(0)) == 0, "other layers untouched"
    assert torch.count_nonzero(pool.k(1)[0]) == 0, "padding slot stays zero"
    with pytest.raises(OutOfSlots):
        pool.alloc(1)
    pool.free(slots)
    assert pool.num_free == 10


def test_req_to_token_rows_and_bounds():
    table = ReqToTokenPool(max_requests=2, max_context_len=5)
    a, b = table.alloc(), table.alloc()
    assert {a, b} == {0, 1} and table.num_free == 0
    table.write(a, 0, [3, 4])
    table.write(a, 2, [9])
    assert table.read(a, 0, 3).tolist() == [3, 4, 9]
    assert table.table[a, :3].tolist() == [3, 4, 9], "torch view shares memory"
    with pytest.raises(ValueError, match="5"):
        table.write(b, 4, [1, 2])
    table.free(a)
    assert table.alloc() == a

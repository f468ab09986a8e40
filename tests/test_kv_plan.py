"""The KV page plan (issue 15): which bytes of a prefill KV pool go where in a decode pool.

Plans are applied for real: with ``ctypes.memmove`` between two ``KVPool`` buffers in this
process, and through the Mooncake and fake engines between pools in two spawned processes.
"""

from __future__ import annotations

import ctypes
import json
import statistics
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transfer_peer import KVPoolPeer

from smallm.runtime.cache.kv_pool import KVPool
from smallm.runtime.disaggregation.kv_plan import (
    FIRST_TOKEN_RECORD,
    FailReason,
    FirstToken,
    FirstTokenBuffer,
    FirstTokenLayout,
    FirstTokenStatus,
    KVLayout,
    KVLayoutMismatch,
    decode_first_token,
    encode_first_token,
    plan_bytes,
    transfer_plan,
)
from smallm.runtime.disaggregation.transfer import TransferBackendUnavailable

LAYERS, HEADS, HEAD_DIM = 3, 2, 4
SRC_CAPACITY, DST_CAPACITY = 24, 31


def random_pool(capacity: int, dtype: torch.dtype, seed: int, **shape) -> KVPool:
    pool = KVPool(
        capacity,
        shape.get("num_layers", LAYERS),
        shape.get("num_kv_heads", HEADS),
        shape.get("head_dim", HEAD_DIM),
        dtype,
    )
    raw = pool.buffer.view(-1).view(torch.uint8)
    gen = torch.Generator().manual_seed(seed)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen))
    return pool


def as_bytes(pool: KVPool) -> torch.Tensor:
    """The pool as uint8 [layers, 2, slots, row]: compares bit patterns, NaNs included."""
    return pool.buffer.view(-1).view(torch.uint8).view(*pool.buffer.shape[:3], -1).clone()


def apply(plan) -> None:
    for src, dst, n in zip(*plan.as_lists()):
        ctypes.memmove(dst, src, n)


def minimal_runs(src: list[int], dst: list[int]) -> int:
    """Runs of tokens whose slots are consecutive on both sides, counted the slow way."""
    runs = 0
    for i in range(len(src)):
        if i == 0 or src[i] != src[i - 1] + 1 or dst[i] != dst[i - 1] + 1:
            runs += 1
    return runs


@st.composite
def slot_lists(draw, capacity: int, n: int):
    """n distinct slots of 1..capacity: a contiguous block, a sorted subset (runs), or shuffled."""
    kind = draw(st.sampled_from(["block", "sorted", "shuffled"]))
    if kind == "block":
        start = draw(st.integers(1, capacity - n + 1))
        return list(range(start, start + n))
    chosen = draw(st.permutations(range(1, capacity + 1)))[:n]
    return sorted(chosen) if kind == "sorted" else chosen


@st.composite
def slot_pairs(draw):
    n = draw(st.integers(0, SRC_CAPACITY))
    return draw(slot_lists(SRC_CAPACITY, n)), draw(slot_lists(DST_CAPACITY, n))


# ---- plans applied in one process ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@settings(max_examples=150, deadline=None)
@given(pair=slot_pairs())
def test_plan_copies_exactly_the_slots(dtype, pair):
    src_slots, dst_slots = pair
    src, dst = random_pool(SRC_CAPACITY, dtype, 1), random_pool(DST_CAPACITY, dtype, 2)
    before_src, before_dst = as_bytes(src), as_bytes(dst)
    plan = transfer_plan(KVLayout.of(src), src_slots, KVLayout.of(dst), dst_slots)
    apply(plan)

    expected = before_dst.clone()
    expected[:, :, dst_slots] = before_src[:, :, src_slots]
    assert torch.equal(as_bytes(dst), expected)  # the slots asked for, and nothing else
    assert torch.equal(as_bytes(src), before_src)
    if src_slots:  # the same through the pools' own typed view
        assert torch.equal(
            dst.buffer[:, :, dst_slots].view(torch.uint8),
            src.buffer[:, :, src_slots].view(torch.uint8),
        )
    assert plan.nbytes == plan_bytes(KVLayout.of(src), len(src_slots))
    assert len(plan.lengths) == LAYERS * 2 * minimal_runs(src_slots, dst_slots)


def test_coalescing_examples():
    src, dst = (
        KVLayout.of(random_pool(64, torch.float32, 0)),
        KVLayout.of(random_pool(64, torch.float32, 0)),
    )
    row = HEADS * HEAD_DIM * 4
    # one contiguous request: one range per layer and K/V, each the whole request
    plan = transfer_plan(src, range(10, 40), dst, range(1, 31))
    assert len(plan.lengths) == LAYERS * 2 and set(plan.lengths.tolist()) == {30 * row}
    # runs break where either side stops being consecutive
    plan = transfer_plan(src, [5, 6, 7, 20, 21, 22], dst, [1, 2, 3, 4, 5, 9])
    assert plan.lengths[:3].tolist() == [3 * row, 2 * row, 1 * row]
    # ordering: layer, then K before V, then token; pointers follow the pool's strides
    first = plan.src_ptrs[:3].tolist()
    assert first == [src.base_ptr + s * row for s in (5, 20, 22)]
    assert plan.dst_ptrs[3] == dst.base_ptr + dst.kv_stride + 1 * row  # layer 0's V
    assert plan.dst_ptrs[6] == dst.base_ptr + dst.layer_stride + 1 * row  # layer 1's K
    # a reversed order never coalesces
    assert len(transfer_plan(src, [9, 8, 7], dst, [9, 8, 7]).lengths) == LAYERS * 2 * 3
    # nothing to move
    empty = transfer_plan(src, [], dst, np.array([], dtype=np.int64))
    assert len(empty.lengths) == 0 and empty.nbytes == 0
    # slots as numpy arrays and CPU tensors, as the allocator and radix cache hand them out
    a = transfer_plan(src, np.array([3, 4]), dst, torch.tensor([7, 8]))
    b = transfer_plan(src, [3, 4], dst, [7, 8])
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_plan_bad_slots():
    src, dst = (
        KVLayout.of(random_pool(8, torch.float32, 0)),
        KVLayout.of(random_pool(16, torch.float32, 0)),
    )
    for s, d, message in [
        ([1, 2], [1], "2 source slots but 1 destination slots"),
        ([0], [1], r"source slot 0 is outside the pool's slots 1..8"),
        ([9], [1], "source slot 9 is outside"),
        ([1], [17], "destination slot 17 is outside"),
        ([1, 2], [3, 3], "destination slot appears twice"),
        ([1.5], [1], "must be integers"),
        ([[1]], [[1]], "one-dimensional"),
    ]:
        with pytest.raises(ValueError, match=message):
            transfer_plan(src, s, dst, d)


def test_planning_a_long_request_is_fast():
    """1,500 tokens, 30 layers, every slot scattered (90,000 ranges), and in one run (60)."""
    src = KVLayout.create(1 << 20, 30, 4000, 3, 64, "bfloat16", 2)
    dst = KVLayout.create(1 << 40, 30, 5000, 3, 64, "bfloat16", 2)
    rng = np.random.default_rng(0)
    cases = {
        "scattered": (rng.permutation(4000)[:1500] + 1, rng.permutation(5000)[:1500] + 1),
        "contiguous": (np.arange(1, 1501), np.arange(2001, 3501)),
    }
    for name, (s, d) in cases.items():
        times = []
        for _ in range(15):
            start = time.perf_counter()
            plan = transfer_plan(src, s, dst, d)
            times.append(time.perf_counter() - start)
        assert plan.nbytes == plan_bytes(src, 1500) == 30 * 2 * 1500 * 3 * 64 * 2
        median = statistics.median(times)
        print(f"{name}: {len(plan.lengths)} ranges planned in {median * 1e6:.0f} us (median)")
        # generous for a loaded 2-core machine; a per-token Python loop takes tens of ms
        assert median < 0.01, (name, median)


# ---- layouts ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layout_of_a_pool(dtype):
    pool = KVPool(10, 2, 3, 8, dtype)
    layout = KVLayout.of(pool)
    item = pool.buffer.element_size()
    shape = (layout.num_layers, layout.capacity, layout.num_kv_heads, layout.head_dim)
    assert shape == (2, 10, 3, 8)
    assert layout.dtype == str(dtype).removeprefix("torch.") and layout.item_size == item
    assert layout.base_ptr == pool.buffer.data_ptr() and layout.nbytes == pool.nbytes
    assert layout.slot_stride == 3 * 8 * item
    assert layout.kv_stride == pool.buffer.stride(1) * item
    assert layout.layer_stride == pool.buffer.stride(0) * item
    assert layout.device == "cpu"
    # plain data: through JSON and msgpack unchanged
    assert KVLayout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout
    assert KVLayout.from_dict(msgpack.unpackb(msgpack.packb(layout.to_dict()))) == layout
    plan = transfer_plan(layout, [1, 2, 3], layout, [4, 5, 6])
    assert plan.nbytes == plan_bytes(layout, 3) == 2 * 2 * 3 * 3 * 8 * item


def test_layout_from_bad_data():
    good = KVLayout.of(KVPool(4, 1, 1, 4, torch.float32)).to_dict()
    with pytest.raises(ValueError, match=r"missing field.*head_dim"):
        KVLayout.from_dict({k: v for k, v in good.items() if k != "head_dim"})
    with pytest.raises(ValueError, match=r"unknown field.*page_size"):
        KVLayout.from_dict({**good, "page_size": 16})
    with pytest.raises(ValueError, match="not those of a contiguous pool"):
        KVLayout.from_dict({**good, "kv_stride": good["kv_stride"] + 16})
    with pytest.raises(ValueError, match="float32 has 4-byte items, not 2"):
        KVLayout.from_dict({**good, "item_size": 2})
    with pytest.raises(ValueError, match="num_layers must be a positive integer"):
        KVLayout.from_dict({**good, "num_layers": 0})
    with pytest.raises(ValueError, match="must be an object"):
        KVLayout.from_dict([good])
    with pytest.raises(ValueError, match="not contiguous"):
        KVLayout.of(type("P", (), {"buffer": torch.zeros(2, 2, 5, 4, 3).transpose(3, 4)})())


def test_layout_mismatch_names_what_differs():
    base = KVLayout.of(KVPool(8, 2, 2, 4, torch.float32))
    # a different capacity (and address) is fine
    base.check_compatible(KVLayout.of(KVPool(100, 2, 2, 4, torch.float32)))
    for pool, message in [
        (KVPool(8, 3, 2, 4, torch.float32), "num_layers: prefill 2 != decode 3"),
        (KVPool(8, 2, 1, 4, torch.float32), "num_kv_heads: prefill 2 != decode 1"),
        (KVPool(8, 2, 2, 8, torch.float32), "head_dim: prefill 4 != decode 8"),
        (KVPool(8, 2, 2, 4, torch.bfloat16), "dtype: prefill float32 != decode bfloat16"),
    ]:
        with pytest.raises(KVLayoutMismatch, match=message):
            base.check_compatible(KVLayout.of(pool))
        with pytest.raises(KVLayoutMismatch, match=message):
            transfer_plan(base, [1], KVLayout.of(pool), [1])
    # every mismatch at once is named
    other = KVLayout.of(KVPool(8, 4, 2, 4, torch.float16))
    with pytest.raises(KVLayoutMismatch, match=r"num_layers.*dtype.*float16"):
        base.check_compatible(other)


# ---- the first-token record ---------------------------------------------------------------


def test_first_token_records():
    for token in [
        FirstToken(7, FirstTokenStatus.OK, 1234, -0.125),
        FirstToken(2**64 - 1, FirstTokenStatus.OK, 0, None),
        FirstToken(3, FirstTokenStatus.FAILED),
        *(FirstToken(4, FirstTokenStatus.FAILED, reason=why) for why in FailReason),
    ]:
        data = encode_first_token(token)
        assert len(data) == FIRST_TOKEN_RECORD.size == 32
        assert decode_first_token(data) == token
    assert decode_first_token(bytes(32)) == FirstToken(0, FirstTokenStatus.PENDING, 0, None)
    record = encode_first_token(FirstToken(1, FirstTokenStatus.FAILED, 2, 0.5))
    assert record[24:28] == b"\x01\x00\x00\x00"  # flags: logprob present
    assert record[28:] == b"\x02\x00\x00\x00"  # status last, so in-order delivery sets it last
    mismatch = FirstToken(1, FirstTokenStatus.FAILED, reason=FailReason.PROMPT_MISMATCH)
    assert encode_first_token(mismatch)[24:28] == b"\x00\x02\x00\x00"  # reason: bits 8-15
    unknown = bytearray(encode_first_token(mismatch))
    unknown[25] = 200  # a reason this side does not know is still a failure
    assert decode_first_token(bytes(unknown)).reason is FailReason.UNKNOWN
    with pytest.raises(ValueError, match="32 bytes, not 31"):
        decode_first_token(bytes(31))
    bad_status = bytearray(32)
    bad_status[28] = 9  # status is the last field
    with pytest.raises(ValueError, match="unknown status 9"):
        decode_first_token(bytes(bad_status))
    with pytest.raises(ValueError, match="room -1"):
        encode_first_token(FirstToken(-1, FirstTokenStatus.OK, 1))

    buf = FirstTokenBuffer(4)
    buf.put(2, FirstToken(11, FirstTokenStatus.OK, 42, -1.5))
    assert buf.get(2) == FirstToken(11, FirstTokenStatus.OK, 42, -1.5)
    assert buf.get(1).status == FirstTokenStatus.PENDING
    buf.clear(2)
    assert buf.get(2).status == FirstTokenStatus.PENDING
    with pytest.raises(ValueError, match=r"record 4 is outside 0\.\.3"):
        buf.get(4)
    layout = FirstTokenLayout.from_dict(json.loads(json.dumps(buf.layout().to_dict())))
    assert layout == buf.layout() and layout.record_ptr(3) == buf.ptr(0) + 96
    with pytest.raises(ValueError, match="64 bytes"):
        FirstTokenLayout.from_dict({**layout.to_dict(), "record_size": 64})
    # a staged record copied by its one-range plan, as the engine will
    dst = FirstTokenBuffer(2)
    buf.put(0, FirstToken(5, FirstTokenStatus.OK, 9, None))
    apply(buf.plan(0, dst.layout(), 1))
    assert dst.get(1) == FirstToken(5, FirstTokenStatus.OK, 9, None) and dst.get(0).room == 0


def test_kv_plan_stays_torch_free():
    code = (
        "import sys\n"
        "import smallm.runtime.disaggregation.kv_plan\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---- across processes, through the real engines -------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", ["fake", "mooncake"])
def test_request_kv_and_first_token_cross_processes(backend, dtype):
    """A request's KV (a cached prefix plus scattered fresh slots) lands in the decode pool's
    scattered slots and nowhere else; then the first token's record lands in its index."""
    peers: list[KVPoolPeer] = []
    try:
        try:
            for capacity in (40, 64):
                peers.append(KVPoolPeer(backend, capacity=capacity, dtype=dtype))
        except TransferBackendUnavailable as e:
            pytest.skip(f"{backend} unavailable here: {e}")
        prefill, decode = peers
        prefill.call("fill", 11)
        decode.call("fill", 22)
        rng = np.random.default_rng(5)
        # a radix-cache prefix in slots 3..14, then 9 fresh slots from wherever the allocator had
        fresh = [int(x) for x in rng.choice(np.arange(15, 41), 9, replace=False)]
        src_slots = list(range(3, 15)) + fresh
        elsewhere = np.setdiff1d(np.arange(1, 65), np.arange(50, 54))
        dst_slots = [int(x) for x in rng.choice(elsewhere, len(src_slots), replace=False)]
        dst_slots[4:8] = [50, 51, 52, 53]  # a run on both sides (src 7..10) among the scatter

        outcome, ranges, nbytes, _planned = prefill.call(
            "write_kv", decode.session_id, decode.layout, src_slots, dst_slots
        )
        assert outcome == "written", outcome
        assert nbytes == plan_bytes(KVLayout.from_dict(prefill.layout), len(src_slots))
        assert ranges == 3 * 2 * minimal_runs(src_slots, dst_slots) < 3 * 2 * len(src_slots)
        moved_wrong, elsewhere_wrong = decode.call(
            "check_kv", 11, prefill.layout, src_slots, dst_slots, 22
        )
        assert (moved_wrong, elsewhere_wrong) == (0, 0)
        assert prefill.call("check_kv", 11, prefill.layout, [], [], 11) == (0, 0)  # source intact

        # the first token: staged in the prefill side's record 2, written to the decode's 5
        prefill.call("put_first", 2, 123456789, int(FirstTokenStatus.OK), 4321, -0.75)
        assert prefill.call("write_first", decode.session_id, decode.first_layout, 2, 5) == (
            "written"
        )
        assert decode.call("get_first", 5) == (123456789, int(FirstTokenStatus.OK), 4321, -0.75)
        assert decode.call("get_first", 4) == (0, int(FirstTokenStatus.PENDING), 0, None)
        # a failure record without a logprob replaces it
        prefill.call("put_first", 2, 123456789, int(FirstTokenStatus.FAILED), -1, None)
        prefill.call("write_first", decode.session_id, decode.first_layout, 2, 5)
        assert decode.call("get_first", 5) == (123456789, int(FirstTokenStatus.FAILED), -1, None)
    finally:
        for peer in peers:
            peer.close()

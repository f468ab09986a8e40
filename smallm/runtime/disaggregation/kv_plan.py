"""Which bytes move: the KV pool's memory layout, the write plan for one request, the first token.

The KV pool (``smallm/runtime/cache/kv_pool.py``) is one contiguous tensor
``buffer[num_layers, 2, capacity + 1, num_kv_heads, head_dim]``; token slot ``s`` of layer ``l``
holds its keys at ``buffer[l, 0, s]`` and values at ``buffer[l, 1, s]``, each a contiguous row of
``num_kv_heads * head_dim`` items. A request's KV lives in arbitrary slots (radix-cache prefix
plus fresh ones), so moving it from a prefill pool into the slots a decode pool reserved is, for
every layer and for K and V, one byte range per token, and one range per *run* of tokens whose
slots are consecutive on both sides (``s, s+1, ...`` -> ``d, d+1, ...``).

- ``KVLayout`` is the plain-data description of a pool (base address, shape, dtype, byte
  strides) that the decode side sends to the prefill side; ``check_compatible`` refuses a pair
  that disagree on anything but capacity and address.
- ``transfer_plan`` turns two slot lists into ``(src_ptrs, dst_ptrs, lengths)`` for
  ``TransferEngine.write``, vectorised with numpy; ``plan_bytes`` is the total it must move.

Coalescing is what makes a transfer cheap, not planning. Measured here (2 shared cores, a
1,500-token request over 30 layers, 3 KV heads x 64, bfloat16: 34.6 MB): planning takes about
0.2 ms in one run and 0.8 ms fully scattered, but the write takes ~36 ms through Mooncake's TCP
transport as 60 ranges and ~1.9 s as 90,000 scattered ones (fake engine: ~16 ms vs ~0.44 s).
So the decode side should reserve a request's slots as few runs as it can.

The first token. The prefill side samples the first output token, so the decode side must get
its id (and its logprob when asked) along with the KV. The smallest thing that works with the
transfer engine, and the same idea as SGLang's metadata buffers, is a second registered region
on the decode side: a ``FirstTokenBuffer`` of fixed 32-byte records, one per in-flight request.
The decode side picks a free record index when it reserves the request's KV slots and sends it
(with ``FirstTokenBuffer.layout()``) alongside the KV layout; the prefill side fills the same
record in its own registered staging ``FirstTokenBuffer`` and writes those 32 bytes into the
decode side's record *after* the KV write has returned (writes are synchronous), so a record
whose status is ``OK`` means the request's KV has landed. The record carries the bootstrap room,
so a late write meant for a previous occupant of the index is recognised as stale; a failed
prefill writes ``FAILED``. Record layout, little-endian: room u64, token id i64, logprob f64,
flags u32 (bit 0: logprob present; bits 8-15: why a FAILED room failed, ``FailReason``),
status u32. Status comes after the payload, so a transport
that delivers a range in order (both TCP engines) sets it last; a decode side that polls the
record rather than waiting for the prefill side's completion notice still reads the room and
status together and trusts only a matching room. Top-k logprobs would be a fixed-size extension of
the record (SGLang reserves 128 entries); nothing here needs them yet.

Nothing here imports torch: ``KVLayout.of`` reads the pool's tensor by duck typing.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import numpy as np

# numpy's name for each dtype a KV pool may use, where it differs from torch's; item sizes come
# from the tensor itself, this table only checks that dtype and item size agree.
_ITEM_SIZES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float64": 8,
}


class KVLayoutMismatch(ValueError):
    """A prefill pool's and a decode pool's layouts cannot exchange KV; the message says how."""


@dataclass(frozen=True)
class KVLayout:
    """Where a KV pool's bytes are in its process, and how they are laid out.

    Plain data (ints and strings) so it can cross the wire: ``to_dict`` / ``from_dict``.
    ``base_ptr`` is only meaningful in the process that owns the pool. The byte strides are
    those of the contiguous ``[num_layers, 2, capacity + 1, num_kv_heads, head_dim]`` buffer;
    they travel with the layout so a peer with a different idea of the pool is refused, not
    silently written with garbage.
    """

    base_ptr: int
    num_layers: int
    capacity: int  # usable slots 1..capacity; slot 0 is the pool's padding, never moved
    num_kv_heads: int
    head_dim: int
    dtype: str  # "float32", "bfloat16", ...
    item_size: int
    slot_stride: int  # bytes from slot s to slot s+1: one token's K (or V) row
    kv_stride: int  # bytes from a layer's K to its V
    layer_stride: int  # bytes from layer l to layer l+1
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("num_layers", "capacity", "num_kv_heads", "head_dim", "item_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.base_ptr, int) or self.base_ptr <= 0:
            raise ValueError(f"KVLayout.base_ptr must be a positive address, got {self.base_ptr!r}")
        expected_size = _ITEM_SIZES.get(self.dtype)
        if expected_size is not None and expected_size != self.item_size:
            raise ValueError(
                f"KVLayout dtype {self.dtype} has {expected_size}-byte items, not {self.item_size}"
            )
        implied = self.implied_strides(
            self.num_layers, self.capacity, self.num_kv_heads, self.head_dim, self.item_size
        )
        actual = (self.slot_stride, self.kv_stride, self.layer_stride)
        if actual != implied:
            raise ValueError(
                f"KVLayout strides (slot, kv, layer) = {actual} are not those of a contiguous "
                f"pool of this shape, {implied}"
            )

    @staticmethod
    def implied_strides(
        num_layers: int, capacity: int, num_kv_heads: int, head_dim: int, item_size: int
    ) -> tuple[int, int, int]:
        """(slot, kv, layer) byte strides of a contiguous pool buffer of this shape."""
        slot = num_kv_heads * head_dim * item_size
        kv = (capacity + 1) * slot
        return slot, kv, 2 * kv

    @classmethod
    def create(
        cls,
        base_ptr: int,
        num_layers: int,
        capacity: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: str,
        item_size: int,
        device: str = "cpu",
    ) -> KVLayout:
        """A layout with the strides of a contiguous pool of this shape."""
        slot, kv, layer = cls.implied_strides(
            num_layers, capacity, num_kv_heads, head_dim, item_size
        )
        return cls(
            base_ptr, num_layers, capacity, num_kv_heads, head_dim, dtype, item_size,
            slot, kv, layer, device,
        )  # fmt: skip

    @classmethod
    def of(cls, pool: Any) -> KVLayout:
        """The layout of a ``KVPool`` (anything with a torch ``buffer`` of the pool's shape)."""
        buffer = pool.buffer
        if len(buffer.shape) != 5 or buffer.shape[1] != 2:
            raise ValueError(
                f"a KV pool buffer is [layers, 2, capacity + 1, kv_heads, head_dim], "
                f"got shape {tuple(buffer.shape)}"
            )
        if not buffer.is_contiguous():
            raise ValueError("the KV pool buffer is not contiguous; its slots cannot be planned")
        num_layers, _, slots, num_kv_heads, head_dim = (int(d) for d in buffer.shape)
        item_size = int(buffer.element_size())
        layout = cls.create(
            base_ptr=int(buffer.data_ptr()),
            num_layers=num_layers,
            capacity=slots - 1,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            dtype=str(buffer.dtype).removeprefix("torch."),
            item_size=item_size,
            device=str(buffer.device),
        )
        # the tensor's own strides must agree with the ones the plan will use
        tensor_strides = tuple(int(s) * item_size for s in buffer.stride()[:3])
        if tensor_strides != (layout.layer_stride, layout.kv_stride, layout.slot_stride):
            raise ValueError(f"unexpected KV pool strides {tensor_strides}")
        return layout

    @property
    def nbytes(self) -> int:
        """The whole pool buffer, padding slot included: what to register with an engine."""
        return self.num_layers * self.layer_stride

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/msgpack-able fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVLayout:
        """Inverse of ``to_dict``; ValueError naming what is missing or wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"a KV layout must be an object, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data and n != "device"]
        if missing:
            raise ValueError(f"KV layout is missing field(s): {', '.join(missing)}")
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"KV layout has unknown field(s): {', '.join(unknown)}")
        return cls(**data)

    def check_compatible(self, decode: KVLayout) -> None:
        """Raise ``KVLayoutMismatch`` unless this (prefill) pool's KV can be written into
        ``decode``'s: same layers, KV heads, head dim and dtype. Capacity may differ."""
        mismatches = [
            f"{name}: prefill {getattr(self, name)} != decode {getattr(decode, name)}"
            for name in ("num_layers", "num_kv_heads", "head_dim", "dtype", "item_size")
            if getattr(self, name) != getattr(decode, name)
        ]
        if mismatches:
            raise KVLayoutMismatch(
                "the prefill and decode KV pools are incompatible (" + "; ".join(mismatches) + ")"
            )


class TransferPlan(NamedTuple):
    """Byte ranges for ``TransferEngine.write``: int64 numpy arrays of equal length."""

    src_ptrs: np.ndarray
    dst_ptrs: np.ndarray
    lengths: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.lengths.sum())

    def as_lists(self) -> tuple[list[int], list[int], list[int]]:
        """Python ints, as the engines' bindings take them."""
        return self.src_ptrs.tolist(), self.dst_ptrs.tolist(), self.lengths.tolist()


def _slot_array(slots: Any, layout: KVLayout, side: str) -> np.ndarray:
    array = np.asarray(slots)
    if array.ndim != 1:
        raise ValueError(f"{side} slots must be one-dimensional, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{side} slots must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if array.size and (array.min() < 1 or array.max() > layout.capacity):
        bad = array[(array < 1) | (array > layout.capacity)][0]
        raise ValueError(f"{side} slot {int(bad)} is outside the pool's slots 1..{layout.capacity}")
    return array


def transfer_plan(src: KVLayout, src_slots: Any, dst: KVLayout, dst_slots: Any) -> TransferPlan:
    """The byte ranges that copy token i's K and V, every layer, from ``src_slots[i]`` of the
    ``src`` pool to ``dst_slots[i]`` of the ``dst`` pool.

    Tokens whose slots run consecutively on both sides share one range per layer and K/V, so
    a request in contiguous slots costs ``num_layers * 2`` ranges. Ranges are ordered layer,
    then K before V, then token. Raises ``ValueError`` for slot lists of different lengths,
    slots outside ``1..capacity``, a destination slot given twice, and ``KVLayoutMismatch`` for
    incompatible layouts.
    """
    src.check_compatible(dst)
    s = _slot_array(src_slots, src, "source")
    d = _slot_array(dst_slots, dst, "destination")
    if len(s) != len(d):
        raise ValueError(f"{len(s)} source slots but {len(d)} destination slots")
    empty = np.zeros(0, dtype=np.int64)
    if len(s) == 0:
        return TransferPlan(empty, empty, empty)
    if len(np.unique(d)) != len(d):
        raise ValueError("a destination slot appears twice: two tokens would overwrite each other")

    # A run breaks wherever either side's next slot is not this one's + 1.
    breaks = np.flatnonzero((np.diff(s) != 1) | (np.diff(d) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    run_tokens = np.diff(np.concatenate((starts, [len(s)])))

    row = src.slot_stride  # == dst.slot_stride: same heads, head_dim and item size
    # (layer, K/V) block offsets as a column, run offsets as a row: one broadcast per side
    blocks = np.arange(src.num_layers * 2, dtype=np.int64)
    layer, kv = blocks // 2, blocks % 2
    src_blocks = src.base_ptr + layer * src.layer_stride + kv * src.kv_stride
    dst_blocks = dst.base_ptr + layer * dst.layer_stride + kv * dst.kv_stride
    src_ptrs = (src_blocks[:, None] + (s[starts] * row)[None, :]).ravel()
    dst_ptrs = (dst_blocks[:, None] + (d[starts] * row)[None, :]).ravel()
    lengths = np.tile(run_tokens * row, len(blocks))
    return TransferPlan(src_ptrs, dst_ptrs, lengths)


def plan_bytes(layout: KVLayout, n_tokens: int) -> int:
    """Bytes that move for ``n_tokens`` tokens: layers x 2 x tokens x kv_heads x head_dim x
    item size (issue 15's formula)."""
    return (
        layout.num_layers * 2 * n_tokens * layout.num_kv_heads * layout.head_dim * layout.item_size
    )


# ---- the first token ----------------------------------------------------------------------

FIRST_TOKEN_RECORD = struct.Struct("<QqdII")  # room, token id, logprob, flags, status (last)
_HAS_LOGPROB = 1


class FirstTokenStatus(enum.IntEnum):
    """What a first-token record says; a zeroed record is ``PENDING``."""

    PENDING = 0
    OK = 1
    FAILED = 2


class FailReason(enum.IntEnum):
    """Why the prefill side failed a room (carried in a FAILED record's flags)."""

    UNKNOWN = 0
    REFUSED = 1  # the request was refused or aborted on the prefill server
    PROMPT_MISMATCH = 2  # the decode side's prompt (or its length) differs from this side's
    TRANSFER_FAILED = 3  # the KV write failed
    CANCELLED = 4  # the decode side cancelled the room (an answer to its cancel)

    def explain(self) -> str:
        return {
            FailReason.UNKNOWN: "the prefill server failed to compute or send this request",
            FailReason.REFUSED: "the prefill server refused or aborted this request "
            "(its response says why)",
            FailReason.PROMPT_MISMATCH: "the prefill server got a different prompt for this "
            "bootstrap_room (the same body must go to both servers, and rooms must not be reused)",
            FailReason.TRANSFER_FAILED: "the prefill server could not write this request's KV "
            "cache here (see its log)",
            FailReason.CANCELLED: "this request was cancelled",
        }[self]


@dataclass(frozen=True)
class FirstToken:
    """The prefill side's outcome for one bootstrap room."""

    room: int
    status: FirstTokenStatus
    token_id: int = -1
    logprob: float | None = None
    reason: FailReason = FailReason.UNKNOWN  # of a FAILED record


def encode_first_token(token: FirstToken) -> bytes:
    """The 32-byte record for ``token``; ValueError when a field does not fit."""
    if not 0 <= token.room < 1 << 64:
        raise ValueError(f"bootstrap room {token.room} is not a 64-bit unsigned integer")
    if not -(1 << 63) <= token.token_id < 1 << 63:
        raise ValueError(f"token id {token.token_id} does not fit in 64 bits")
    status = FirstTokenStatus(token.status)
    flags = (0 if token.logprob is None else _HAS_LOGPROB) | FailReason(token.reason) << 8
    logprob = math.nan if token.logprob is None else float(token.logprob)
    return FIRST_TOKEN_RECORD.pack(token.room, token.token_id, logprob, flags, status)


def decode_first_token(data: bytes | bytearray | memoryview) -> FirstToken:
    """Inverse of ``encode_first_token``; ValueError for a record of the wrong size or status."""
    if len(data) != FIRST_TOKEN_RECORD.size:
        raise ValueError(
            f"a first-token record is {FIRST_TOKEN_RECORD.size} bytes, not {len(data)}"
        )
    room, token_id, logprob, flags, status = FIRST_TOKEN_RECORD.unpack(data)
    try:
        status = FirstTokenStatus(status)
    except ValueError:
        raise ValueError(f"first-token record has unknown status {status}") from None
    try:
        reason = FailReason((flags >> 8) & 0xFF)
    except ValueError:
        reason = FailReason.UNKNOWN  # a newer peer's reason: still a failure
    return FirstToken(room, status, token_id, logprob if flags & _HAS_LOGPROB else None, reason)


@dataclass(frozen=True)
class FirstTokenLayout:
    """Where a ``FirstTokenBuffer``'s records are in its process: plain data for the wire."""

    base_ptr: int
    num_records: int
    record_size: int = FIRST_TOKEN_RECORD.size

    def record_ptr(self, index: int) -> int:
        if not 0 <= index < self.num_records:
            raise ValueError(f"first-token record {index} is outside 0..{self.num_records - 1}")
        return self.base_ptr + index * self.record_size

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FirstTokenLayout:
        layout = cls(**data)
        if layout.record_size != FIRST_TOKEN_RECORD.size:
            raise ValueError(
                f"peer's first-token records are {layout.record_size} bytes, "
                f"this side's {FIRST_TOKEN_RECORD.size}"
            )
        return layout


class FirstTokenBuffer:
    """``num_records`` first-token records in one numpy allocation, to register with an engine:
    the decode side's destination, or the prefill side's staging source."""

    def __init__(self, num_records: int) -> None:
        if num_records <= 0:
            raise ValueError(f"a first-token buffer needs at least one record, got {num_records}")
        self.num_records = num_records
        self.array = np.zeros(num_records * FIRST_TOKEN_RECORD.size, dtype=np.uint8)

    def layout(self) -> FirstTokenLayout:
        return FirstTokenLayout(int(self.array.ctypes.data), self.num_records)

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    def ptr(self, index: int) -> int:
        return self.layout().record_ptr(index)

    def _view(self, index: int) -> np.ndarray:
        self.layout().record_ptr(index)  # bounds check
        start = index * FIRST_TOKEN_RECORD.size
        return self.array[start : start + FIRST_TOKEN_RECORD.size]

    def put(self, index: int, token: FirstToken) -> None:
        """Write ``token`` into record ``index`` of this process's buffer."""
        self._view(index)[:] = np.frombuffer(encode_first_token(token), dtype=np.uint8)

    def get(self, index: int) -> FirstToken:
        return decode_first_token(self._view(index).tobytes())

    def clear(self, index: int) -> None:
        """Back to ``PENDING`` (room 0): done before the index is handed to a new request."""
        self._view(index)[:] = 0

    def plan(self, index: int, dst: FirstTokenLayout, dst_index: int) -> TransferPlan:
        """The one range that writes record ``index`` here into the peer's ``dst_index``."""
        return TransferPlan(
            np.array([self.ptr(index)], dtype=np.int64),
            np.array([dst.record_ptr(dst_index)], dtype=np.int64),
            np.array([FIRST_TOKEN_RECORD.size], dtype=np.int64),
        )

"""KV-cache events: the radix cache's page-level stores and removals on a ZMQ PUB socket.

Prefix-aware routers (llm-d's kv-cache indexer, NVIDIA Dynamo's KV indexer) keep a copy of
each server's cached prefixes from these events, so they can send a request to the replica
that already holds most of its prompt. The wire format is SGLang's / vLLM's:

- ``--kv-events-config`` takes SGLang's JSON (``KVEventsConfig``):
  ``{"publisher": "zmq", "endpoint": "tcp://*:5557", "topic": "", "replay_endpoint": null,
  "buffer_steps": 10000}`` (also ``hwm`` and ``max_queue_size``).
- Each ZMQ message has three frames: the topic, an 8-byte big-endian sequence number (0, 1, ...
  per publisher) and a msgpack payload ``[timestamp, [events...], dp_rank]``.
- Events are positional arrays: ``["BlockStored", block_hashes, parent_block_hash, token_ids,
  block_size, lora_id, medium]``, ``["BlockRemoved", block_hashes, medium]`` and
  ``["AllBlocksCleared"]``; ``lora_id`` is always None and ``medium`` ``"GPU"`` (vLLM's name
  for the engine's own KV pool, which indexers map to their device tier).

Blocks are pages of ``--page-size`` tokens, full pages only: page ``k`` of a cached sequence is
its tokens ``[kP, (k+1)P)``. Its hash chains over the whole prefix (as SGLang's
``get_hash_str``/``hash_str_to_int64``)::

    digest(k) = SHA-256(digest(k-1) || token ids of page k as uint32 little-endian)
    hash(k)   = first 8 bytes of digest(k), big-endian, as a signed int64

where the first page's parent digest is the empty byte string (SHA-256 over its tokens alone),
and its ``parent_block_hash`` is None. ``block_hashes`` are these int64s.

The radix cache reports pages through ``RadixEventRecorder`` (the cache's listener): on the
scheduler thread it only appends small records (opaque page handles, a copy of the new pages'
token ids) to a queue. ``KVEventPublisher``'s thread computes the hashes, encodes and sends,
and keeps the last ``buffer_steps`` batches for replay: a ROUTER socket answers a request
``[identity, b"", start_seq]`` (8 bytes big-endian) with ``[identity, b"", seq, payload]`` for
every buffered batch whose ``seq >= start_seq``, then ``[identity, b"", seq=-1, b""]`` (as
SGLang's and vLLM's ``ZmqEventPublisher``; a DEALER sends ``[b"", start_seq]``).

Data-parallel replicas: replica ``r`` publishes with ``dp_rank = r`` on the endpoint's port
plus ``r`` (``tcp://*:5557`` -> ``tcp://*:5558`` for replica 1; the replay endpoint likewise;
``ipc://`` / ``inproc://`` endpoints get ``_dp<r>`` appended), SGLang's rule. As in SGLang, an
endpoint with ``*``, ``::``, ``ipc://`` or ``inproc://`` is bound, any other is connected to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

MEDIUM = "GPU"  # vLLM's name for the engine's own KV pool; indexers map it to their device tier
END_SEQ = (-1).to_bytes(8, "big", signed=True)  # replay: "no more batches"
ROOT_PARENT_DIGEST = b""  # the first page of a sequence hashes its tokens alone


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KVEventsConfig:
    """SGLang's ``--kv-events-config`` (same keys, same defaults); see the module docstring."""

    publisher: str = "null"  # "zmq" publishes; "null" turns events off
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000  # batches kept for replay
    hwm: int = 100_000  # ZMQ send high-water mark (messages a slow subscriber may lag)
    max_queue_size: int = 100_000  # event records queued for the publisher thread
    topic: str = ""

    @classmethod
    def from_json(cls, text: str) -> KVEventsConfig:
        """Parse and validate the JSON; raise ValueError saying what is wrong."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--kv-events-config is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError("--kv-events-config must be a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ValueError(
                f"--kv-events-config: unknown key(s) {', '.join(unknown)} "
                f"(known: {', '.join(known)})"
            )
        for key, value in raw.items():
            if key in ("buffer_steps", "hwm", "max_queue_size"):
                ok = isinstance(value, int) and not isinstance(value, bool)
                want = "an integer"
            elif key == "replay_endpoint":
                ok, want = value is None or isinstance(value, str), "a string or null"
            else:
                ok, want = isinstance(value, str), "a string"
            if not ok:
                raise ValueError(f"--kv-events-config: {key} must be {want}, got {value!r}")
        config = cls(**raw)
        config.validate()
        return config

    def validate(self) -> None:
        if self.publisher not in ("zmq", "null"):
            raise ValueError(
                f"--kv-events-config: publisher must be 'zmq' or 'null', got {self.publisher!r}"
            )
        for key in ("endpoint", "replay_endpoint"):
            ep = getattr(self, key)
            if ep is not None and not ep.startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(
                    f"--kv-events-config: {key} must start with tcp://, ipc:// or inproc://, "
                    f"got {ep!r}"
                )
            if ep is not None and ep.startswith("tcp://"):
                _tcp_port(ep, key)
        for key in ("buffer_steps", "hwm", "max_queue_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"--kv-events-config: {key} must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.publisher == "zmq"


def parse_kv_events_config(text: str | None) -> KVEventsConfig | None:
    """``None`` for no flag; else the validated config (ValueError on bad input)."""
    if text is None or not text.strip():
        return None
    return KVEventsConfig.from_json(text)


def advertised(text: str | None, page_size: int, dp_size: int) -> dict | None:
    """What ``/server_info`` says under ``kv_events``: where each replica publishes (None when
    events are off), so an indexer can be pointed at them."""
    config = parse_kv_events_config(text)
    if config is None or not config.enabled:
        return None
    return {
        "publisher": config.publisher,
        "topic": config.topic,
        "block_size": page_size,
        "endpoints": [offset_endpoint(config.endpoint, r) for r in range(dp_size)],
        "replay_endpoints": [offset_endpoint(config.replay_endpoint, r) for r in range(dp_size)]
        if config.replay_endpoint
        else None,
    }


def _tcp_port(endpoint: str, key: str = "endpoint") -> int:
    host_port = endpoint.removeprefix("tcp://")
    _, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--kv-events-config: {key} {endpoint!r} needs a port (tcp://HOST:PORT)")
    return int(port)


def offset_endpoint(endpoint: str | None, dp_rank: int) -> str | None:
    """The endpoint replica ``dp_rank`` uses: tcp port + rank; ipc/inproc get ``_dp<rank>``."""
    if endpoint is None or dp_rank == 0:
        return endpoint
    if endpoint.startswith("tcp://"):
        base, _, _ = endpoint.rpartition(":")
        return f"{base}:{_tcp_port(endpoint) + dp_rank}"
    return f"{endpoint}_dp{dp_rank}"


def _binds(endpoint: str) -> bool:
    """SGLang's rule: wildcard / ipc / inproc endpoints are bound; others are connected to."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


# --- hashing ---------------------------------------------------------------------------------


def block_digest(parent_digest: bytes, token_ids: Sequence[int] | np.ndarray) -> bytes:
    """SHA-256 over the parent's digest and the page's token ids as uint32 little-endian."""
    data = np.asarray(token_ids, dtype=np.int64).astype("<u4").tobytes()
    return hashlib.sha256(parent_digest + data).digest()


def digest_to_hash(digest: bytes) -> int:
    """The event block hash: the digest's first 8 bytes, big-endian, as a signed int64."""
    return int.from_bytes(digest[:8], "big", signed=True)


def block_hashes(token_ids: Sequence[int], page_size: int) -> list[int]:
    """The hashes of every full page of ``token_ids`` (a reference for tests and clients)."""
    out: list[int] = []
    digest = ROOT_PARENT_DIGEST
    for start in range(0, len(token_ids) - page_size + 1, page_size):
        digest = block_digest(digest, token_ids[start : start + page_size])
        out.append(digest_to_hash(digest))
    return out


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockStored:
    """Full pages newly cached, in order; ``parent_block_hash`` is the page before the first."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = MEDIUM

    def to_wire(self) -> list[Any]:
        return [
            "BlockStored",
            self.block_hashes,
            self.parent_block_hash,
            self.token_ids,
            self.block_size,
            self.lora_id,
            self.medium,
        ]


@dataclass(frozen=True)
class BlockRemoved:
    """Pages no longer cached."""

    block_hashes: list[int]
    medium: str | None = MEDIUM

    def to_wire(self) -> list[Any]:
        return ["BlockRemoved", self.block_hashes, self.medium]


@dataclass(frozen=True)
class AllBlocksCleared:
    """The whole cache was flushed."""

    def to_wire(self) -> list[Any]:
        return ["AllBlocksCleared"]


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


def encode_batch(ts: float, events: Iterable[KVEvent], dp_rank: int) -> bytes:
    """The msgpack payload ``[ts, [events...], dp_rank]``."""
    import msgpack

    return msgpack.packb([float(ts), [e.to_wire() for e in events], dp_rank], use_bin_type=True)


def decode_batch(payload: bytes) -> tuple[float, list[KVEvent], int | None]:
    """Inverse of ``encode_batch`` (for tests and tools)."""
    import msgpack

    ts, raw, dp_rank = msgpack.unpackb(payload, raw=False)
    events: list[KVEvent] = []
    for e in raw:
        if e[0] == "BlockStored":
            events.append(BlockStored(*e[1:]))
        elif e[0] == "BlockRemoved":
            events.append(BlockRemoved(*e[1:]))
        elif e[0] == "AllBlocksCleared":
            events.append(AllBlocksCleared())
        else:
            raise ValueError(f"unknown KV event {e[0]!r}")
    return ts, events, dp_rank


# --- the radix cache's listener --------------------------------------------------------------


class Page:
    """An opaque handle the radix cache keeps per cached full page; the publisher thread fills
    in its digest and hash when it serialises the store (records are handled in order, so a
    page is hashed before any later record refers to it)."""

    __slots__ = ("digest", "hash")

    def __init__(self) -> None:
        self.digest: bytes | None = None
        self.hash: int | None = None


class RadixEventRecorder:
    """What ``RadixCache`` calls (its event listener): each call appends one record to ``put``.

    Runs on the scheduler thread, so it only allocates page handles and copies token ids;
    ``EventSerializer`` turns the records into events elsewhere.
    """

    def __init__(self, page_size: int, put: Callable[[tuple], None]):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self._put = put

    def on_stored(self, parent: Page | None, token_ids: np.ndarray) -> list[Page]:
        """Full pages ``token_ids`` (a multiple of ``page_size`` tokens) were cached after
        ``parent`` (None: they start the sequence); returns one handle per page."""
        pages = [Page() for _ in range(len(token_ids) // self.page_size)]
        self._put(("stored", parent, np.array(token_ids, dtype=np.int64), pages))
        return pages

    def on_removed(self, pages: list[Page]) -> None:
        """These pages are no longer cached."""
        self._put(("removed", pages))

    def on_cleared(self) -> None:
        """Everything was flushed."""
        self._put(("cleared",))


class EventSerializer:
    """Turns ``RadixEventRecorder`` records into events (hashing the stored pages), in order."""

    def __init__(self, page_size: int):
        self.page_size = page_size

    def event(self, record: tuple) -> KVEvent:
        kind = record[0]
        if kind == "stored":
            _, parent, tokens, pages = record
            p = self.page_size
            digest = ROOT_PARENT_DIGEST if parent is None else parent.digest
            assert digest is not None, "a parent page must be stored before its children"
            for i, page in enumerate(pages):
                digest = block_digest(digest, tokens[i * p : (i + 1) * p])
                page.digest, page.hash = digest, digest_to_hash(digest)
            return BlockStored(
                block_hashes=[page.hash for page in pages],
                parent_block_hash=None if parent is None else parent.hash,
                token_ids=tokens.tolist(),
                block_size=p,
            )
        if kind == "removed":
            return BlockRemoved([page.hash for page in record[1]])
        if kind == "cleared":
            return AllBlocksCleared()
        raise ValueError(f"unknown event record {kind!r}")


# --- the publisher ---------------------------------------------------------------------------

_STOP = ("stop",)
_MAX_EVENTS_PER_BATCH = 1024


class KVEventPublisher:
    """A ZMQ PUB (and optional ROUTER replay) publisher fed by its own ``listener``.

    Give ``listener`` to the radix cache (``set_event_listener``); a daemon thread batches
    every record queued since its last send into one message. Sockets are bound or connected
    here, so a bad or busy endpoint fails at start-up. ``clock`` stamps batches (tests pin it).
    """

    def __init__(
        self,
        config: KVEventsConfig,
        page_size: int,
        dp_rank: int = 0,
        clock: Callable[[], float] = time.time,
    ):
        import zmq

        self.config = config
        self.dp_rank = dp_rank
        self.endpoint = offset_endpoint(config.endpoint, dp_rank)
        self.replay_endpoint = offset_endpoint(config.replay_endpoint, dp_rank)
        self._clock = clock
        self._topic = config.topic.encode()
        self._queue: queue.Queue[tuple] = queue.Queue(maxsize=config.max_queue_size)
        # A full queue blocks the scheduler (as SGLang's): events are never silently dropped.
        self.listener = RadixEventRecorder(page_size, self._queue.put)
        self._serializer = EventSerializer(page_size)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._seq = 0
        self._ctx = zmq.Context()
        self._replay = None
        try:
            self._pub = self._ctx.socket(zmq.PUB)
            self._pub.set_hwm(config.hwm)
            assert self.endpoint is not None
            if _binds(self.endpoint):
                self._pub.bind(self.endpoint)
            else:
                self._pub.connect(self.endpoint)
            if self.replay_endpoint is not None:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.bind(self.replay_endpoint)
        except zmq.ZMQError as e:
            self._close_sockets()
            raise RuntimeError(f"KV events: cannot open {self.endpoint}: {e}") from e
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()
        logger.info(
            "publishing KV events on %s (dp_rank %d, page size %d%s)",
            self.endpoint,
            dp_rank,
            page_size,
            f", replay on {self.replay_endpoint}" if self.replay_endpoint else "",
        )

    @property
    def sequence(self) -> int:
        """The next batch's sequence number (batches sent so far)."""
        return self._seq

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued, stop the thread and close the sockets."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)
        self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in (getattr(self, "_pub", None), self._replay):
            if sock is not None:
                sock.close(linger=200)
        self._ctx.term()

    def _run(self) -> None:
        while True:
            if self._replay is not None:
                try:
                    while self._replay.poll(0):
                        self._serve_replay()
                except Exception:
                    logger.exception("KV events: replay request failed")
            try:
                record = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            records = [record]
            while len(records) < _MAX_EVENTS_PER_BATCH:
                try:
                    records.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(r is _STOP for r in records)
            events = [self._serializer.event(r) for r in records if r is not _STOP]
            if events:
                try:
                    self._send(events)
                except Exception:
                    logger.exception("KV events: publishing failed")
            if stop:
                return

    def _send(self, events: list[KVEvent]) -> None:
        seq = self._seq
        payload = encode_batch(self._clock(), events, self.dp_rank)
        self._pub.send_multipart([self._topic, seq.to_bytes(8, "big"), payload])
        self._buffer.append((seq, payload))
        self._seq = seq + 1

    def _serve_replay(self) -> None:
        import zmq

        assert self._replay is not None
        frames = self._replay.recv_multipart(zmq.NOBLOCK)
        if len(frames) != 3 or len(frames[2]) != 8:
            logger.warning(
                "KV events: ignoring a malformed replay request (%d frames)", len(frames)
            )
            return
        identity, _, start = frames
        start_seq = int.from_bytes(start, "big")
        for seq, payload in list(self._buffer):
            if seq >= start_seq:
                self._replay.send_multipart([identity, b"", seq.to_bytes(8, "big"), payload])
        self._replay.send_multipart([identity, b"", END_SEQ, b""])


def create_kv_event_publisher(args: Any, dp_rank: int = 0) -> KVEventPublisher | None:
    """Replica ``dp_rank``'s publisher from its ``ServerArgs`` (None when events are off)."""
    config = parse_kv_events_config(getattr(args, "kv_events_config", None))
    if config is None or not config.enabled:
        return None
    return KVEventPublisher(config, args.page_size, dp_rank=dp_rank)

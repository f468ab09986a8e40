"""KV-cache events: config parsing, the page hash chain, the exact ZMQ frames, the radix cache's
page bookkeeping (property-tested), replay, and NVIDIA Dynamo's real KV indexer fed by a real
smallm server."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from smallm.lang.backends.runtime import free_port
from smallm.runtime.cache.radix_cache import RadixCache, TreeNode, create_prefix_cache
from smallm.runtime.config import ServerArgs
from smallm.runtime.server.kv_events import (
    END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventSerializer,
    KVEventPublisher,
    KVEventsConfig,
    RadixEventRecorder,
    block_hashes,
    create_kv_event_publisher,
    decode_batch,
    offset_endpoint,
)
from smallm.runtime.server.router import stop_process_groups

TS = 1700000000.5  # the pinned clock of the golden tests

# --- an independent reference for the hash chain ---------------------------------------------


def reference_hashes(tokens: list[int], page_size: int) -> list[int]:
    """SGLang's get_hash_str / hash_str_to_int64, written out again: hex digests chained from
    no prior digest, the first 16 hex digits as a signed 64-bit number."""
    out, prior = [], None
    for start in range(0, len(tokens) // page_size * page_size, page_size):
        h = hashlib.sha256()
        if prior:
            h.update(bytes.fromhex(prior))
        for t in tokens[start : start + page_size]:
            h.update(t.to_bytes(4, byteorder="little", signed=False))
        prior = h.hexdigest()
        value = int(prior[:16], 16)
        out.append(value - 2**64 if value >= 2**63 else value)
    return out


def test_hash_chain_matches_an_independent_computation():
    rng = np.random.default_rng(0)
    for page_size in (1, 2, 4, 16):
        tokens = rng.integers(0, 200_000, size=70).tolist()
        assert block_hashes(tokens, page_size) == reference_hashes(tokens, page_size)
    # Pinned: the first page [1, 2] hashes SHA-256(01000000 02000000) alone.
    assert block_hashes([1, 2, 3, 4], 2) == [3817746824117602890, -4216701448867210342]
    assert block_hashes([1], 2) == []  # partial pages are never blocks


# --- configuration ---------------------------------------------------------------------------


def test_config_parses_sglang_json_and_rejects_bad_input():
    c = KVEventsConfig.from_json(
        '{"publisher": "zmq", "endpoint": "tcp://*:5557", "topic": "", '
        '"replay_endpoint": null, "buffer_steps": 10000}'
    )
    assert (c.publisher, c.endpoint, c.topic, c.replay_endpoint, c.buffer_steps) == (
        "zmq",
        "tcp://*:5557",
        "",
        None,
        10000,
    )
    bad = {
        "{": "not valid JSON",
        "[1]": "must be a JSON object",
        '{"publisher": "zmq", "port": 1}': "unknown key(s) port",
        '{"publisher": "kafka"}': "publisher must be 'zmq' or 'null'",
        '{"buffer_steps": "many"}': "buffer_steps must be an integer",
        '{"buffer_steps": 0}': "buffer_steps must be >= 1",
        '{"endpoint": "tcp://*"}': "needs a port",
        '{"endpoint": "http://x:1"}': "must start with tcp://",
        '{"replay_endpoint": 5}': "replay_endpoint must be a string or null",
    }
    for text, message in bad.items():
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            ServerArgs(kv_events_config=text)
    with pytest.raises(ValueError, match="--page-size"):
        ServerArgs(page_size=0)
    assert ServerArgs().page_size == 1 and ServerArgs().kv_events_config is None


def test_cli_flags_reach_server_args():
    import argparse

    p = argparse.ArgumentParser()
    ServerArgs.add_cli_args(p)
    ns = p.parse_args(["--page-size", "16", "--kv-events-config", '{"publisher": "zmq"}'])
    args = ServerArgs.from_cli_args(ns)
    assert args.page_size == 16 and json.loads(args.kv_events_config) == {"publisher": "zmq"}


def test_replica_endpoint_rule():
    assert offset_endpoint("tcp://*:5557", 0) == "tcp://*:5557"
    assert offset_endpoint("tcp://*:5557", 3) == "tcp://*:5560"
    assert offset_endpoint("tcp://[::1]:5557", 1) == "tcp://[::1]:5558"
    assert offset_endpoint("ipc:///tmp/ev", 2) == "ipc:///tmp/ev_dp2"
    assert offset_endpoint(None, 2) is None


# --- zero cost when off ----------------------------------------------------------------------


def test_no_listener_when_events_are_off():
    assert create_kv_event_publisher(ServerArgs()) is None
    assert create_kv_event_publisher(ServerArgs(kv_events_config='{"publisher": "null"}')) is None
    cache = create_prefix_cache(False, lambda slots: None)
    assert isinstance(cache, RadixCache) and cache._events is None
    cache.insert(list(range(40)), list(range(40)))
    cache.insert([*range(20), 99, 98], list(range(22)))  # a split and a new leaf
    assert all(n.pages is None for n in cache._nodes())


def test_listener_only_on_an_empty_cache():
    cache = RadixCache(lambda slots: None)
    cache.insert([1, 2], [0, 1])
    with pytest.raises(RuntimeError, match="before anything is cached"):
        cache.set_event_listener(RadixEventRecorder(1, lambda r: None))


# --- golden frames through the real publisher ------------------------------------------------


class Subscriber:
    """A SUB socket on a publisher's endpoint that waits until the subscription is live."""

    def __init__(self, ctx: zmq.Context, port: int):
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.RCVTIMEO, 5000)
        self.sock.connect(f"tcp://127.0.0.1:{port}")

    def recv(self) -> list[bytes]:
        return self.sock.recv_multipart()

    def close(self) -> None:
        self.sock.close(linger=0)


def _wait_for_subscriber(publisher: KVEventPublisher, sub: Subscriber) -> None:
    """PUB drops messages until the SUB's subscription arrives (the slow-joiner problem):
    send probe batches (AllBlocksCleared on an empty cache) until one is received."""
    sub.sock.setsockopt(zmq.RCVTIMEO, 100)
    for _ in range(100):
        publisher.listener.on_cleared()
        try:
            sub.recv()
            break
        except zmq.Again:
            continue
    else:
        raise AssertionError("the subscription never became live")
    time.sleep(0.2)
    while True:  # drain probes still in flight
        try:
            sub.recv()
        except zmq.Again:
            break
    sub.sock.setsockopt(zmq.RCVTIMEO, 5000)


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.term()


def test_golden_frames(zctx):
    port = free_port()
    config = KVEventsConfig(publisher="zmq", endpoint=f"tcp://*:{port}", topic="kv")
    pub = KVEventPublisher(config, page_size=4, clock=lambda: TS)
    sub = Subscriber(zctx, port)
    try:
        _wait_for_subscriber(pub, sub)
        first_seq = pub.sequence
        cache = RadixCache(lambda slots: None)
        cache.set_event_listener(pub.listener)
        frames = []

        def step(op):
            op()
            frames.append(sub.recv())

        a = list(range(1, 11))  # 10 tokens: pages [1..4], [5..8]; 9, 10 are a partial page
        b = [1, 2, 3, 4, 5, 6, 20, 21, 22]  # shares 6 tokens: splits a's edge inside page 1
        step(lambda: cache.insert(a, range(10)))
        step(lambda: cache.insert(b, range(100, 109)))
        step(lambda: cache.evict(1))  # LRU leaf: a's tail [7..10] holds the end of page 1
        step(cache.flush)
        sub.sock.setsockopt(zmq.RCVTIMEO, 300)
        with pytest.raises(zmq.Again):  # nothing else was sent
            sub.recv()
    finally:
        sub.close()
        pub.close()

    h_a = reference_hashes(a, 4)
    h_b = reference_hashes(b, 4)
    assert h_a[0] == h_b[0] and h_a[1] != h_b[1]
    expected = [
        [["BlockStored", h_a, None, a[:8], 4, None, "GPU"]],
        [["BlockStored", [h_b[1]], h_b[0], b[4:8], 4, None, "GPU"]],
        [["BlockRemoved", [h_a[1]], "GPU"]],
        [["AllBlocksCleared"]],
    ]
    for i, (frame, events) in enumerate(zip(frames, expected, strict=True)):
        assert len(frame) == 3
        topic, seq, payload = frame
        assert topic == b"kv"
        assert seq == (first_seq + i).to_bytes(8, "big")
        assert msgpack.unpackb(payload) == [TS, events, 0]
    # The raw bytes of the smallest message: [1700000000.5, [["AllBlocksCleared"]], 0].
    assert frames[3][2] == bytes.fromhex(
        "93cb41d954fc402000009191b0" + b"AllBlocksCleared".hex() + "00"
    )
    # And of a one-page store with block size 2 (the pinned hash of [1, 2], unsigned on the
    # wire as msgpack writes non-negative ints, as SGLang's msgspec does).
    from smallm.runtime.server.kv_events import encode_batch

    stored = BlockStored(block_hashes([1, 2], 2), None, [1, 2], 2)
    assert encode_batch(TS, [stored], 0) == bytes.fromhex(
        "93cb41d954fc40200000"
        "91"
        "97"
        "ab" + b"BlockStored".hex() + "91cf34fb5c825de7ca4a"
        "c0"
        "920102"
        "02"
        "c0"
        "a3" + b"GPU".hex() + "00"
    )
    assert decode_batch(frames[2][2]) == (TS, [BlockRemoved([h_a[1]])], 0)


def free_port_pair() -> int:
    """A free port whose successor is free too (replica 1 publishes on port + 1). Probed with a
    plain socket: its close is synchronous (a ZMQ socket's is not, so the port could still be
    held when the publisher binds)."""
    while True:
        base = free_port()
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            probe.bind(("0.0.0.0", base + 1))
            return base
        except OSError:
            continue
        finally:
            probe.close()


def test_replica_rank_offsets_port_and_payload(zctx):
    base = free_port_pair()
    args = SimpleNamespace(
        kv_events_config=json.dumps({"publisher": "zmq", "endpoint": f"tcp://*:{base}"}),
        page_size=2,
    )
    pub = create_kv_event_publisher(args, dp_rank=1)
    assert pub is not None and pub.endpoint == f"tcp://*:{base + 1}"
    sub = Subscriber(zctx, base + 1)
    try:
        _wait_for_subscriber(pub, sub)
        cache = RadixCache(lambda slots: None)
        cache.set_event_listener(pub.listener)
        cache.insert([5, 6, 7], [0, 1, 2])
        _, events, dp_rank = decode_batch(sub.recv()[2])
        assert dp_rank == 1
        assert events == [BlockStored(reference_hashes([5, 6], 2), None, [5, 6], 2)]
    finally:
        sub.close()
        pub.close()


def test_busy_endpoint_fails_at_start_up(zctx):
    port = free_port()
    taken = zctx.socket(zmq.PUB)
    taken.bind(f"tcp://*:{port}")
    try:
        config = KVEventsConfig(publisher="zmq", endpoint=f"tcp://*:{port}")
        with pytest.raises(RuntimeError, match=f"KV events: cannot open tcp://\\*:{port}"):
            KVEventPublisher(config, page_size=1)
    finally:
        taken.close(linger=0)


# --- replay ----------------------------------------------------------------------------------


def test_replay_answers_buffered_batches_from_a_sequence(zctx):
    port, replay_port = free_port(), free_port()
    config = KVEventsConfig(
        publisher="zmq",
        endpoint=f"tcp://*:{port}",
        replay_endpoint=f"tcp://*:{replay_port}",
        buffer_steps=4,
    )
    pub = KVEventPublisher(config, page_size=1, clock=lambda: TS)
    dealer = zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVTIMEO, 5000)
    dealer.connect(f"tcp://127.0.0.1:{replay_port}")
    try:
        cache = RadixCache(lambda slots: None)
        cache.set_event_listener(pub.listener)
        for i in range(6):  # six batches, one insert each (no subscriber: PUB drops them)
            cache.insert([i], [i])
            deadline = time.monotonic() + 5
            while pub.sequence < i + 1 and time.monotonic() < deadline:
                time.sleep(0.005)
        assert pub.sequence == 6

        def replay(start: int) -> list[tuple[int, bytes]]:
            dealer.send_multipart([b"", start.to_bytes(8, "big")])
            got = []
            while True:
                empty, seq, payload = dealer.recv_multipart()
                assert empty == b""
                if seq == END_SEQ:
                    assert payload == b""
                    return got
                got.append((int.from_bytes(seq, "big"), payload))

        got = replay(3)
        assert [s for s, _ in got] == [3, 4, 5]
        for s, payload in got:
            assert decode_batch(payload) == (
                TS,
                [BlockStored(reference_hashes([s], 1), None, [s], 1)],
                0,
            )
        assert [s for s, _ in replay(0)] == [2, 3, 4, 5]  # only the last buffer_steps kept
        assert replay(6) == []
    finally:
        dealer.close(linger=0)
        pub.close()


# --- the radix cache's page mapping, property-tested ----------------------------------------


def cached_page_hashes(cache: RadixCache, page_size: int) -> set[int]:
    """Hashes of every full page of every cached sequence, computed from the tree itself."""
    out: set[int] = set()
    stack: list[tuple[TreeNode, list[int]]] = [(cache.root, [])]
    while stack:
        node, prefix = stack.pop()
        if node is not cache.root and node.is_leaf:
            out.update(reference_hashes(prefix, page_size))
        for child in node.children.values():
            stack.append((child, prefix + child.key.tolist()))
    return out


ops = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.lists(st.integers(0, 3), min_size=1, max_size=14)),
        st.tuples(st.just("match"), st.lists(st.integers(0, 3), min_size=1, max_size=14)),
        st.tuples(st.just("evict"), st.integers(1, 12)),
        st.tuples(st.just("lock_evict"), st.lists(st.integers(0, 3), min_size=1, max_size=14)),
        st.tuples(st.just("flush"), st.none()),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(page_size=st.integers(1, 5), ops=ops)
def test_events_track_exactly_the_cached_full_pages(page_size, ops):
    records: list[tuple] = []
    cache = RadixCache(lambda slots: None)
    cache.set_event_listener(RadixEventRecorder(page_size, records.append))
    serializer = EventSerializer(page_size)
    live: set[int] = set()
    slot = 0
    for kind, arg in ops:
        if kind == "insert":
            cache.insert(arg, range(slot, slot + len(arg)))
            slot += len(arg)
        elif kind == "match":
            cache.match_prefix(arg)
        elif kind == "evict":
            cache.evict(arg)
        elif kind == "lock_evict":  # eviction around a locked prefix
            node = cache.match_prefix(arg).node
            cache.lock(node)
            cache.evict(1000)
            if node is not cache.root:
                assert not cache.flush()  # refused while locked: no event
            cache.unlock(node)
        else:
            assert cache.flush()
        for record in records:
            event = serializer.event(record)
            if isinstance(event, BlockStored):
                assert event.block_size == page_size
                assert len(event.token_ids) == page_size * len(event.block_hashes) > 0
                # The parent is live (or the pages start the sequence), as indexers require.
                assert event.parent_block_hash is None or event.parent_block_hash in live
                for h in event.block_hashes:
                    assert h not in live, "a live page was announced again"
                    live.add(h)
            elif isinstance(event, BlockRemoved):
                assert event.block_hashes and set(event.block_hashes) <= live
                live.difference_update(event.block_hashes)
            else:
                assert isinstance(event, AllBlocksCleared)
                live.clear()
        records.clear()
        assert live == cached_page_hashes(cache, page_size), (kind, arg, cache.pretty())


# --- NVIDIA Dynamo's KV indexer on a real smallm server --------------------------------------

PAGE = 4


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


class DynamoIndexer:
    """``python -m dynamo.indexer`` subscribed to one worker (id 1) at ``zmq_url``; ``workers``
    replaces that with Dynamo's own ``id[:dp_rank]=url,...`` list."""

    def __init__(self, zmq_url: str, block_size: int, workers: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            *("-m", "dynamo.indexer", "--block-size", str(block_size)),
            *(
                "--port",
                str(self.port),
                "--workers",
                workers or f"1={zmq_url}",
                "--model-name",
                "m",
            ),
        ]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.matched([1])
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError("the Dynamo indexer did not start") from None
                time.sleep(0.2)

    def matched(self, token_ids: list[int]) -> int:
        """Worker 1's ``longest_matched`` for the query (Dynamo counts it in tokens, whole
        blocks only); 0 when the worker holds nothing of it."""
        answer = _post(self.url + "/query", {"token_ids": token_ids, "model_name": "m"})
        return answer["instances"].get("1", {}).get("longest_matched", 0)

    def wait_for(self, token_ids: list[int], want: int, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        while (got := self.matched(token_ids)) != want and time.monotonic() < deadline:
            time.sleep(0.05)
        return got

    def close(self) -> None:
        stop_process_groups([self.proc], grace=10.0)


@pytest.fixture(scope="module")
def events_server(tiny_chat_model_dir):
    from server_process import ServerProcess

    ev_port = free_port()
    config = {"publisher": "zmq", "endpoint": f"tcp://*:{ev_port}", "topic": ""}
    flags = ["--page-size", str(PAGE), "--kv-events-config", json.dumps(config)]
    flags += ["--max-total-tokens", "200", "--max-running-requests", "4"]
    with ServerProcess(tiny_chat_model_dir, *flags) as server:
        indexer = DynamoIndexer(f"tcp://127.0.0.1:{ev_port}", PAGE)
        try:
            yield server, indexer
        finally:
            indexer.close()


def _generate(server, ids: list[int]) -> dict:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 3, "temperature": 0}}
    return _post(server.url + "/generate", body)


def _flush(server) -> None:
    req = urllib.request.Request(server.url + "/flush_cache", method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200


def test_dynamo_indexer_follows_a_real_server(events_server):
    server, indexer = events_server
    prompt = list(range(1000, 1050))  # 50 tokens: 12 full pages of 4
    # The indexer's SUB joins the PUB asynchronously: until it has, events are dropped. Flush
    # (AllBlocksCleared) and resend until the indexer has seen one request's pages.
    for _ in range(20):
        _flush(server)
        _generate(server, prompt)
        if indexer.wait_for(prompt, 48, timeout=1.0) == 48:
            break
    assert indexer.matched(prompt) == 48  # 12 pages x 4 tokens
    assert indexer.matched(prompt[:30]) == 28  # a prefix matches its own full pages
    assert indexer.matched([7, *prompt[1:]]) == 0  # a different first page shares nothing

    # A second prompt sharing 22 tokens: its pages from the shared prefix on are new blocks.
    other = prompt[:22] + list(range(2000, 2030))
    _generate(server, other)
    assert indexer.wait_for(other, 52) == 52
    assert indexer.matched(prompt) == 48

    # /flush_cache -> AllBlocksCleared -> nothing matches.
    _flush(server)
    assert indexer.wait_for(prompt, 0) == 0
    assert indexer.matched(other) == 0

    # Eviction: fill the 200-token pool with other prompts; the first one's blocks go.
    _generate(server, prompt)
    assert indexer.wait_for(prompt, 48) == 48
    fillers = [list(range(3000 + 100 * i, 3060 + 100 * i)) for i in range(4)]
    for f in fillers:
        _generate(server, f)
    assert indexer.wait_for(prompt, 0) == 0
    assert indexer.wait_for(fillers[-1], 60) == 60  # the latest one is still cached
    # The server agrees: the prompt comes back with nothing cached, and is announced again.
    assert _generate(server, prompt)["meta_info"]["cached_tokens"] == 0
    assert indexer.wait_for(prompt, 48) == 48
    assert "KV events:" not in server.log_text()  # no publishing or replay errors


def test_each_replica_publishes_its_own_blocks_to_the_indexer(tiny_chat_model_dir):
    """--dp-size 2: replica r publishes on port + r with dp_rank r; Dynamo's indexer, given
    each replica's endpoint as a worker of its own, attributes each prompt's blocks to the
    replica that cached it (its answer merges the dp ranks of one worker id)."""
    from server_process import ServerProcess

    base = free_port_pair()
    config = {"publisher": "zmq", "endpoint": f"tcp://*:{base}", "topic": ""}
    flags = ["--page-size", str(PAGE), "--kv-events-config", json.dumps(config)]
    flags += ["--dp-size", "2", "--max-total-tokens", "400"]
    with ServerProcess(tiny_chat_model_dir, *flags) as server:
        info = _get_json(server.url + "/server_info")["kv_events"]
        assert info["endpoints"] == [f"tcp://*:{base}", f"tcp://*:{base + 1}"]
        assert info["block_size"] == PAGE
        workers = f"1=tcp://127.0.0.1:{base},2:1=tcp://127.0.0.1:{base + 1}"
        indexer = DynamoIndexer("", PAGE, workers=workers)
        try:
            prompts = {0: list(range(1000, 1030)), 1: list(range(5000, 5030))}

            def ranks_holding(ids: list[int]) -> dict:
                answer = _post(indexer.url + "/query", {"token_ids": ids, "model_name": "m"})
                return {k: v.get("longest_matched", 0) for k, v in answer["instances"].items()}

            for _ in range(20):  # until both SUB sockets have joined (see the test above)
                _flush(server)
                for rank, ids in prompts.items():
                    body = {"input_ids": ids, "data_parallel_rank": rank}
                    _post(
                        server.url + "/generate", {**body, "sampling_params": {"max_new_tokens": 1}}
                    )
                time.sleep(0.3)
                if all(ranks_holding(ids) for ids in prompts.values()):
                    break
            held = {rank: ranks_holding(ids) for rank, ids in prompts.items()}
            assert held == {0: {"1": 28}, 1: {"2": 28}}  # 7 full pages of 4 on its replica
        finally:
            indexer.close()

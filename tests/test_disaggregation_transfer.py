"""The KV transfer engines (Mooncake over TCP, the fake) and the bootstrap service (issue 15).

Transfers run between engines in two spawned processes on 127.0.0.1, each owning a
KV-pool-shaped torch tensor; the bootstrap service runs for real on a free port and is driven
over HTTP with the exact queries SGLang's decode side sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time

import aiohttp
import pytest
import requests
import torch
from transfer_peer import KV_SHAPE, EnginePeer

from smallm.runtime.config import ServerArgs
from smallm.runtime.disaggregation.bootstrap import (
    BootstrapClient,
    BootstrapError,
    BootstrapServer,
    PrefillRankInfo,
)
from smallm.runtime.disaggregation.fake_engine import FakeTransferEngine
from smallm.runtime.disaggregation.mooncake_engine import explain_import_error
from smallm.runtime.disaggregation.transfer import (
    TransferBackendUnavailable,
    TransferError,
    create_transfer_engine,
)

BACKENDS = ["fake", "mooncake"]
LAYERS, KV, PAGES = KV_SHAPE[:3]
PAGE_BYTES = KV_SHAPE[3] * KV_SHAPE[4] * KV_SHAPE[5] * 4  # float32


@contextlib.contextmanager
def peers(backend: str, count: int = 2, timeout: float = 10.0):
    started: list[EnginePeer] = []
    try:
        for _ in range(count):
            try:
                started.append(EnginePeer(backend, timeout=timeout))
            except TransferBackendUnavailable as e:
                pytest.skip(f"{backend} unavailable here: {e}")
        yield started
    finally:
        for p in started:
            p.close()


def page_offset(layer: int, kv: int, page: int) -> int:
    return ((layer * KV + kv) * PAGES + page) * PAGE_BYTES


# ---- the contract, across two processes, for both engines ---------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_scattered_pages_land_exactly(backend):
    """Several non-contiguous pages of every layer's K and V land where asked, and nothing else."""
    src_pages, dst_pages = [3, 7, 8, 20, 31], [30, 1, 12, 5, 0]
    with peers(backend) as (prefill, decode):
        prefill.call("fill", 1234)
        src = prefill.call("bytes")
        srcs, dsts = [], []
        for layer in range(LAYERS):
            for kv in range(KV):
                srcs += [page_offset(layer, kv, p) for p in src_pages]
                dsts += [page_offset(layer, kv, p) for p in dst_pages]
        outcome, _ = prefill.write(decode, srcs, dsts, [PAGE_BYTES] * len(srcs))
        assert outcome == "written", outcome

        expected = bytearray(decode.nbytes)  # the decode pool started as zeros
        for s, d in zip(srcs, dsts):
            expected[d : d + PAGE_BYTES] = src[s : s + PAGE_BYTES]
        assert decode.call("check", bytes(expected)) == -1
        assert len(srcs) == LAYERS * KV * len(src_pages)

        # sub-page ranges at odd offsets and lengths are plain bytes too
        outcome, _ = prefill.write(decode, [5, 1001], [decode.nbytes - 7, 333], [7, 100])
        assert outcome == "written", outcome
        expected[decode.nbytes - 7 :] = src[5:12]
        expected[333:433] = src[1001:1101]
        assert decode.call("check", bytes(expected)) == -1


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_small_ranges_in_one_write(backend):
    """4,096 shuffled 16-byte ranges: more than Mooncake's TCP queue takes in one batch."""
    n, size = 4096, 16
    order = torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
    with peers(backend) as (prefill, decode):
        prefill.call("fill", 99)
        src = prefill.call("bytes")
        outcome, _ = prefill.write(
            decode, [i * size for i in range(n)], [o * size for o in order], [size] * n
        )
        assert outcome == "written", outcome
        expected = bytearray(decode.nbytes)
        for i, o in enumerate(order):
            expected[o * size : (o + 1) * size] = src[i * size : (i + 1) * size]
        assert decode.call("check", bytes(expected)) == -1


@pytest.mark.parametrize("backend", BACKENDS)
def test_unregistered_ranges_raise(backend):
    with peers(backend) as (prefill, decode):
        prefill.call("fill", 7)
        # past the end of the peer's registered pool, and straddling its end
        for dst in (decode.nbytes + 4096, decode.nbytes - 100):
            outcome, seconds = prefill.write(decode, [0], [dst], [4096])
            assert outcome.startswith("TransferError"), outcome
            assert seconds < 5
        assert decode.call("check", bytes(decode.nbytes)) == -1  # nothing written
        # a source outside this process's registered memory is refused before any I/O
        outcome, _ = prefill.write(decode, [prefill.nbytes], [0], [16])
        assert "not inside memory registered with this engine" in outcome
        # once the peer deregisters its pool, writes into it are refused
        decode.call("deregister")
        outcome, _ = prefill.write(decode, [0], [0], [64])
        assert outcome.startswith("TransferError"), outcome


@pytest.mark.parametrize("backend", BACKENDS)
def test_dead_peer_raises_quickly(backend):
    with peers(backend, 3) as (prefill, decode, other):
        outcome, _ = prefill.write(decode, [0], [0], [PAGE_BYTES])  # connected once
        assert outcome == "written"
        decode.signal(signal.SIGKILL)
        decode.proc.join(10)
        for target in (decode, other.session_id.rsplit(":", 1)[0] + ":1"):
            outcome, seconds = prefill.write(target, [0], [0], [PAGE_BYTES], base=decode.base)
            assert outcome.startswith("TransferError"), outcome
            assert seconds < 5, seconds
        # the writer is still usable
        outcome, _ = prefill.write(other, [0], [0], [PAGE_BYTES])
        assert outcome == "written"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("warm", [False, True], ids=["first-contact", "after-a-write"])
def test_stalled_peer_times_out(backend, warm):
    """A peer that accepts connections but never answers: the write fails at the timeout."""
    with peers(backend, 3, timeout=2.0) as (prefill, decode, other):
        if warm:
            assert prefill.write(decode, [0], [0], [PAGE_BYTES])[0] == "written"
        decode.signal(signal.SIGSTOP)
        try:
            outcome, seconds = prefill.write(decode, [0], [0], [1 << 16], timeout=30)
        finally:
            decode.signal(signal.SIGKILL)
        assert outcome.startswith("TransferError") and "timed out" in outcome, outcome
        assert 1.5 < seconds < 8, seconds
        # a stuck write does not block the next one to a healthy peer
        assert prefill.write(other, [0], [0], [PAGE_BYTES])[0] == "written"


# ---- the contract in one process (the fake engine: no library needed) --------------------


def test_engine_contract_errors():
    buf = torch.zeros(1024, dtype=torch.uint8)
    other = torch.zeros(64, dtype=torch.uint8)
    with FakeTransferEngine("127.0.0.1", timeout=5) as engine:
        host, port = engine.session_id.split(":")
        assert host == "127.0.0.1" and int(port) > 0
        engine.register(buf.data_ptr(), 1024)
        with pytest.raises(TransferError, match="overlaps"):
            engine.register(buf.data_ptr() + 512, 1024)
        with pytest.raises(TransferError, match="must be > 0"):
            engine.register(other.data_ptr(), 0)
        with pytest.raises(TransferError, match="no region starts there"):
            engine.deregister(other.data_ptr())
        with pytest.raises(TransferError, match="as many"):
            engine.write(engine.session_id, [buf.data_ptr()], [], [1])
        with pytest.raises(TransferError, match="not 'host:port'"):
            engine.write("nowhere", [buf.data_ptr()], [buf.data_ptr()], [1])
        with pytest.raises(TransferError, match="> 0"):
            engine.write(engine.session_id, [buf.data_ptr()], [buf.data_ptr()], [0])
        engine.write(engine.session_id, [], [], [])  # an empty batch is a no-op
        # a loopback write into its own registered memory
        buf[:8] = torch.arange(1, 9, dtype=torch.uint8)
        engine.write(engine.session_id, [buf.data_ptr()], [buf.data_ptr() + 100], [8])
        assert buf[100:108].tolist() == list(range(1, 9))
        assert [r.nbytes for r in engine.registered_regions()] == [1024]
    assert engine.registered_regions() == []
    engine.close()  # idempotent
    with pytest.raises(TransferError, match="closed"):
        engine.write("127.0.0.1:1", [buf.data_ptr()], [buf.data_ptr()], [1])


def test_factory_and_missing_library_messages():
    with pytest.raises(ValueError, match="mooncake, fake"):
        create_transfer_engine("nixl", "127.0.0.1")
    engine = create_transfer_engine("fake", "127.0.0.1", timeout=1)
    assert isinstance(engine, FakeTransferEngine) and engine.timeout == 1
    engine.close()
    with pytest.raises(ValueError, match="timeout"):
        create_transfer_engine("fake", "127.0.0.1", timeout=0)

    # the import error engine.so really raises without Debian's libibverbs1
    error = ImportError(
        "libibverbs.so.1: cannot open shared object file: No such file or directory"
    )
    assert "apt-get install -y libibverbs1" in explain_import_error(error)
    # mooncake not installed at all: run the real factory where the import fails
    code = (
        "import sys; sys.modules['mooncake'] = None\n"
        "from smallm.runtime.disaggregation.transfer import create_transfer_engine\n"
        "create_transfer_engine('mooncake', '127.0.0.1')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert "TransferBackendUnavailable" in result.stderr
    assert "pip install mooncake-transfer-engine-non-cuda" in result.stderr


def test_server_args_disaggregation_flags():
    import argparse

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = ServerArgs.from_cli_args(parser.parse_args([]))
    assert (args.disaggregation_mode, args.disaggregation_bootstrap_port) == ("null", 8998)
    assert (args.disaggregation_transfer_backend, args.disaggregation_timeout) == ("mooncake", 30)
    flags = ["--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", "9000"]
    flags += ["--disaggregation-transfer-backend", "fake", "--disaggregation-timeout", "5"]
    ns = parser.parse_args(flags)
    args = ServerArgs.from_cli_args(ns)
    assert args.disaggregation_mode == "prefill" and args.disaggregation_bootstrap_port == 9000
    assert args.disaggregation_transfer_backend == "fake" and args.disaggregation_timeout == 5.0
    for bad, message in [
        ({"disaggregation_mode": "both"}, "--disaggregation-mode"),
        ({"disaggregation_bootstrap_port": 0}, "--disaggregation-bootstrap-port"),
        ({"disaggregation_transfer_backend": "nixl"}, "--disaggregation-transfer-backend"),
        ({"disaggregation_timeout": 0}, "--disaggregation-timeout"),
    ]:
        with pytest.raises(ValueError, match=message):
            ServerArgs(**bad)
    with pytest.raises(SystemExit):
        parser.parse_args(["--disaggregation-mode", "both"])


# ---- the bootstrap service ----------------------------------------------------------------


def sglang_payload(**overrides):
    """What SGLang 0.5.2's Mooncake prefill rank PUTs (MooncakeKVManager._register_to_bootstrap)."""
    payload = {
        "role": "Prefill",
        "attn_tp_size": 1,
        "attn_tp_rank": 0,
        "attn_dp_size": 1,
        "attn_dp_rank": 0,
        "pp_size": 1,
        "pp_rank": 0,
        "system_dp_size": 1,
        "system_dp_rank": 0,
        "rank_ip": "127.0.0.1",
        "rank_port": 17000,
    }
    return {**payload, **overrides}


@pytest.fixture
def bootstrap():
    server = BootstrapServer("127.0.0.1", 0)
    port = server.start_in_thread()
    yield f"http://127.0.0.1:{port}", server
    server.close()


def get_route(url, engine_rank, dp_group, pp_rank=0):
    query = f"engine_rank={engine_rank}&target_dp_group={dp_group}&target_pp_rank={pp_rank}"
    return requests.get(f"{url}/route?{query}", timeout=5)


def test_bootstrap_register_and_lookup(bootstrap):
    url, server = bootstrap
    health = requests.get(f"{url}/health", timeout=5)
    assert (health.status_code, health.text) == (200, "OK")
    # before any rank registered: SGLang's nulls
    assert get_route(url, -1, -1, -1).json() == {
        "prefill_attn_tp_size": None,
        "prefill_dp_size": None,
        "prefill_pp_size": None,
    }
    # an SGLang prefill rank's exact registration, and the decode side's exact lookups
    put = requests.put(f"{url}/route", json=sglang_payload(), timeout=5)
    assert (put.status_code, put.text) == (200, "OK")
    assert get_route(url, -1, -1, -1).json() == {
        "prefill_attn_tp_size": 1,
        "prefill_dp_size": 1,
        "prefill_pp_size": 1,
    }
    assert get_route(url, 0, 0, 0).json() == {"rank_ip": "127.0.0.1", "rank_port": 17000}
    # a decode registration is accepted and ignored, as in SGLang
    assert requests.put(f"{url}/route", json=sglang_payload(role="Decode"), timeout=5).ok
    assert len(server.registered()) == 1

    # smallm's extras come back; re-registering a rank replaces it
    layout = {"num_layers": 2, "page_size": 4, "dtype": "float32", "kv_heads": 2}
    smallm_rank = PrefillRankInfo(
        "127.0.0.1", 17001, session_id="127.0.0.1:15000", kv_layout=layout
    )
    client = BootstrapClient(url.removeprefix("http://"))
    client.register(smallm_rank)
    info = client.lookup(0, 0, 0)
    assert (info.rank_port, info.session_id, info.kv_layout) == (17001, "127.0.0.1:15000", layout)
    assert client.health()


def test_bootstrap_rooms_pick_dp_groups(bootstrap):
    url, _ = bootstrap
    client = BootstrapClient.for_request("127.0.0.1", int(url.rsplit(":", 1)[1]))
    with pytest.raises(BootstrapError, match="no prefill rank registered yet"):
        client.lookup_room(5)
    for dp_rank in range(2):
        client.register(
            PrefillRankInfo("127.0.0.1", 18000 + dp_rank, attn_dp_size=2, attn_dp_rank=dp_rank)
        )
    assert client.parallel_info().prefill_dp_size == 2
    # SGLang's rule: target_dp_group = bootstrap_room % prefill_dp_size
    assert client.lookup_room(7).rank_port == 18001
    assert client.lookup_room(2**63 + 4).rank_port == 18000
    with pytest.raises(BootstrapError, match="answered 404"):
        client.lookup_room(7, engine_rank=1)  # no tensor-parallel rank 1
    with pytest.raises(BootstrapError, match=">= 0"):
        client.lookup_room(-1)
    # a rank whose sizes contradict the first one's is refused
    with pytest.raises(BootstrapError, match=r"answered 400.*differ"):
        client.register(PrefillRankInfo("127.0.0.1", 18005, attn_dp_size=4, attn_dp_rank=3))


def test_bootstrap_bad_requests(bootstrap):
    url, _ = bootstrap
    requests.put(f"{url}/route", json=sglang_payload(), timeout=5).raise_for_status()
    unknown = get_route(url, 0, 3, 0)
    assert unknown.status_code == 404 and "target_dp_group=3" in unknown.text
    assert get_route(url, 0, 0, 1).status_code == 404
    for query in ("", "engine_rank=0", "engine_rank=0&target_dp_group=0", "target_pp_rank=0"):
        r = requests.get(f"{url}/route?{query}", timeout=5)
        assert (r.status_code, r.text) == (400, "Missing inputs for bootstrap server.")
    r = requests.get(f"{url}/route?engine_rank=a&target_dp_group=0&target_pp_rank=0", timeout=5)
    assert r.status_code == 400 and "must be integers" in r.text
    for body, message in [
        ("not json", "Bad bootstrap registration"),
        ("[1]", "JSON object"),
        (
            {k: v for k, v in sglang_payload().items() if k != "rank_ip"},
            "missing field(s): rank_ip",
        ),
        (sglang_payload(rank_port="x"), "rank_port must be an integer"),
        (sglang_payload(rank_port=70000), "rank_port must be in 1..65535"),
        (sglang_payload(attn_tp_size=0), "attn_tp_size is out of range"),
        (sglang_payload(kv_layout=[1]), "kv_layout must be a JSON object"),
    ]:
        kw = {"data": body} if isinstance(body, str) else {"json": body}
        r = requests.put(f"{url}/route", timeout=5, **kw)
        assert r.status_code == 400 and message in r.text, (body, r.text)
    assert requests.post(f"{url}/route", json={}, timeout=5).status_code == 405
    # the service still answers after all of that
    assert get_route(url, 0, 0, 0).json()["rank_port"] == 17000


def test_bootstrap_in_a_running_event_loop():
    async def main():
        server = BootstrapServer("127.0.0.1", 0)
        port = await server.start()
        async with aiohttp.ClientSession() as session:
            async with session.put(f"http://127.0.0.1:{port}/route", json=sglang_payload()) as r:
                assert r.status == 200
            async with session.get(f"http://127.0.0.1:{port}/health") as r:
                assert (r.status, await r.text()) == (200, "OK")
        await server.stop()
        return port

    port = asyncio.run(main())
    with pytest.raises(BootstrapError, match="unreachable"):
        BootstrapClient(f"127.0.0.1:{port}", timeout=2).parallel_info()


def test_bootstrap_port_in_use_is_a_clear_error(bootstrap):
    url, _ = bootstrap
    taken = int(url.rsplit(":", 1)[1])
    start = time.monotonic()
    with pytest.raises(BootstrapError, match=f"cannot listen on 127.0.0.1:{taken}"):
        BootstrapServer("127.0.0.1", taken).start_in_thread()
    assert time.monotonic() - start < 5


def test_flags_and_disaggregation_modules_stay_torch_free():
    code = (
        "import sys\n"
        "import smallm.runtime.config, smallm.runtime.disaggregation.bootstrap\n"
        "import smallm.runtime.disaggregation.transfer, smallm.runtime.disaggregation.fake_engine\n"
        "import smallm.runtime.disaggregation.mooncake_engine\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_prefill_server_whose_bootstrap_port_is_taken_says_so(tiny_chat_model_dir):
    """The bootstrap service starts first, in the front end: a port in use stops the server at
    once (exit 1) with the port named, before any model is loaded."""
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "smallm.launch_server",
            "--model-path",
            str(tiny_chat_model_dir),
        ]
        out = subprocess.run(
            [
                *cmd,
                "--disaggregation-mode",
                "prefill",
                "--disaggregation-bootstrap-port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 1
    assert f"cannot serve the bootstrap service on 127.0.0.1:{port}" in out.stderr + out.stdout

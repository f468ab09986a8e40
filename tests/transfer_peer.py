"""A transfer engine in its own spawned process, driven over a pipe (the transfer tests' peer).

The child owns a float32 tensor shaped like a KV pool, registered with its engine; the parent
asks it to fill the tensor, write ranges of it into another peer, check its bytes, and so on.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from typing import Any

from smallm.runtime.disaggregation.transfer import TransferBackendUnavailable

# layers, K/V, pages, tokens per page, KV heads, head dim: 2 x 2 x 32 pages of 512 bytes
KV_SHAPE = (2, 2, 32, 4, 2, 16)


def _child(conn: Any, backend: str, shape: tuple[int, ...], timeout: float) -> None:
    import torch

    from smallm.runtime.disaggregation.transfer import TransferError, create_transfer_engine

    torch.set_num_threads(1)
    try:
        engine = create_transfer_engine(backend, "127.0.0.1", timeout=timeout)
    except TransferBackendUnavailable as e:
        conn.send(("unavailable", str(e)))
        return
    pool = torch.zeros(shape, dtype=torch.float32)
    raw = pool.view(-1).view(torch.uint8)
    base, nbytes = pool.data_ptr(), raw.numel()
    engine.register(base, nbytes)
    conn.send(("ready", (engine.session_id, base, nbytes)))
    while True:
        cmd, *args = conn.recv()
        try:
            if cmd == "fill":
                gen = torch.Generator().manual_seed(args[0])
                raw.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen))
                conn.send(("ok", None))
            elif cmd == "bytes":
                conn.send(("ok", raw.numpy().tobytes()))
            elif cmd == "check":  # the receiver checks its own bytes: first mismatch or -1
                expected = torch.frombuffer(bytearray(args[0]), dtype=torch.uint8)
                diff = torch.nonzero(raw != expected)
                conn.send(("ok", int(diff[0]) if len(diff) else -1))
            elif cmd == "write":
                peer, src_offsets, dst_ptrs, lengths = args
                start = time.monotonic()
                try:
                    engine.write(peer, [base + o for o in src_offsets], dst_ptrs, lengths)
                    conn.send(("ok", ("written", time.monotonic() - start)))
                except TransferError as e:
                    conn.send(("ok", (f"TransferError: {e}", time.monotonic() - start)))
            elif cmd == "deregister":
                engine.deregister(base)
                conn.send(("ok", None))
            elif cmd == "exit":
                engine.close()
                conn.send(("ok", None))
                return
            else:
                conn.send(("error", f"unknown command {cmd!r}"))
        except Exception as e:
            conn.send(("error", repr(e)))


class EnginePeer:
    """One engine in a spawned process; ``session_id``, ``base`` and ``nbytes`` once started."""

    def __init__(self, backend: str, *, timeout: float = 10.0, shape=KV_SHAPE) -> None:
        self._spawn(_child, (backend, tuple(shape), timeout))
        status, value = self._recv(120)
        if status == "unavailable":
            self.proc.join(10)
            raise TransferBackendUnavailable(value)
        self.session_id, self.base, self.nbytes = value

    def _spawn(self, target: Any, args: tuple[Any, ...]) -> None:
        """Start ``target(conn, *args)`` in a spawned process, talking over a pipe."""
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child_conn, *args), daemon=True)
        self.proc.start()
        child_conn.close()

    def _recv(self, timeout: float) -> tuple[str, Any]:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"the engine process did not answer in {timeout} s")
        return self._conn.recv()

    def call(self, *cmd: Any, timeout: float = 60) -> Any:
        self._conn.send(cmd)
        status, value = self._recv(timeout)
        if status != "ok":
            raise RuntimeError(f"engine process failed {cmd[0]!r}: {value}")
        return value

    def write(
        self, peer: EnginePeer | str, src_offsets, dst_offsets, lengths, *, base=None, timeout=60
    ):
        """Write own ranges into ``peer`` (offsets into its pool); ("written"|error, seconds)."""
        session = peer if isinstance(peer, str) else peer.session_id
        dst_base = base if base is not None else peer.base  # type: ignore[union-attr]
        dst_ptrs = [dst_base + o for o in dst_offsets]
        return self.call("write", session, src_offsets, dst_ptrs, lengths, timeout=timeout)

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.signal(signal.SIGCONT)
                self.call("exit", timeout=20)
            except (OSError, TimeoutError, RuntimeError, EOFError, BrokenPipeError):
                pass
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(10)
        self._conn.close()


# ---- a real KVPool and a first-token buffer behind an engine (tests/test_kv_plan.py) --------


def _pool_bytes(layout: dict[str, Any], seed: int) -> Any:
    """The bytes ``fill`` gives a pool of this layout, as uint8 [layers, 2, slots, row]."""
    import torch

    shape = (layout["num_layers"], 2, layout["capacity"] + 1, layout["slot_stride"])
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)


def _kv_child(
    conn: Any, backend: str, pool_shape: tuple[int, int, int, int], dtype: str, timeout: float
) -> None:
    import torch

    from smallm.runtime.cache.kv_pool import KVPool
    from smallm.runtime.disaggregation.kv_plan import (
        FirstToken,
        FirstTokenBuffer,
        FirstTokenLayout,
        FirstTokenStatus,
        KVLayout,
        transfer_plan,
    )
    from smallm.runtime.disaggregation.transfer import TransferError, create_transfer_engine

    torch.set_num_threads(1)
    try:
        engine = create_transfer_engine(backend, "127.0.0.1", timeout=timeout)
    except TransferBackendUnavailable as e:
        conn.send(("unavailable", str(e)))
        return
    capacity, layers, heads, head_dim = pool_shape
    pool = KVPool(capacity, layers, heads, head_dim, getattr(torch, dtype))
    layout = KVLayout.of(pool)
    first = FirstTokenBuffer(8)
    engine.register(layout.base_ptr, layout.nbytes)
    engine.register(first.layout().base_ptr, first.nbytes)
    raw = pool.buffer.view(-1).view(torch.uint8).view(layers, 2, capacity + 1, -1)
    conn.send(("ready", (engine.session_id, layout.to_dict(), first.layout().to_dict())))
    while True:
        cmd, *args = conn.recv()
        try:
            if cmd == "fill":
                raw.copy_(_pool_bytes(layout.to_dict(), args[0]))
                conn.send(("ok", None))
            elif cmd == "write_kv":  # plan on this side, as the prefill server will
                peer, dst_layout, src_slots, dst_slots = args
                start = time.perf_counter()
                plan = transfer_plan(layout, src_slots, KVLayout.from_dict(dst_layout), dst_slots)
                planned = time.perf_counter() - start
                try:
                    engine.write(peer, *plan.as_lists())
                    outcome = "written"
                except TransferError as e:
                    outcome = f"TransferError: {e}"
                conn.send(("ok", (outcome, len(plan.lengths), plan.nbytes, planned)))
            elif cmd == "check_kv":  # bytes in the moved slots, and elsewhere, that are wrong
                src_seed, src_layout, src_slots, dst_slots, own_seed = args
                expected = _pool_bytes(layout.to_dict(), own_seed)
                source = _pool_bytes(src_layout, src_seed)
                expected[:, :, list(dst_slots)] = source[:, :, list(src_slots)]
                wrong = raw != expected
                moved = torch.zeros(capacity + 1, dtype=torch.bool)
                moved[list(dst_slots)] = True
                conn.send(("ok", (int(wrong[:, :, moved].sum()), int(wrong[:, :, ~moved].sum()))))
            elif cmd == "put_first":  # stage a record locally
                index, room, status, token_id, logprob = args
                first.put(index, FirstToken(room, FirstTokenStatus(status), token_id, logprob))
                conn.send(("ok", None))
            elif cmd == "write_first":
                peer, dst_first, index, dst_index = args
                plan = first.plan(index, FirstTokenLayout.from_dict(dst_first), dst_index)
                try:
                    engine.write(peer, *plan.as_lists())
                    conn.send(("ok", "written"))
                except TransferError as e:
                    conn.send(("ok", f"TransferError: {e}"))
            elif cmd == "get_first":
                token = first.get(args[0])
                conn.send(("ok", (token.room, int(token.status), token.token_id, token.logprob)))
            elif cmd == "exit":
                engine.close()
                conn.send(("ok", None))
                return
            else:
                conn.send(("error", f"unknown command {cmd!r}"))
        except Exception as e:
            conn.send(("error", repr(e)))


class KVPoolPeer(EnginePeer):
    """A real ``KVPool`` and an 8-record ``FirstTokenBuffer``, both registered with an engine in
    a spawned process; ``session_id``, ``layout`` and ``first_layout`` (dicts) once started."""

    def __init__(
        self,
        backend: str,
        *,
        capacity: int,
        num_layers: int = 3,
        num_kv_heads: int = 2,
        head_dim: int = 8,
        dtype: str = "float32",
        timeout: float = 10.0,
    ) -> None:
        shape = (capacity, num_layers, num_kv_heads, head_dim)
        self._spawn(_kv_child, (backend, shape, dtype, timeout))
        status, value = self._recv(120)
        if status == "unavailable":
            self.proc.join(10)
            raise TransferBackendUnavailable(value)
        self.session_id, self.layout, self.first_layout = value

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
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(
            target=_child, args=(child_conn, backend, tuple(shape), timeout), daemon=True
        )
        self.proc.start()
        child_conn.close()
        status, value = self._recv(120)
        if status == "unavailable":
            self.proc.join(10)
            raise TransferBackendUnavailable(value)
        self.session_id, self.base, self.nbytes = value

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

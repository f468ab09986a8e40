"""``FakeTransferEngine``: the transfer contract over a plain TCP socket, for plumbing tests.

Each engine listens on ``host``; a write connects to the peer, sends the destination ranges,
and only after the peer has checked that every range lies inside memory it registered does it
send the bytes, which the peer receives straight into that memory. So a fake write really
crosses processes and fails the way a real one does (unregistered destination, dead peer,
timeout), with no library to install. It is not fast and not meant for serving.
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct
import threading
import time

from smallm.runtime.disaggregation.transfer import (
    TransferEngine,
    TransferError,
    join_session,
    split_session,
)

_MAGIC = b"SMKV"
_HEADER = struct.Struct("!4sI")  # magic, number of ranges
_RANGE = struct.Struct("!QQ")  # destination address, length
_STATUS = struct.Struct("!BI")  # 0 ok / 1 refused, length of the message that follows
_MAX_RANGES = 1 << 20


def _memory(ptr: int, nbytes: int) -> memoryview:
    """A writable byte view of raw process memory (the caller checked it is registered)."""
    return memoryview((ctypes.c_char * nbytes).from_address(ptr)).cast("B")


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    while len(view):
        got = sock.recv_into(view)
        if got == 0:
            raise ConnectionError("connection closed mid-message")
        view = view[got:]


def _recv_bytes(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_exact(sock, memoryview(buf))
    return bytes(buf)


class FakeTransferEngine(TransferEngine):
    """Cross-process copies over a local socket, with the same contract as Mooncake's engine."""

    def __init__(self, host: str = "127.0.0.1", *, timeout: float = 30.0) -> None:
        super().__init__(timeout)
        try:
            self._listener = socket.create_server((host, 0))
        except OSError as e:
            raise TransferError(f"fake transfer engine cannot listen on {host!r}: {e}") from e
        self._session_id = join_session(host, self._listener.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, name="fake-transfer", daemon=True)
        self._thread.start()

    @property
    def session_id(self) -> str:
        return self._session_id

    def _register(self, ptr: int, nbytes: int) -> None:
        pass  # the region table in the base class is all the receiving side consults

    def _deregister(self, ptr: int) -> None:
        pass

    # ---- the writing side ------------------------------------------------------------------

    def _write(
        self, peer_session: str, src_ptrs: list[int], dst_ptrs: list[int], lengths: list[int]
    ) -> None:
        host, port = split_session(peer_session)
        deadline = time.monotonic() + self.timeout
        what = f"{len(lengths)} ranges, {sum(lengths)} bytes, to {peer_session}"

        def remaining() -> float:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            return left

        try:
            with socket.create_connection((host, port), timeout=remaining()) as sock:
                sock.settimeout(remaining())
                ranges = b"".join(_RANGE.pack(d, n) for d, n in zip(dst_ptrs, lengths))
                sock.sendall(_HEADER.pack(_MAGIC, len(lengths)) + ranges)
                self._expect_ok(sock, remaining, what)
                for src, n in zip(src_ptrs, lengths):
                    sock.settimeout(remaining())
                    sock.sendall(_memory(src, n))
                self._expect_ok(sock, remaining, what)
        except TimeoutError as e:
            raise TransferError(f"fake write ({what}) timed out after {self.timeout:g} s") from e
        except OSError as e:
            raise TransferError(f"fake write ({what}) failed: the peer is unreachable ({e})") from e

    @staticmethod
    def _expect_ok(sock: socket.socket, remaining, what: str) -> None:
        sock.settimeout(remaining())
        try:
            status, size = _STATUS.unpack(_recv_bytes(sock, _STATUS.size))
            message = _recv_bytes(sock, size).decode("utf-8", "replace")
        except ConnectionError as e:
            raise TransferError(f"fake write ({what}) failed: the peer hung up ({e})") from e
        if status != 0:
            raise TransferError(f"fake write ({what}) refused by the peer: {message}")

    # ---- the receiving side ----------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError, ConnectionError):
            conn.settimeout(self.timeout)
            magic, count = _HEADER.unpack(_recv_bytes(conn, _HEADER.size))
            if magic != _MAGIC or count > _MAX_RANGES:
                return self._reply(conn, 1, "not a fake transfer engine request")
            table = _recv_bytes(conn, _RANGE.size * count)
            ranges = [_RANGE.unpack_from(table, i * _RANGE.size) for i in range(count)]
            for dst, n in ranges:
                if self._closed or not self._regions.contains(dst, n):
                    return self._reply(
                        conn,
                        1,
                        f"destination [{dst:#x}, {dst + n:#x}) is not inside memory registered "
                        f"with {self._session_id}",
                    )
            self._reply(conn, 0, "")
            for dst, n in ranges:
                _recv_exact(conn, _memory(dst, n))
            self._reply(conn, 0, "")

    @staticmethod
    def _reply(conn: socket.socket, status: int, message: str) -> None:
        data = message.encode()
        conn.sendall(_STATUS.pack(status, len(data)) + data)

    def _close(self) -> None:
        # shutdown() wakes the accept() blocked in the serving thread; close() alone may not
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=5)

"""Builds outlines-core ``Index`` objects in a child process that can be killed.

Some regexes take outlines minutes to compile (``(\\w{1,30}\\s){1,30}``: 209 s). In a thread
such a build cannot be stopped: its request fails at the timeout, but the thread stays busy and
every later outlines compilation waits behind it. In a child process it is killed at the
timeout, and the next build starts a fresh child.

The child is this file run by path (it imports only the standard library, outlines-core and
``smallm.runtime.ipc``: ~0.2 s to start; independent of the parent's ``__main__``, so it does
not re-import the server). Protocol on its stdin/stdout, one pickled
object per message: regex strings in, ``(True, Index)`` or ``(False, exception)`` out. The
``Vocabulary`` comes in a file named on the command line. ``Index`` and ``Vocabulary`` pickle in
microseconds to milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import subprocess
import sys
import tempfile
import threading
from typing import Any


class IndexWorker:
    """One child process, one build at a time (callers queue on a lock, as on a thread)."""

    def __init__(self, vocabulary: Any, timeout_s: float):
        self.timeout_s = timeout_s
        # The child loads the vocabulary from a file: starting one never blocks on a pipe.
        fd, self._vocab_path = tempfile.mkstemp(prefix="smallm-vocab-", suffix=".pickle")
        with os.fdopen(fd, "wb") as f:
            pickle.dump(vocabulary, f)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = self._start()  # boots while nothing waits

    def build(self, regex: str) -> Any:
        """The ``Index`` of ``regex``; raises what ``Index`` raises (``ValueError`` for a bad
        regex), ``GrammarError`` when the build passes the timeout, ``RuntimeError`` when the
        child dies."""
        from smallm.runtime.constrained.base import GrammarError

        with self._lock:
            proc = self._proc if self._proc is not None and self._proc.poll() is None else None
            if proc is None:
                proc = self._proc = self._start()
            try:
                pickle.dump(regex, proc.stdin)
                proc.stdin.flush()
                ready, _, _ = select.select([proc.stdout], [], [], self.timeout_s)
                if not ready:
                    self._kill()
                    # Boot the next child now, while nobody waits for it.
                    self._proc = self._start()
                    raise GrammarError(
                        f"compiling the regex took longer than {self.timeout_s:g}s; stopped"
                    )
                ok, value = pickle.load(proc.stdout)
            except (OSError, EOFError, pickle.UnpicklingError) as e:
                self._kill()
                # Not a GrammarError: nothing says the spec is at fault, so the compiler does
                # not cache the failure and a retry builds again (in a new child).
                raise RuntimeError(f"the regex compiler process failed: {e!r}") from None
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """Stop the child and remove the vocabulary file (idempotent)."""
        with self._lock:
            self._kill()
            with contextlib.suppress(OSError):
                os.unlink(self._vocab_path)

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen(
            # By path, not -m: importing the package would load torch (a second of start-up).
            [sys.executable, __file__, self._vocab_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
        with contextlib.suppress(Exception):
            os.unlink(self._vocab_path)


def main() -> None:
    """The child: build indexes until stdin closes."""
    from smallm.runtime.ipc import die_with_parent

    die_with_parent()
    from outlines_core import Index

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    with open(sys.argv[1], "rb") as f:
        vocabulary = pickle.load(f)
    while True:
        try:
            regex = pickle.load(stdin)
        except EOFError:
            return
        try:
            answer: tuple[bool, Any] = (True, Index(regex, vocabulary))
        except Exception as e:  # sent back and raised in the parent
            answer = (False, e)
        pickle.dump(answer, stdout)
        stdout.flush()


if __name__ == "__main__":
    main()

"""Compiling grammars off the scheduler's thread, with a cache and a timeout.

The scheduler submits a request's constraint when the request arrives and polls the handle
each step (``done()`` never blocks); the request joins the batch once its grammar is ready, or
is answered with the ``GrammarError`` (invalid spec, unenforceable keyword, or timeout).

Compiled grammars are cached by (backend, kind, spec); every request gets its own ``copy()``
(fresh state, shared compiled tables). Failures caused by the spec are cached too, so a client
retrying a bad schema is rejected at once. outlines-core and llguidance release the GIL while
compiling, so a worker thread really runs beside the scheduler (on 2 cores it still competes
with the model's forward pass for CPU: hence one worker by default). Each backend has its own
workers: a regex that takes outlines minutes to compile (they exist) holds up only other
outlines compilations, not llguidance's JSON schemas.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from smallm.runtime.constrained.base import Grammar, GrammarBackend, GrammarError, check_kind

__all__ = ["GrammarCompiler", "GrammarHandle"]

CacheKey = tuple[str, str, str]


class GrammarHandle:
    """A pending compilation for one request. Poll ``done()``; then ``result()``."""

    __slots__ = ("_deadline", "_future", "_timeout_s", "key")

    def __init__(self, key: CacheKey, future: Future[Grammar], timeout_s: float) -> None:
        self.key = key
        self._future = future
        self._timeout_s = timeout_s
        self._deadline = time.monotonic() + timeout_s

    def done(self) -> bool:
        """True when ``result()`` will return or raise without waiting (compiled, failed, or
        past the timeout)."""
        return self._future.done() or time.monotonic() >= self._deadline

    def result(self, wait: bool = True) -> Grammar:
        """This request's own grammar (a fresh copy), or raise ``GrammarError``.

        If not done yet, waits up to the deadline when ``wait`` is true; otherwise (or at the
        deadline) raises the timeout error. A timed-out compilation keeps running in the
        background and lands in the cache for later requests.
        """
        remaining = self._deadline - time.monotonic()
        if not self._future.done() and (not wait or remaining <= 0):
            raise self._timeout_error()
        try:
            template = self._future.result(timeout=max(remaining, 0.0))
        except FutureTimeout:
            raise self._timeout_error() from None
        except GrammarError:
            raise
        except Exception as e:  # a backend bug must not take the scheduler down
            raise GrammarError(f"grammar compilation failed: {type(e).__name__}: {e}") from e
        return template.copy()

    def _timeout_error(self) -> GrammarError:
        return GrammarError(f"grammar compilation timed out after {self._timeout_s:g}s")


class GrammarCompiler:
    """Compiles and caches grammars in a thread pool.

    ``backends`` maps backend names to backends, or to zero-argument factories that build the
    backend on first use (in the worker thread: building vocabulary tables takes ~0.3 s).
    """

    def __init__(
        self,
        backends: Mapping[str, GrammarBackend | Callable[[], GrammarBackend]],
        *,
        timeout_s: float = 30.0,
        max_workers: int = 1,
        cache_size: int = 512,
    ) -> None:
        self._backends = dict(backends)
        self.timeout_s = timeout_s
        self.cache_size = cache_size
        self.max_workers = max_workers
        self._executors: dict[str, ThreadPoolExecutor] = {}
        self._cache: OrderedDict[CacheKey, Future[Grammar]] = OrderedDict()
        self._lock = threading.Lock()
        self._backend_lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def backend(self, name: str) -> GrammarBackend:
        """The backend called ``name``, built now if it was given as a factory."""
        with self._backend_lock:
            entry = self._backends.get(name)
            if entry is None:
                raise GrammarError(
                    f"grammar backend {name!r} is not available (have: {', '.join(self._backends)})"
                )
            if not isinstance(entry, GrammarBackend):
                entry = entry()
                self._backends[name] = entry
            return entry

    def _compile(self, key: CacheKey) -> Grammar:
        name, kind, spec = key
        try:
            backend = self.backend(name)
            if not backend.supports(kind):
                raise GrammarError(f"the {name} grammar backend does not support {kind}")
            return backend.compile(kind, spec)
        except GrammarError:
            raise  # a property of the spec: stays cached, so retries are rejected at once
        except Exception:
            # Unexpected (a backend bug, memory...): forget it before anyone sees the failure,
            # so a retry compiles again.
            with self._lock:
                self._cache.pop(key, None)
            raise

    def submit(
        self, backend: str, kind: str, spec: str, timeout_s: float | None = None
    ) -> GrammarHandle:
        """Start (or reuse) the compilation of ``spec``; never blocks."""
        check_kind(kind)
        key = (backend, kind, spec)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
                future = self._executor(backend).submit(self._compile, key)
                self._cache[key] = future
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return GrammarHandle(key, future, timeout)

    def _executor(self, backend: str) -> ThreadPoolExecutor:
        # Called under self._lock.
        executor = self._executors.get(backend)
        if executor is None:
            executor = ThreadPoolExecutor(self.max_workers, thread_name_prefix=f"grammar-{backend}")
            self._executors[backend] = executor
        return executor

    def compile(self, backend: str, kind: str, spec: str) -> Grammar:
        """Blocking convenience: submit and wait (up to the timeout)."""
        return self.submit(backend, kind, spec).result()

    def clear(self) -> None:
        """Forget every cached grammar (in-flight compilations still finish for their waiters)."""
        with self._lock:
            self._cache.clear()

    def shutdown(self, wait: bool = False) -> None:
        """Stop the worker threads (running compilations finish in the background)."""
        with self._lock:
            executors = list(self._executors.values())
        for executor in executors:
            executor.shutdown(wait=wait, cancel_futures=True)

"""``StepBatcher``: a backend proxy that runs the programs of a compiled batch step-aligned.

Every ``gen`` / ``select`` of the batch's programs comes here and waits. When no thread of the
batch can add another call (each one waits on this backend, or on something only its answers
bring about; see ``coordinator.py``), the waiting calls go to the real backend as one round:
all gens as one batched ``/generate`` request, all selects as one ``select_many`` (three
requests however many programs). Programs whose control flow depends on generated values
still work: a thread reading a variable just waits for the round that sets it.

A thread blocked in a way the coordinator cannot see (user code sleeping, an unregistered
thread) would hold a round back; after ``max_wait`` seconds with no change anywhere the round
goes anyway, so nothing hangs. Shorter would split rounds on a loaded machine, where a thread
with work can wait that long for a core.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from smallm.lang.backends.base import Backend
from smallm.lang.chat_template import ChatTemplate
from smallm.lang.choices import ChoicesDecision, ChoicesSamplingMethod
from smallm.lang.coordinator import Actor, Coordinator

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class _Call:
    """One program's gen or select, waiting for its round."""

    kind: str  # "gen" or "select"
    args: tuple
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


class StepBatcher(Backend, Coordinator):
    """Wraps ``inner``; share one instance between the programs of a batch."""

    # The branches' first calls go out together in one round; the scheduler prefills their
    # shared prefix once (it defers requests whose prefix is being prefilled). A warm-up round
    # would only add a barrier.
    warms_fork_prefix = False

    def __init__(self, inner: Backend, max_wait: float = 0.5):
        self.inner = inner
        self.max_wait = max_wait
        self.coordinator = self
        self._cv = threading.Condition()
        self._actors: set[Actor] = set()
        self._running = 0
        self._local = threading.local()
        self._pending: list[_Call] = []
        self._last_change = time.monotonic()
        self._watchdog: threading.Thread | None = None

    # ---- Backend: calls are queued for a round ------------------------------------------

    @property
    def chat_template(self) -> ChatTemplate:
        return self.inner.chat_template

    def generate(self, text: str, params: dict[str, Any]) -> tuple[str, dict]:
        if params.get("n", 1) != 1:
            return self.inner.generate(text, params)
        return self._submit(_Call("gen", (text, params)))

    def generate_stream(self, text: str, params: dict[str, Any]) -> Iterator[tuple[str, dict]]:
        return self.inner.generate_stream(text, params)

    def select(
        self, text: str, choices: list[str], temperature: float, method: ChoicesSamplingMethod
    ) -> ChoicesDecision:
        return self._submit(_Call("select", (text, choices, temperature, method)))

    def _call(self, payload: dict[str, Any]) -> dict | list[dict]:
        return self.inner._call(payload)

    def _call_stream(self, payload: dict[str, Any]) -> Iterator[dict]:
        return self.inner._call_stream(payload)

    def flush_cache(self) -> bool:
        return self.inner.flush_cache()

    def _submit(self, call: _Call) -> Any:
        with self._cv:
            self._pending.append(call)
            self._touch()
            if self._watchdog is None:
                self._watchdog = threading.Thread(
                    target=self._watch, name="smallm-round-watchdog", daemon=True
                )
                self._watchdog.start()
        with self.waiting(call.done.is_set):
            call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def _watch(self) -> None:
        """Send a stalled round: calls wait, nothing has changed for ``max_wait``, and no
        waiting thread is about to wake (one that is, is only slow to be scheduled)."""
        while True:
            time.sleep(min(self.max_wait / 2, 0.05))
            with self._cv:
                if not self._pending and not self._actors:
                    self._watchdog = None
                    return
                if (
                    self._pending
                    and time.monotonic() - self._last_change >= self.max_wait
                    and not self._about_to_wake()
                ):
                    self._flush_locked()

    # ---- Coordinator: who could still add a call ---------------------------------------

    def register(self) -> Actor:
        actor = Actor()
        with self._cv:
            self._actors.add(actor)
            self._running += 1
            self._touch()
        return actor

    def bind(self, actor: Actor | None) -> None:
        self._local.actor = actor

    def leave(self, actor: Actor | None) -> None:
        if actor is None:
            return
        with self._cv:
            if actor in self._actors:
                self._actors.remove(actor)
                if actor.ready is None:
                    self._running -= 1
                self._touch()
                self._maybe_flush_locked()
        if getattr(self._local, "actor", None) is actor:
            self._local.actor = None

    @contextlib.contextmanager
    def waiting(self, ready: Callable[[], bool]) -> Iterator[None]:
        actor = getattr(self._local, "actor", None)
        if actor is None or actor not in self._actors:
            yield
            return
        with self._cv:
            actor.ready = ready
            self._running -= 1
            self._touch()
            self._maybe_flush_locked()
        try:
            yield
        finally:
            with self._cv:
                actor.ready = None
                self._running += 1
                self._touch()

    def _touch(self) -> None:
        self._last_change = time.monotonic()

    def _maybe_flush_locked(self) -> None:
        if not self._pending or self._running > 0:
            return
        if not self._about_to_wake():
            self._flush_locked()

    def _about_to_wake(self) -> bool:
        # A waiting actor whose condition already holds is about to run (and may add a call).
        return any(a.ready is not None and a.ready() for a in self._actors)

    def _flush_locked(self) -> None:
        calls, self._pending = self._pending, []
        threading.Thread(
            target=self._run_round, args=(calls,), name="smallm-round", daemon=True
        ).start()

    # ---- one round ----------------------------------------------------------------------

    def _run_round(self, calls: list[_Call]) -> None:
        gens = [c for c in calls if c.kind == "gen"]
        selects = [c for c in calls if c.kind == "select"]
        # return_text_in_logprobs is one flag per request: keep differing gens apart.
        by_flag: dict[bool, list[_Call]] = {}
        for c in gens:
            by_flag.setdefault(bool(c.args[1].get("return_text_in_logprobs")), []).append(c)
        groups: list[tuple[Callable[[list], list], list[_Call]]] = [
            (self.inner.generate_many, group) for group in by_flag.values()
        ]
        if selects:
            groups.append((self.inner.select_many, selects))
        # Concurrently, so the server batches gens and selects of a round together.
        threads = [
            threading.Thread(target=self._run_group, args=g, daemon=True) for g in groups[1:]
        ]
        for t in threads:
            t.start()
        if groups:
            self._run_group(*groups[0])
        for t in threads:
            t.join()

    def _run_group(self, method: Callable[[list], list], group: list[_Call]) -> None:
        try:
            results = method([c.args for c in group])
        except Exception as e:
            if len(group) == 1:
                group[0].finish(error=e)
                return
            # One bad item (say an invalid parameter) fails the whole request: retry the items
            # alone so only the program that caused it sees the error.
            logger.info("batched call failed (%s); retrying its %d items alone", e, len(group))
            for c in group:
                self._run_group(method, [c])
            return
        for c, r in zip(group, results):
            if isinstance(r, BaseException):
                c.finish(error=r)
            else:
                c.finish(result=r)
        for c in group:
            if not c.done.is_set():  # never leave a program waiting forever
                c.finish(
                    error=RuntimeError(
                        f"the backend returned {len(results)} results for {len(group)} calls"
                    )
                )

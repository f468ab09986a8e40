"""How the threads of a program group tell a batching backend when they block.

A compiled batch sends each round of ``gen`` / ``select`` calls as one request. It may send a
round only when no thread of the batch could still add a call to it: every thread is waiting,
on the backend or on something only the backend can bring about. Threads report that through
these hooks; the default coordinator ignores them (plain, unbatched backends).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


class Actor:
    """A registered thread. ``ready`` is None while it runs; while it waits, a predicate that
    turns true once it can go on (so a thread about to wake counts as running)."""

    __slots__ = ("ready",)

    def __init__(self) -> None:
        self.ready: Callable[[], bool] | None = None


class Coordinator:
    """The hooks, as no-ops. ``register`` runs in the thread that creates the actor (so it
    counts from that moment), ``bind`` in the thread that acts as it."""

    def register(self) -> Actor | None:
        """A new running actor (None: this coordinator does not track threads)."""
        return None

    def bind(self, actor: Actor | None) -> None:
        """The calling thread is ``actor`` from now on."""

    def leave(self, actor: Actor | None) -> None:
        """``actor`` has stopped for good."""

    @contextlib.contextmanager
    def waiting(self, ready: Callable[[], bool]) -> Iterator[None]:
        """The calling thread blocks inside this block until ``ready()`` turns true."""
        yield


NULL_COORDINATOR = Coordinator()

"""The compiler: trace a program into the interpreter's IR, and run batches step-aligned.

Tracing runs the program's body once with placeholder arguments on a state that records what
is appended instead of executing it. The recorded expressions are the same IR the interpreter
runs. Tracing stops at the first thing that needs a generated value (reading ``s["x"]``,
``s.text()``, ``fork``) or a real argument value (an f-string or ``str()`` of an argument,
``if arg == ...``); what was recorded up to there is still valid, and its leading constant
part is the function's *constant prefix*, warmed into the prefix cache once before a batch.

Compiled ``run_batch`` then runs every program on one :class:`StepBatcher`, which sends each
round of gens / selects across the batch as one batched request. Because execution is still the
interpreter's (threads that wait for rounds), data-dependent control flow needs no fallback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from smallm.lang.backends.base import Backend
from smallm.lang.backends.step_batcher import StepBatcher
from smallm.lang.interpreter import ProgramState, StreamExecutor
from smallm.lang.ir import (
    ConstantText,
    Expr,
    ExprList,
    RoleBegin,
    RoleEnd,
    VarScopeBegin,
    VarScopeEnd,
    to_expr,
)

if TYPE_CHECKING:
    from smallm.lang.api import SglFunction


class TraceStop(Exception):
    """The program needs a value tracing cannot give (a generated one or a real argument)."""


class Argument(Expr):
    """A placeholder for a program argument while tracing. Appending it is fine; looking at
    its value stops the trace."""

    def __init__(self, name: str):
        self.name = name

    def _stop(self, *args: Any, **kwargs: Any) -> Any:
        raise TraceStop(f"the program uses the value of argument {self.name!r}")

    __str__ = __format__ = __bool__ = __len__ = __iter__ = __getitem__ = _stop
    __contains__ = __eq__ = __ne__ = __lt__ = __gt__ = __hash__ = __int__ = __float__ = _stop
    __mul__ = __rmul__ = __mod__ = __call__ = _stop

    def __getattr__(self, name: str) -> Any:
        raise TraceStop(f"the program uses argument {self.name!r} (.{name})")

    def __repr__(self) -> str:
        return f"Argument({self.name!r})"


class _Recorder:
    """Stands in for a :class:`StreamExecutor` while tracing: records, never executes."""

    stream = False

    def __init__(self) -> None:
        self.exprs: list[Expr] = []

    def submit(self, value: Any) -> None:
        self.exprs.append(to_expr(value))

    def end(self) -> None:
        pass

    def _stop(self, *args: Any, **kwargs: Any) -> Any:
        raise TraceStop("the program reads generated text or forks")

    sync = get_var = get_meta_info = fork = _stop


@dataclasses.dataclass
class Trace:
    """A program traced to IR: ``exprs`` in order; ``complete`` when the body ran to its end
    (else ``stopped_by`` says why it stopped)."""

    exprs: list[Expr]
    complete: bool
    stopped_by: str | None = None

    def prefix_exprs(self) -> list[Expr]:
        """The leading expressions that depend on nothing: text, roles, variable scopes."""
        out: list[Expr] = []
        for expr in _flatten(self.exprs):
            if not isinstance(expr, (ConstantText, RoleBegin, RoleEnd, VarScopeBegin, VarScopeEnd)):
                break
            out.append(expr)
        return out


def _flatten(exprs: list[Expr]) -> list[Expr]:
    out: list[Expr] = []
    for e in exprs:
        out.extend(_flatten(e.exprs) if isinstance(e, ExprList) else [e])
    return out


def trace(function: SglFunction) -> Trace:
    """Trace ``function`` with placeholders for the arguments it is not bound to."""
    recorder = _Recorder()
    state = ProgramState(recorder)  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for name, param in list(inspect.signature(function.func).parameters.items())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        kwargs[name] = function.bind_arguments.get(name, Argument(name))
    try:
        function.func(state, **kwargs)
    except TraceStop as e:
        return Trace(recorder.exprs, False, str(e))
    except Exception as e:  # the body failed on a placeholder: keep what was recorded
        return Trace(recorder.exprs, False, f"{type(e).__name__}: {e}")
    return Trace(recorder.exprs, True)


def constant_prefix_text(exprs: list[Expr], backend: Backend) -> str:
    """The text ``exprs`` (constants only) produce with ``backend``'s chat template."""
    if not exprs:
        return ""
    executor = StreamExecutor(backend, {})
    try:
        executor.submit(ExprList(list(exprs)))
        executor.sync()
        if executor.error_ is not None:
            return ""
        return executor.text_
    finally:
        executor.end()


def warm_prefix(text: str, backend: Backend) -> bool:
    """Prefill ``text`` once (no generation) so a batch's programs find it cached."""
    if not text:
        return False
    with contextlib.suppress(Exception):
        backend.generate(text, {"max_new_tokens": 0})
        return True
    return False


def run_step_aligned(
    start: Callable[[Backend, dict[str, Any]], ProgramState],
    batch_kwargs: list[dict[str, Any]],
    backend: Backend,
    max_concurrency: int,
    on_done: Callable[[], None] | None = None,
) -> list[ProgramState]:
    """Run ``start(batcher, kwargs)`` (which returns a finished program's state) for each
    kwargs on one :class:`StepBatcher`, with ``max_concurrency`` program threads; states in
    order."""
    batcher = StepBatcher(backend)
    states: list[Any] = [None] * len(batch_kwargs)
    next_index = iter(range(len(batch_kwargs)))
    take = threading.Lock()

    def worker(actor: Any) -> None:
        # One actor per thread for all the programs it runs: between two programs it counts
        # as running, so no round leaves without the next program's first call.
        batcher.bind(actor)
        gate.wait()
        try:
            while True:
                with take:
                    i = next(next_index, None)
                if i is None:
                    return
                try:
                    states[i] = start(batcher, batch_kwargs[i])
                except BaseException as e:  # re-raised in the caller's thread below
                    states[i] = e
                if on_done is not None:
                    on_done()
        finally:
            batcher.leave(actor)

    # All actors exist before any thread runs, so the first round waits for every program.
    actors = [batcher.register() for _ in range(max_concurrency)]
    threads = [
        threading.Thread(target=worker, args=(a,), name="smallm-program-body", daemon=True)
        for a in actors
    ]
    # Start every thread before any runs a program: a thread start waits for the new thread to
    # get the GIL, which takes long when hundreds of started programs compete for it.
    gate = threading.Event()
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    for s in states:
        if isinstance(s, BaseException):
            raise s
    return states


class CompiledFunction:
    """A program with its trace: ``run_batch`` runs step-aligned (one request per round across
    the batch), ``run`` batches the calls of its own forks the same way."""

    def __init__(self, function: SglFunction):
        self.function = function
        self.trace = trace(function)

    @property
    def ir(self) -> list[Expr]:
        """The traced expressions (arguments appear as :class:`Argument`)."""
        return self.trace.exprs

    def constant_prefix(self, backend: Any = None) -> str:
        """The text every run of this program starts with, rendered for ``backend``."""
        from smallm.lang.api import resolve_backend

        return constant_prefix_text(self.trace.prefix_exprs(), resolve_backend(backend))

    def run(self, *args: Any, backend: Any = None, stream: bool = False, **kwargs: Any):
        """Like :meth:`SglFunction.run`; the program's fork branches send their calls as one
        request per round. ``stream=True`` runs interpreted."""
        from smallm.lang.api import resolve_backend

        backend = resolve_backend(backend)
        if stream or not backend.batches_requests:
            return self.function.run(*args, backend=backend, stream=stream, **kwargs)
        batcher = StepBatcher(backend)
        actor = batcher.register()
        batcher.bind(actor)
        try:
            return self.function.run(*args, backend=batcher, **kwargs)
        finally:
            batcher.leave(actor)

    def run_batch(self, batch_kwargs: list[dict[str, Any]], **kwargs: Any) -> list[ProgramState]:
        """:meth:`SglFunction.run_batch` with ``compiled=True``."""
        return self.function.run_batch(batch_kwargs, compiled=True, **kwargs)

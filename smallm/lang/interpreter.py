"""Executes programs: each :class:`ProgramState` owns an executor thread that runs appended
expressions in order while the Python program continues (so forks and batches overlap)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import traceback
from collections.abc import AsyncIterator, Iterator
from typing import Any

from smallm.lang import sampling
from smallm.lang.backends.base import Backend
from smallm.lang.ir import (
    ConstantText,
    Expr,
    ExprList,
    Gen,
    Media,
    RoleBegin,
    RoleEnd,
    Select,
    VarScopeBegin,
    VarScopeEnd,
    named_exprs,
    to_expr,
)

logger = logging.getLogger(__name__)


class VariableError(KeyError):
    """A variable was read that its program never set, because the program failed first."""

    def __str__(self) -> str:
        return str(self.args[0])


class StreamExecutor:
    """The text, chat messages and variables of one program (or fork), and the thread that
    extends them. Expressions are queued by :meth:`submit` and run in order; readers call
    :meth:`sync` or wait on a variable's event."""

    def __init__(self, backend: Backend, defaults: dict[str, Any], stream: bool = False) -> None:
        self.backend = backend
        self.defaults = defaults
        self.stream = stream
        self.chat_template = backend.chat_template
        self.text_ = ""
        self.messages_: list[dict[str, Any]] = []
        self.variables: dict[str, Any] = {}
        self.gen_tools: dict[str, list[Any]] = {}  # gen_tool_call variables -> their tools
        self.meta_info: dict[str, Any] = {}
        self.variable_event: dict[str, threading.Event] = {}
        self.stream_var_event: dict[str, threading.Event] = {}
        self.stream_text_event = threading.Event()
        self.cur_role: str | None = None
        self.cur_role_begin_pos = 0
        self.fork_start_text_pos = 0
        self.scope_start: dict[str, int] = {}
        self.error_: BaseException | None = None
        self.is_finished = False
        self._ended = False
        self._queue: queue.Queue[Expr | None] = queue.Queue()
        # Registered here, in the creating thread, so a batching backend counts the worker
        # before it has started.
        self.coordinator = backend.coordinator
        self._actor = self.coordinator.register()
        self._worker = threading.Thread(target=self._work, name="smallm-program", daemon=True)
        self._worker.start()

    # ---- called from the program's thread ---------------------------------------------------

    def submit(self, value: Any) -> None:
        """Queue an expression; register events for the variables it sets first, so readers
        of those variables wait for them."""
        expr = to_expr(value)
        for name in named_exprs(expr):
            self.variable_event[name] = threading.Event()
            self.stream_var_event[name] = threading.Event()
        if self._ended:
            # The worker has gone (the program returned): run inline, after earlier work.
            self.sync()
            self._guarded(expr)
            return
        self._queue.put(expr)

    def sync(self) -> None:
        """Wait until every submitted expression has run."""
        with self.coordinator.waiting(lambda: self._queue.unfinished_tasks == 0):
            self._queue.join()

    def end(self) -> None:
        """No more expressions will come from the program: let the worker finish."""
        if not self._ended:
            self._ended = True
            self._queue.put(None)

    def get_var(self, name: str) -> Any:
        """A variable's value, waiting for the expression that sets it."""
        event = self.variable_event.get(name)
        if event is not None:
            with self.coordinator.waiting(event.is_set):
                event.wait()
        if name not in self.variables:
            if self.error_ is not None:
                raise VariableError(
                    f"variable {name!r} was not set because the program failed: {self.error_!r}"
                ) from self.error_
            raise VariableError(f"no variable {name!r}")
        return self.variables[name]

    def get_meta_info(self, name: str, timeout: float | None = None) -> Any:
        """The backend's meta_info for the gen or select that set ``name``."""
        event = self.variable_event.get(name)
        if event is not None:
            with self.coordinator.waiting(event.is_set):
                if not event.wait(timeout):
                    raise TimeoutError(f"timed out waiting for {name!r}")
        return self.meta_info.get(name)

    def record_error(self, error: BaseException) -> None:
        """Remember the first failure; later readers of unset variables see it."""
        if self.error_ is None:
            self.error_ = error
        self._release_waiters()

    def fork(self, size: int) -> list[StreamExecutor]:
        """``size`` executors starting from this one's current text, messages and variables."""
        self.sync()
        if size > 1 and self.text_ and self.error_ is None and self.backend.warms_fork_prefix:
            # Prefill the shared prefix once so the branches hit the prefix cache instead of
            # all prefilling it at the same moment (SGLang's commit-lazy step).
            with contextlib.suppress(Exception):
                self.backend.generate(self.text_, {"max_new_tokens": 0})
        children = []
        for _ in range(int(size)):
            child = StreamExecutor(self.backend, self.defaults, self.stream)
            child.variables = dict(self.variables)
            child.meta_info = dict(self.meta_info)
            child.gen_tools = dict(self.gen_tools)
            child.text_ = self.text_
            child.messages_ = list(self.messages_)
            child.cur_role = self.cur_role
            child.cur_role_begin_pos = self.cur_role_begin_pos
            child.fork_start_text_pos = len(self.text_)
            children.append(child)
        return children

    # ---- the worker thread --------------------------------------------------------------

    def _work(self) -> None:
        self.coordinator.bind(self._actor)
        try:
            self._work_loop()
        finally:
            self.coordinator.leave(self._actor)

    def _work_loop(self) -> None:
        while True:
            # Not "the queue is non-empty": that turns false again the moment get() takes the
            # item, before this thread counts itself as running, and a round would leave early.
            with self.coordinator.waiting(lambda: self._queue.unfinished_tasks > 0):
                expr = self._queue.get()
            if expr is None:
                self._queue.task_done()
                break
            if self.error_ is None:
                self._guarded(expr)
            else:
                # After a failure nothing else runs; only unblock readers of its variables.
                self._release_waiters()
            self._queue.task_done()
            self.stream_text_event.set()
        self.is_finished = True
        self.stream_text_event.set()
        self._release_waiters()

    def _guarded(self, expr: Expr) -> None:
        try:
            self._execute(expr)
        except Exception as e:  # recorded for state.error(), as in SGLang
            # One line: the error is the program's result (state.error()); the traceback is
            # there for debugging.
            logger.warning("error in program: %r", e)
            logger.debug("traceback:\n%s", "".join(traceback.format_exception(e)))
            self.record_error(e)

    def _release_waiters(self) -> None:
        for events in (self.variable_event, self.stream_var_event):
            for event in list(events.values()):
                event.set()

    def _execute(self, expr: Expr) -> None:
        if isinstance(expr, ConstantText):
            self.text_ += expr.value
        elif isinstance(expr, ExprList):
            for e in expr.exprs:
                self._execute(e)
        elif isinstance(expr, Gen):
            self._execute_gen(expr)
        elif isinstance(expr, Select):
            self._execute_select(expr)
        elif isinstance(expr, RoleBegin):
            self._role_begin(expr.role)
        elif isinstance(expr, RoleEnd):
            self._role_end(expr.role)
        elif isinstance(expr, VarScopeBegin):
            self.scope_start[expr.name] = len(self.text_)
        elif isinstance(expr, VarScopeEnd):
            start = self.scope_start.pop(expr.name)
            self.variables[expr.name] = self.text_[start:]
            self.variable_event[expr.name].set()
            self.stream_var_event[expr.name].set()
        elif isinstance(expr, Media):
            raise ValueError(
                f"{expr.kind} input {expr.path!r}: this model has no vision input "
                "(smallm serves text-only models)"
            )
        else:
            raise TypeError(f"cannot execute {type(expr).__name__}")

    def _execute_gen(self, expr: Gen) -> None:
        params = sampling.resolve(self.defaults, expr.params, list(self.chat_template.stop_str))
        name = expr.name
        if name is not None and expr.tools:
            self.gen_tools[name] = expr.tools
        messages = self._chat_prompt() if self.backend.chat_only else None
        if not self.stream:
            if messages is not None:
                text, meta = self.backend.generate_chat(messages, params)
            else:
                text, meta = self.backend.generate(self.text_, params)
            value = text
            if isinstance(text, list):  # n > 1: the variable holds all; the text goes on
                text = text[0]  # with the first
            self.text_ += text
            if name is not None:
                self.variables[name] = value
                self.meta_info[name] = meta
                self.variable_event[name].set()
            return
        if params.get("n", 1) != 1:
            raise ValueError("gen(n > 1) cannot stream; run the program with stream=False")
        if name is not None:
            self.variables[name] = ""
            self.stream_var_event[name].set()
        if messages is not None:
            pieces = self.backend.generate_chat(messages, params, stream=True)
        else:
            pieces = self.backend.generate_stream(self.text_, params)
        for piece, meta in pieces:
            self.text_ += piece
            if name is not None:
                self.variables[name] += piece
                self.meta_info[name] = meta
                self.stream_var_event[name].set()
            self.stream_text_event.set()
        if name is not None:
            self.variable_event[name].set()
            self.stream_var_event[name].set()

    def _chat_prompt(self) -> list[dict[str, Any]]:
        """The messages a chat-only backend answers: the gen must open an assistant turn."""
        if self.cur_role != "assistant" or self.text_[self.cur_role_begin_pos :].strip():
            raise ValueError(
                "this backend only generates whole assistant messages (a chat API): put each "
                "gen alone in an assistant turn, e.g. s += assistant(gen('answer'))"
            )
        return list(self.messages_)

    def _execute_select(self, expr: Select) -> None:
        decision = self.backend.select(
            self.text_, list(expr.choices), expr.temperature, expr.choices_method
        )
        self.text_ += decision.decision
        if expr.name is not None:
            self.variables[expr.name] = decision.decision
            self.meta_info[expr.name] = decision.meta_info
            self.variable_event[expr.name].set()
            self.stream_var_event[expr.name].set()

    def _role_begin(self, role: str) -> None:
        if self.cur_role is not None:
            raise ValueError(f"nested roles: {role!r} inside {self.cur_role!r}")
        default_system = self.chat_template.default_system_prompt
        if not self.messages_ and role != "system" and default_system:
            # The template would insert this itself when a chat starts without a system turn.
            self._role_begin("system")
            self.text_ += default_system
            self._role_end("system")
        prefix, _ = self.chat_template.get_prefix_and_suffix(role, self.messages_)
        self.cur_role = role
        self.text_ += prefix
        self.cur_role_begin_pos = len(self.text_)

    def _role_end(self, role: str) -> None:
        content = self.text_[self.cur_role_begin_pos :].lstrip()
        _, suffix = self.chat_template.get_prefix_and_suffix(role, self.messages_)
        self.cur_role = None
        self.text_ += suffix
        self.messages_.append({"role": role, "content": content})


class ProgramState:
    """What a program's first parameter is, and what ``run`` returns: ``s += expr`` appends,
    ``s["name"]`` reads a variable (waiting for it), ``s.text()`` the whole text so far."""

    def __init__(self, executor: StreamExecutor) -> None:
        self.stream_executor = executor
        self.ret_value: Any = None

    def __iadd__(self, other: Any) -> ProgramState:
        self.stream_executor.submit(other)
        return self

    def __getitem__(self, name: str) -> Any:
        return self.stream_executor.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.stream_executor.sync()
        self.stream_executor.variables[name] = value

    def __contains__(self, name: str) -> bool:
        self.stream_executor.sync()
        return name in self.stream_executor.variables

    def get_var(self, name: str) -> Any:
        """Same as ``s[name]``."""
        return self.stream_executor.get_var(name)

    def set_var(self, name: str, value: Any) -> None:
        """Same as ``s[name] = value``."""
        self[name] = value

    def tool_call(self, name: str) -> Any:
        """The call a ``gen_tool_call(name, tools)`` generated, as a
        :class:`smallm.lang.tools.ToolCall` (name, parsed arguments; call it to run a Python
        tool). ValueError if the generation is not a complete call."""
        from smallm.lang.tools import parse_tool_call

        text = self[name]
        tools = self.stream_executor.gen_tools.get(name)
        if tools is None:
            raise ValueError(f"{name!r} was not generated by gen_tool_call")
        return parse_tool_call(text, tools)

    def get_meta_info(self, name: str) -> Any:
        """The backend's meta_info (token counts, finish reason, logprobs) for ``name``."""
        return self.stream_executor.get_meta_info(name)

    def text(self) -> str:
        """The full text so far (waits for pending expressions)."""
        self.stream_executor.sync()
        return self.stream_executor.text_

    def messages(self) -> list[dict[str, Any]]:
        """Chat messages closed so far, as OpenAI-style ``{"role", "content"}`` dicts."""
        self.stream_executor.sync()
        return self.stream_executor.messages_

    def error(self) -> BaseException | None:
        """The exception that stopped this program (in its code or a backend), or None."""
        self.stream_executor.sync()
        return self.stream_executor.error_

    def sync(self) -> None:
        """Wait for every pending expression."""
        self.stream_executor.sync()

    def fork(self, size: int = 1) -> ProgramStateGroup:
        """``size`` copies of this state to extend independently; join them back with
        ``.join()``."""
        return ProgramStateGroup([ProgramState(e) for e in self.stream_executor.fork(size)], self)

    @contextlib.contextmanager
    def copy(self) -> Iterator[ProgramState]:
        """A single fork, joined when the ``with`` block ends."""
        group = self.fork(1)
        try:
            yield group[0]
        finally:
            group.join()

    @contextlib.contextmanager
    def var_scope(self, name: str) -> Iterator[None]:
        """Capture the text appended inside the ``with`` block into variable ``name``."""
        self.stream_executor.submit(VarScopeBegin(name))
        yield
        self.stream_executor.submit(VarScopeEnd(name))

    def _role(self, role: str, expr: Any) -> Any:
        if expr is not None:
            self += [RoleBegin(role), expr, RoleEnd(role)]
            return None
        return self._role_scope(role)

    @contextlib.contextmanager
    def _role_scope(self, role: str) -> Iterator[None]:
        self.stream_executor.submit(RoleBegin(role))
        yield
        self.stream_executor.submit(RoleEnd(role))

    def system(self, expr: Any = None) -> Any:
        """Append a system turn, or with no argument a context manager for one."""
        return self._role("system", expr)

    def user(self, expr: Any = None) -> Any:
        """Append a user turn, or with no argument a context manager for one."""
        return self._role("user", expr)

    def assistant(self, expr: Any = None) -> Any:
        """Append an assistant turn, or with no argument a context manager for one."""
        return self._role("assistant", expr)

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """New text as it is generated: of the whole program, or of one variable. Without
        ``stream=True`` it yields the final value once."""
        ex = self.stream_executor
        if not ex.stream:
            yield self.text() if var_name is None else self.get_var(var_name)
            return
        sent = 0
        if var_name is None:
            while True:
                ex.stream_text_event.wait()
                ex.stream_text_event.clear()
                finished = ex.is_finished
                out = ex.text_[sent:]
                sent += len(out)
                if out:
                    yield out
                if finished:
                    return
        # The program thread may not have appended the gen yet: wait for its event to exist.
        while var_name not in ex.stream_var_event:
            if ex.is_finished:
                return
            time.sleep(0.001)
        event = ex.stream_var_event[var_name]
        while True:
            event.wait()
            event.clear()
            done = ex.variable_event[var_name].is_set()
            out = str(ex.variables.get(var_name, ""))[sent:]
            sent += len(out)
            if out:
                yield out
            if done or (ex.is_finished and ex.error_ is not None):
                return

    async def text_async_iter(self, var_name: str | None = None) -> AsyncIterator[str]:
        """:meth:`text_iter` for asyncio code: waits in a worker thread, so the event loop stays
        free while the program generates."""
        loop = asyncio.get_running_loop()
        pieces = self.text_iter(var_name)
        done = object()
        while True:
            piece = await loop.run_in_executor(None, next, pieces, done)
            if piece is done:
                return
            yield piece

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.stream_executor.end()

    def __repr__(self) -> str:
        return f"ProgramState({self.text()!r})"


class ProgramStateGroup:
    """The states made by ``fork``: index or iterate them, then ``join()``."""

    def __init__(self, states: list[ProgramState], parent: ProgramState) -> None:
        self.states = states
        self.parent = parent

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.states)

    def __setitem__(self, i: int, value: ProgramState) -> None:
        # `for f in forks: f += ...` rebinds only the loop name, but `forks[i] += ...` lands here.
        self.states[i] = value

    def __iadd__(self, other: Any) -> ProgramStateGroup:
        """Append to every branch: an expression (the same for all), a list (one per branch)
        or a function of the branch index."""
        if callable(other) and not isinstance(other, Expr):
            values = [other(i) for i in range(len(self.states))]
        elif isinstance(other, (list, tuple)):
            if len(other) != len(self.states):
                raise ValueError(f"{len(other)} values for {len(self.states)} branches")
            values = list(other)
        else:
            values = [other] * len(self.states)
        for state, value in zip(self.states, values):
            state += value
        return self

    def join(self, mode: str = "gather_variable") -> None:
        """Bring the branches back. ``gather_variable`` (default): each variable first set in
        the branches becomes, in the parent, the list of the branches' values.
        ``concate_and_append``: the parent's text grows by each branch's new text in order."""
        parent = self.parent.stream_executor
        if mode == "gather_variable":
            parent.sync()
            known = set(parent.variables)
            for state in self.states:
                child = state.stream_executor
                child.sync()
                for k in child.variables.keys() - known:
                    parent.variables.setdefault(k, []).append(child.variables[k])
                if child.error_ is not None and parent.error_ is None:
                    parent.record_error(child.error_)
        elif mode == "concate_and_append":
            pieces = []
            for state in self.states:
                child = state.stream_executor
                child.sync()
                pieces.append(child.text_[child.fork_start_text_pos :])
            self.parent += "".join(pieces)
        else:
            raise ValueError(f"invalid join mode {mode!r}")
        for state in self.states:
            state.stream_executor.end()

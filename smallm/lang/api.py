"""The user-facing language: ``@function``, ``gen``, ``select``, roles and the default backend
(SGLang's names and semantics)."""

from __future__ import annotations

import concurrent.futures
import functools
import inspect
import multiprocessing
from collections.abc import Callable
from typing import Any

from smallm.lang.choices import ChoicesSamplingMethod, token_length_normalized
from smallm.lang.interpreter import ProgramState, StreamExecutor
from smallm.lang.ir import ExprList, Gen, Media, RoleBegin, RoleEnd, Select, to_expr
from smallm.lang.sampling import INT_REGEX

_default_backend: Any = None


def set_default_backend(backend: Any) -> None:
    """The backend ``run`` uses when it is not given one."""
    global _default_backend
    _default_backend = backend


def get_default_backend() -> Any:
    """The backend set by :func:`set_default_backend` (None if unset)."""
    return _default_backend


# ---- expressions --------------------------------------------------------------------------


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    n: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
    dtype: Any = None,
    choices: list[str] | None = None,
    choices_method: ChoicesSamplingMethod | None = None,
    regex: str | None = None,
    json_schema: Any = None,
) -> Gen | Select:
    """Generate text into variable ``name``. Unset (None) arguments take the values given to
    ``run`` (else ``max_tokens`` 128, ``temperature`` 1.0). ``choices`` makes it a
    :func:`select`; ``dtype`` (int, float, str, bool) and ``regex``/``json_schema`` (str, dict
    or pydantic model) constrain the output."""
    if choices:
        return Select(name, list(choices), 0.0, choices_method or token_length_normalized)
    if regex is not None:
        try:
            import re

            re.compile(regex)
        except re.error as e:
            raise ValueError(f"invalid regex {regex!r}: {e}") from e
    params = {
        "max_new_tokens": max_tokens,
        "min_new_tokens": min_tokens,
        "n": n,
        "stop": stop,
        "stop_token_ids": stop_token_ids,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": min_p,
        "frequency_penalty": frequency_penalty,
        "presence_penalty": presence_penalty,
        "ignore_eos": ignore_eos,
        "return_logprob": return_logprob,
        "logprob_start_len": logprob_start_len,
        "top_logprobs_num": top_logprobs_num,
        "return_text_in_logprobs": return_text_in_logprobs,
        "dtype": dtype,
        "regex": regex,
        "json_schema": json_schema,
    }
    return Gen(name, {k: v for k, v in params.items() if v is not None})


def gen_int(name: str | None = None, max_tokens: int | None = None, **kwargs: Any) -> Gen:
    """A gen constrained to an integer (stops at a space or newline, as SGLang's)."""
    stop = kwargs.pop("stop", None) or []
    stop = [stop] if isinstance(stop, str) else list(stop)
    return gen(name, max_tokens, stop=[*stop, " ", "\n"], regex=INT_REGEX, **kwargs)  # type: ignore[return-value]


def gen_string(name: str | None = None, max_tokens: int | None = None, **kwargs: Any) -> Gen:
    """A gen constrained to a double-quoted string."""
    return gen(name, max_tokens, dtype=str, **kwargs)  # type: ignore[return-value]


def select(
    name: str | None = None,
    choices: list[str] | None = None,
    temperature: float = 0.0,
    choices_method: ChoicesSamplingMethod = token_length_normalized,
) -> Select:
    """Append the one of ``choices`` the model scores best (see ``choices.py`` for methods)."""
    if not choices:
        raise ValueError("select needs a non-empty list of choices")
    return Select(name, list(choices), temperature, choices_method)


def image(path: str) -> Media:
    """An image input (SGLang's ``image``). smallm's models are text-only: a program that
    appends one fails with a "no vision input" error in ``state.error()``."""
    return Media("image", str(path))


def video(path: str, num_frames: int = -1) -> Media:
    """A video input (SGLang's ``video``); fails like :func:`image`."""
    del num_frames
    return Media("video", str(path))


def flush_cache(backend: Any = None) -> bool:
    """Empty the prefix cache of ``backend`` (default: the default backend); True on success."""
    return resolve_backend(backend).flush_cache()


def _role(role: str, expr: Any = None) -> ExprList:
    inner = [] if expr is None else [to_expr(expr)]
    return ExprList([RoleBegin(role), *inner, RoleEnd(role)])


def system(expr: Any = None) -> ExprList:
    """A system turn around ``expr`` (text, gen, or a list of them)."""
    return _role("system", expr)


def user(expr: Any = None) -> ExprList:
    """A user turn around ``expr``."""
    return _role("user", expr)


def assistant(expr: Any = None) -> ExprList:
    """An assistant turn around ``expr``; a gen inside continues the generation prompt."""
    return _role("assistant", expr)


def system_begin() -> RoleBegin:
    """Open a system turn (close it with :func:`system_end`)."""
    return RoleBegin("system")


def system_end() -> RoleEnd:
    """Close a system turn."""
    return RoleEnd("system")


def user_begin() -> RoleBegin:
    """Open a user turn."""
    return RoleBegin("user")


def user_end() -> RoleEnd:
    """Close a user turn."""
    return RoleEnd("user")


def assistant_begin() -> RoleBegin:
    """Open an assistant turn."""
    return RoleBegin("assistant")


def assistant_end() -> RoleEnd:
    """Close an assistant turn."""
    return RoleEnd("assistant")


# ---- programs -----------------------------------------------------------------------------

# Program-level sampling defaults accepted by run/run_batch (SGLang's names).
_RUN_SAMPLING = (
    "max_new_tokens", "n", "stop", "stop_token_ids", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "ignore_eos", "return_logprob",
    "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs",
)  # fmt: skip


class SglFunction:
    """A prompt program: call ``run`` (or the object itself) to execute it on a backend."""

    def __init__(self, func: Callable[..., Any], bind_arguments: dict[str, Any] | None = None):
        self.func = func
        self.bind_arguments = dict(bind_arguments or {})
        params = list(inspect.signature(func).parameters)
        if not params:
            raise TypeError("a program's first parameter must be the state (`s`)")
        self.arg_names = params[1:]
        self._compiled: Any = None
        functools.update_wrapper(self, func)

    def bind(self, **kwargs: Any) -> SglFunction:
        """A copy with some arguments fixed."""
        return SglFunction(self.func, {**self.bind_arguments, **kwargs})

    def run(
        self,
        *args: Any,
        backend: Any = None,
        stream: bool = False,
        **kwargs: Any,
    ) -> ProgramState:
        """Run the program; sampling keywords (``temperature``, ``max_new_tokens``, ``stop``,
        ...) are defaults for its gens, the rest are the program's own arguments. Returns at
        once with ``stream=True`` (the program runs in a thread; read it with ``text_iter``), else
        when the program has finished.

        Errors in the program or the backend do not raise here: ``state.error()`` returns
        them, and reading a variable that was never set raises."""
        # A name the program itself takes stays the program's argument.
        own = set(self.arg_names)
        defaults = {k: kwargs.pop(k) for k in _RUN_SAMPLING if k in kwargs and k not in own}
        if "max_tokens" in kwargs and "max_tokens" not in own:
            defaults["max_new_tokens"] = kwargs.pop("max_tokens")
        backend = resolve_backend(backend)
        executor = StreamExecutor(backend, defaults, stream)
        state = ProgramState(executor)
        call_kwargs = {**self.bind_arguments, **kwargs}
        if stream:
            import threading

            threading.Thread(
                target=self._run_body, args=(state, args, call_kwargs), daemon=True
            ).start()
        else:
            self._run_body(state, args, call_kwargs)
            state.sync()  # returns when the program's last gen is done, not just queued
        return state

    def _run_body(self, state: ProgramState, args: tuple, kwargs: dict[str, Any]) -> None:
        executor = state.stream_executor
        try:
            state.ret_value = self.func(state, *args, **kwargs)
        except Exception as e:  # recorded, see run()
            executor.sync()
            executor.record_error(e)
        finally:
            executor.end()

    def run_batch(
        self,
        batch_kwargs: list[dict[str, Any]],
        *,
        backend: Any = None,
        num_threads: int | str = "auto",
        progress_bar: bool = False,
        compiled: bool = False,
        **sampling_defaults: Any,
    ) -> list[ProgramState]:
        """Run the program once per kwargs dict (or tuple of positional arguments),
        concurrently; states come back in order.

        Interpreted (default): a thread per program, each gen its own request, at most
        ``num_threads`` programs at a time ("auto": 96, or 16 per CPU). ``compiled=True``:
        the program's constant prefix is prefilled once, then the programs run step-aligned
        and each round of gens / selects across them is one batched request ("auto": all
        programs in one lockstep, up to 1024). Same results either way."""
        if not batch_kwargs:
            return []
        # SGLang also takes each program's arguments as a positional tuple.
        batch_kwargs = [
            kw if isinstance(kw, dict) else dict(zip(self.arg_names, kw)) for kw in batch_kwargs
        ]
        backend = resolve_backend(backend)
        bar = None
        if progress_bar:
            import tqdm

            bar = tqdm.tqdm(total=len(batch_kwargs))
        try:
            if compiled and backend.batches_requests:
                return self._run_batch_compiled(
                    batch_kwargs, backend, num_threads, bar, sampling_defaults
                )
            return self._run_batch_threads(
                batch_kwargs, backend, num_threads, bar, sampling_defaults
            )
        finally:
            if bar is not None:
                bar.close()

    def _run_batch_threads(self, batch_kwargs, backend, num_threads, bar, defaults):
        if num_threads == "auto":
            num_threads = max(96, multiprocessing.cpu_count() * 16)
        num_threads = max(1, min(int(num_threads), len(batch_kwargs)))

        def one(kwargs: dict[str, Any]) -> ProgramState:
            return self.run(backend=backend, **defaults, **kwargs)  # returns when finished

        with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
            futures = [pool.submit(one, kw) for kw in batch_kwargs]
            for _ in concurrent.futures.as_completed(futures):
                if bar is not None:
                    bar.update(1)
        return [f.result() for f in futures]

    def _run_batch_compiled(self, batch_kwargs, backend, num_threads, bar, defaults):
        from smallm.lang import compiler

        compiled = self.compile()
        if len(batch_kwargs) > 1:
            compiler.warm_prefix(compiled.constant_prefix(backend), backend)
        limit = 1024 if num_threads == "auto" else max(1, int(num_threads))
        return compiler.run_step_aligned(
            lambda b, kwargs: self.run(backend=b, **defaults, **kwargs),
            batch_kwargs,
            backend,
            max_concurrency=min(limit, len(batch_kwargs)),
            on_done=None if bar is None else lambda: bar.update(1),
        )

    def compile(self) -> Any:
        """This program traced to IR (a :class:`~smallm.lang.compiler.CompiledFunction`,
        made once): ``constant_prefix()``, ``ir``, and ``run`` / ``run_batch`` that send one
        request per round."""
        if self._compiled is None:
            from smallm.lang.compiler import CompiledFunction

            self._compiled = CompiledFunction(self)
        return self._compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Inside another program, `sub(s, ...)` appends to the caller's state directly.
        if args and isinstance(args[0], ProgramState):
            return self.func(*args, **{**self.bind_arguments, **kwargs})
        return self.run(*args, **kwargs)


def function(func: Callable[..., Any] | None = None, **options: Any) -> Any:
    """Make a prompt program: ``@function`` or ``@function(...)`` over ``def prog(s, ...)``.
    Options SGLang accepts (``num_api_spec_tokens``) are ignored in this interpreter."""
    if func is not None:
        return SglFunction(func)
    return lambda f: SglFunction(f)


def resolve_backend(backend: Any) -> Any:
    """``backend``, else the default one; a :class:`Runtime` stands for its endpoint."""
    backend = backend or _default_backend
    if backend is None:
        raise ValueError("no backend: pass backend= or call set_default_backend()")
    return getattr(backend, "endpoint", backend)

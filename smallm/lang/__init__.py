"""The smallm language: SGLang-compatible prompt programs (``@function``, ``gen``, ``select``,
roles, ``fork``) interpreted over a backend (in-process :class:`EngineBackend` or an HTTP
:class:`RuntimeEndpoint`)."""

from __future__ import annotations

from smallm.lang.api import (
    SglFunction,
    assistant,
    assistant_begin,
    assistant_end,
    flush_cache,
    function,
    gen,
    gen_int,
    gen_string,
    get_default_backend,
    image,
    select,
    set_default_backend,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
    video,
)
from smallm.lang.backends import (
    Backend,
    BackendError,
    EngineBackend,
    OpenAI,
    Runtime,
    RuntimeEndpoint,
)
from smallm.lang.chat_template import ChatTemplate
from smallm.lang.choices import (
    ChoicesDecision,
    ChoicesSamplingMethod,
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from smallm.lang.interpreter import ProgramState, ProgramStateGroup, VariableError
from smallm.lang.tools import Tool, ToolCall, gen_tool_call, tools_prompt

__all__ = [
    "Backend",
    "BackendError",
    "ChatTemplate",
    "ChoicesDecision",
    "ChoicesSamplingMethod",
    "EngineBackend",
    "OpenAI",
    "ProgramState",
    "ProgramStateGroup",
    "Runtime",
    "RuntimeEndpoint",
    "SglFunction",
    "Tool",
    "ToolCall",
    "VariableError",
    "assistant",
    "assistant_begin",
    "assistant_end",
    "flush_cache",
    "function",
    "gen",
    "gen_int",
    "gen_string",
    "gen_tool_call",
    "get_default_backend",
    "greedy_token_selection",
    "image",
    "select",
    "set_default_backend",
    "system",
    "system_begin",
    "system_end",
    "token_length_normalized",
    "tools_prompt",
    "unconditional_likelihood_normalized",
    "user",
    "user_begin",
    "user_end",
    "video",
]  # fmt: skip

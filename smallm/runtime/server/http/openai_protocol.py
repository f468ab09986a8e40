"""OpenAI API <-> native requests and results: pure conversions, no server state.

The handlers in ``openai_api.py`` use these to turn a ``/v1/completions`` or
``/v1/chat/completions`` body into a native `GenerateCall`, and the native result dicts the
tokenizer manager produces (``{"text", "output_ids", "meta_info"}``) into OpenAI choices,
logprobs, usage and stream chunks. Every bad input raises ``ApiError(400, message, param)`` with
the OpenAI name of the field.
"""

from __future__ import annotations

import json
import numbers
import re
from dataclasses import dataclass
from typing import Any

from smallm.runtime.request_builder import (
    GenerateCall,
    bootstrap_fields,
    error_param,
    is_list_of,
    router_fields,
)
from smallm.runtime.sampling import SamplingParams, SamplingParamsError
from smallm.runtime.server.http.errors import ApiError
from smallm.runtime.server.http.guided import (
    NATIVE_GRAMMAR_FIELDS,
    Constraint,
    apply_constraint,
    request_constraints,
    single_constraint,
)
from smallm.runtime.server.http.tool_calls import (
    ToolOutput,
    ToolRequest,
    auto_structural_tag,
    constraint_schema,
    enforced_calls,
    fallback_messages,
    history_calls,
    message_fields,
    template_takes_tools,
    tool_request,
)
from smallm.runtime.server.http.tool_parsers import ToolCallParser, get_parser
from smallm.runtime.server.http.tool_stream import ToolStream

# OpenAI fields that are native sampling params under the same name, and SGLang's native extras.
_SAME_NAME = (
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
)
NATIVE_EXTRAS = (
    "top_k",
    "min_p",
    "repetition_penalty",
    *NATIVE_GRAMMAR_FIELDS,
    "ignore_eos",
    "stop_token_ids",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "no_stop_trim",
)
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer", "function")
_MEDIA_PARTS = ("image_url", "input_audio", "image", "audio", "video", "video_url", "file")
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20
MAX_N = 128  # samples per prompt: a guard against one request flooding the scheduler


# ---- field checks -----------------------------------------------------------------------


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param)


def opt_bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, f"{name} must be true or false, got {value!r}")
    return value


def opt_int(body: dict, name: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or value < lo or (hi is not None and value > hi):
        rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise _bad(name, f"{name} must be an integer {rng}, got {value!r}")
    return int(value)


def opt_dict(body: dict, name: str) -> dict:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(name, f"{name} must be an object, got {type(value).__name__}")
    return value


def rename_error(e: Exception, names: dict[str, str]) -> ApiError:
    """A native validation error (RequestError / SamplingParamsError) as a 400 that uses the
    client's field names (``names`` maps native name -> OpenAI name)."""
    param = error_param(e) if isinstance(e, ValueError) else None
    message = str(e)
    for native, public in names.items():
        message = re.sub(rf"\b{native}\b", public, message)
    public = names.get(param, param) if param else None
    if public and public not in message:
        message = f"{public}: {message}"
    return ApiError(400, message, public)


# ---- sampling parameters ----------------------------------------------------------------


def native_sampling_params(
    body: dict, max_tokens: int | None, names: dict[str, str]
) -> dict[str, Any]:
    """The native ``sampling_params`` for an OpenAI body (the one place fields are mapped).

    ``max_tokens`` is the already-resolved completion budget (None: native default). Types and
    ranges are checked here, with errors that name the OpenAI field.
    """
    sp: dict[str, Any] = {name: body.get(name) for name in (*_SAME_NAME, *NATIVE_EXTRAS)}
    sp["max_new_tokens"] = max_tokens
    sp["min_new_tokens"] = body.get("min_tokens")
    if isinstance(sp["json_schema"], (dict, bool)):
        sp["json_schema"] = json.dumps(sp["json_schema"])
    sp = {k: v for k, v in sp.items() if v is not None}
    try:
        SamplingParams.from_dict(sp).validate()
    except SamplingParamsError as e:
        raise rename_error(e, names) from None
    return sp


def _check_shared(body: dict) -> None:
    if not isinstance(body.get("stream", False), (bool, type(None))):
        raise _bad("stream", f"stream must be true or false, got {body['stream']!r}")
    opt_dict(body, "stream_options")


@dataclass
class OpenAICall:
    """A checked OpenAI request: the native call plus what shaping the response needs."""

    call: GenerateCall
    n: int
    stream: bool
    include_usage: bool
    names: dict[str, str]  # native field name -> the client's, for error messages
    echo_texts: list[str] | None = None  # completions with echo: each prompt's text
    logprobs: int | None = None  # completions: top-N (0..5); chat: top_logprobs when enabled
    prompt_text: str | None = None  # chat: the rendered prompt
    tools: ToolRequest | None = None  # chat with tools that may be called (not choice none)
    parser: ToolCallParser | None = None  # the server's --tool-call-parser


def _names(max_tokens_name: str, prompt_name: str) -> dict[str, str]:
    return {
        "max_new_tokens": max_tokens_name,
        "min_new_tokens": "min_tokens",
        "text": prompt_name,
        "input_ids": prompt_name,
    }


def _client_rid(body: dict, call: GenerateCall) -> None:
    """SGLang's optional ``rid`` extra: the native request id (for /abort_request)."""
    rid = body.get("rid")
    if rid is None:
        return
    if not isinstance(rid, str) or not rid or not call.is_single:
        raise _bad("rid", "rid must be a non-empty string, for a single prompt")
    call.rid = rid


def _base(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
    _check_shared(body)
    return body


# ---- /v1/completions --------------------------------------------------------------------


def completion_call(body: Any, tokenizer: Any) -> OpenAICall:
    """Check a ``/v1/completions`` body and build its native call."""
    body = _base(body)
    names = _names("max_tokens", "prompt")
    prompt = body.get("prompt")
    text: str | list[str] | None = None
    ids: list[int] | list[list[int]] | None = None
    if isinstance(prompt, str) or is_list_of(prompt, str):
        text = prompt
    elif is_list_of(prompt, int) or (
        is_list_of(prompt, list) and all(is_list_of(p, int) for p in prompt)
    ):
        ids = prompt
    else:
        raise _bad(
            "prompt",
            "prompt is required: a string, a list of strings, a list of token ids, "
            "or a list of token-id lists",
        )
    if body.get("suffix"):
        raise _bad(
            "suffix",
            "suffix (fill-in-the-middle) is not supported: the served models have no "
            "insertion mode; send the text before the gap as the prompt",
        )
    n = opt_int(body, "n", 1, MAX_N) or 1
    best_of = opt_int(body, "best_of", 1)
    if best_of is not None and best_of != n:
        raise _bad("best_of", f"best_of must equal n ({n}) when given, got {best_of}")
    logprobs = opt_int(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    echo = opt_bool(body, "echo")
    max_tokens = opt_int(body, "max_tokens", 0)
    body = _constrained_body(body, None, names)
    sp = native_sampling_params(body, 16 if max_tokens is None else max_tokens, names)
    call = GenerateCall(
        text=text,
        input_ids=ids,
        sampling_params=sp,
        return_logprob=logprobs is not None,
        logprob_start_len=0 if echo and logprobs is not None else -1,
        top_logprobs_num=logprobs or 0,
        return_text_in_logprobs=logprobs is not None,
        stream=opt_bool(body, "stream"),
    )
    _client_rid(body, call)
    call.data_parallel_rank = router_fields(body)
    bootstrap_fields(body, call)  # what sglang-router --pd-disaggregation adds
    echo_texts = None
    if echo:
        if text is not None:
            echo_texts = [text] if isinstance(text, str) else list(text)
        else:
            lists = ids if isinstance(ids[0], list) else [ids]  # type: ignore[index]
            echo_texts = [tokenizer.decode(x) for x in lists]
    return OpenAICall(
        call=call,
        n=n,
        stream=call.stream,
        include_usage=opt_bool(opt_dict(body, "stream_options"), "include_usage"),
        names=names,
        echo_texts=echo_texts,
        logprobs=logprobs,
    )


# ---- /v1/chat/completions ---------------------------------------------------------------


def chat_messages(messages: Any) -> list[dict[str, Any]]:
    """The messages as ``{"role", "content": str}`` dicts for the chat template; an assistant
    message keeps its ``tool_calls`` and a tool result its ``tool_call_id`` / ``name``."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "messages is required: a non-empty list of message objects")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad("messages", f"{where} must be an object with role and content")
        role = m.get("role")
        if role not in CHAT_ROLES:
            roles = ", ".join(CHAT_ROLES)
            raise _bad("messages", f"{where}.role must be one of {roles}, got {role!r}")
        msg: dict[str, Any] = {
            "role": {"developer": "system", "function": "tool"}.get(role, role),
            "content": _content_text(m.get("content"), where),
        }
        if role == "assistant":
            calls = history_calls(m, where)
            if calls:
                msg["tool_calls"] = calls
        elif role in ("tool", "function"):
            for key in ("tool_call_id", "name"):
                if isinstance(m.get(key), str):
                    msg[key] = m[key]
        out.append(msg)
    return out


def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad("messages", f"{where}.content must be a string or a list of content parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _MEDIA_PARTS:
            raise _bad("messages", f"{where}: this model has no vision/audio input ({kind} parts)")
        if kind not in ("text", "refusal") or not isinstance(part.get(kind), str):
            raise _bad("messages", f"{where}.content parts must be {{'type': 'text', 'text': str}}")
        texts.append(part[kind])
    return "\n".join(texts)


def render_chat_prompt(
    tokenizer: Any,
    body: dict,
    messages: list[dict[str, Any]],
    tools: ToolRequest | None = None,
    parser: ToolCallParser | None = None,
) -> str:
    """The chat template applied to ``messages`` (honours ``add_generation_prompt``,
    ``continue_final_message`` and ``chat_template_kwargs``).

    Tools (unless ``tool_choice`` is none) go through the template's ``tools`` argument when
    the template reads one, else through the parser's system-prompt fallback, which also
    rewrites earlier tool calls and results as text the template can print.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise _bad("messages", "this model's tokenizer has no chat template; use /v1/completions")
    cont = opt_bool(body, "continue_final_message")
    if cont and messages[-1]["role"] != "assistant":
        raise _bad(
            "continue_final_message", "continue_final_message needs a final assistant message"
        )
    kwargs = {
        **opt_dict(body, "chat_template_kwargs"),
        "add_generation_prompt": opt_bool(body, "add_generation_prompt", True) and not cont,
        "tokenize": False,
    }
    if cont:
        kwargs["continue_final_message"] = True
    listed = [t.as_openai() for t in tools.tools] if tools and tools.choice != "none" else None
    has_tool_turns = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if template_takes_tools(tokenizer):
        if listed:
            kwargs["tools"] = listed
    elif listed or has_tool_turns:
        messages = fallback_messages(messages, listed, parser or get_parser("hermes"))
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except Exception as e:  # jinja2 TemplateError, or a template's raise_exception
        raise _bad("messages", f"the chat template rejected the messages: {e}") from None


def _constrained_body(
    body: dict,
    tools: ToolRequest | None,
    names: dict[str, str],
    parser: ToolCallParser | None = None,
    structural_tag_mode: str = "off",
) -> dict:
    """``body`` with its one output constraint (any spelling, an enforced tool choice, or the
    structural tag of an auto choice) as the native grammar field; ``names`` learns the
    client's name for it."""
    found = request_constraints(body)
    if tools is not None and tools.enforced:
        param = "function_call" if tools.legacy else "tool_choice"
        if found:
            raise _bad(
                param,
                f"{param} {tools.choice} is enforced with the tool's JSON schema; it cannot be "
                f"combined with {found[0].source}",
            )
        found.append(Constraint("json_schema", json.dumps(constraint_schema(tools)), param))
    elif tools is not None and parser is not None and not found:
        # auto with no constraint of the client's own: free text, calls checked (if enabled).
        tag = auto_structural_tag(tools, parser, structural_tag_mode)
        if tag is not None:
            param = "function_call" if tools.legacy else "tool_choice"
            found.append(Constraint("structural_tag", json.dumps(tag, ensure_ascii=False), param))
    c = single_constraint(found)
    if c is not None:
        names[c.native] = c.source
    return apply_constraint(body, c)


def chat_call(
    body: Any,
    tokenizer: Any,
    context_length: int,
    parser: ToolCallParser | None = None,
    structural_tag_mode: str = "strict",
) -> OpenAICall:
    """Check a ``/v1/chat/completions`` body, render and tokenize it, and build its call.

    ``parser`` is the server's ``--tool-call-parser`` (for ``tool_choice: auto``);
    ``structural_tag_mode`` its ``--tool-call-structural-tag`` (strict, always, off).
    """
    body = _base(body)
    messages = chat_messages(body.get("messages"))
    tools = tool_request(body)
    logprobs = opt_bool(body, "logprobs")
    top = opt_int(body, "top_logprobs", 0, MAX_CHAT_TOP_LOGPROBS)
    if top and not logprobs:
        raise _bad("top_logprobs", "top_logprobs needs logprobs: true")
    n = opt_int(body, "n", 1, MAX_N) or 1
    limit_name = "max_tokens"
    if body.get("max_completion_tokens") is not None:
        # OpenAI's newer name wins over the deprecated max_tokens, as in OpenAI's API.
        limit_name = "max_completion_tokens"
    max_tokens = opt_int(body, limit_name, 0)
    names = _names(limit_name, "messages")
    body = _constrained_body(body, tools, names, parser, structural_tag_mode)
    if tools is not None and tools.choice == "auto" and parser is None:
        raise _bad("tool_choice", "tool_choice auto needs a server started with --tool-call-parser")
    if tools is not None and tools.choice == "auto" and parser.needs_special_tokens:  # type: ignore[union-attr]
        body.setdefault("skip_special_tokens", False)  # the parser must see its marker token
    # Validate the sampling fields before the (costlier) template rendering.
    native_sampling_params(body, max_tokens, names)
    prompt = render_chat_prompt(tokenizer, body, messages, tools, parser)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    if max_tokens is None:  # the rest of the context (too-long prompts fail in prepare)
        max_tokens = max(context_length - len(ids), 1)
    sp = native_sampling_params(body, max_tokens, names)
    call = GenerateCall(
        input_ids=ids,
        sampling_params=sp,
        return_logprob=logprobs,
        top_logprobs_num=top or 0,
        return_text_in_logprobs=logprobs,
        stream=opt_bool(body, "stream"),
    )
    _client_rid(body, call)
    call.data_parallel_rank = router_fields(body)
    bootstrap_fields(body, call)  # what sglang-router --pd-disaggregation adds
    return OpenAICall(
        call=call,
        n=n,
        stream=call.stream,
        include_usage=opt_bool(opt_dict(body, "stream_options"), "include_usage"),
        names=names,
        logprobs=(top or 0) if logprobs else None,
        prompt_text=prompt,
        tools=tools if tools is not None and tools.choice != "none" else None,
        parser=parser,
    )


# ---- results ----------------------------------------------------------------------------


def finish_reason(meta: dict) -> tuple[str | None, int | str | None]:
    """(OpenAI finish_reason, matched_stop) for a native meta_info."""
    reason = meta.get("finish_reason")
    if not reason:
        return None, None
    kind = reason.get("type")
    return {"stop": "stop", "length": "length"}.get(kind, "abort"), reason.get("matched")


def _rows(meta: dict, key: str, start: int) -> tuple[list, list]:
    entries = meta.get(f"{key}_token_logprobs") or []
    tops = meta.get(f"{key}_top_logprobs") or [None] * len(entries)
    return entries[start:], tops[start:]


def _top_dict(row: list | None, text: str, logprob: float | None) -> dict | None:
    if logprob is None:
        return None
    top = {t[2] or "": t[0] for t in row or []}
    top.setdefault(text, logprob)  # OpenAI always includes the sampled token
    return top


def completion_logprobs(meta: dict, start: int = 0, prompt: bool = False, offset: int = 0) -> dict:
    """OpenAI completions logprobs for output tokens ``start:`` (preceded by the prompt's
    tokens when ``prompt``, for echo). ``text_offset`` counts from ``offset``."""
    tokens: list[str] = []
    lps: list[float | None] = []
    tops: list[dict | None] = []
    offsets: list[int] = []
    parts = [_rows(meta, "input", 0)] if prompt else []
    parts.append(_rows(meta, "output", start))
    for entries, rows in parts:
        for (lp, _tok, text), row in zip(entries, rows):
            text = text or ""
            tokens.append(text)
            lps.append(lp)
            tops.append(_top_dict(row, text, lp))
            offsets.append(offset)
            offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_token(lp: float, text: str | None) -> dict:
    text = text or ""
    return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(meta: dict, num_top: int, start: int = 0) -> dict:
    """OpenAI chat logprobs (``{"content": [...]}``) for output tokens ``start:``."""
    entries, rows = _rows(meta, "output", start)
    content = [
        {
            **_chat_token(lp, text),
            "top_logprobs": [_chat_token(t[0], t[2]) for t in (row or [])[:num_top]],
        }
        for (lp, _tok, text), row in zip(entries, rows)
    ]
    return {"content": content, "refusal": None}


def completion_choice(index: int, result: dict, oc: OpenAICall) -> dict:
    meta = result["meta_info"]
    echo = oc.echo_texts[index // oc.n] if oc.echo_texts is not None else ""
    reason, matched = finish_reason(meta)
    logprobs = None
    if oc.logprobs is not None:
        logprobs = completion_logprobs(meta, prompt=oc.echo_texts is not None)
    return {
        "index": index,
        "text": echo + result["text"],
        "logprobs": logprobs,
        "finish_reason": reason,
        "matched_stop": matched,
    }


def tool_output(oc: OpenAICall, text: str) -> ToolOutput:
    """A finished chat completion as content and tool calls (the text unchanged if it holds
    no well-formed call, e.g. an enforced call cut short by max_tokens)."""
    tools = oc.tools
    if tools is None:
        return ToolOutput(text)
    if tools.enforced:
        calls = enforced_calls(tools, text)
        return ToolOutput(None, calls) if calls else ToolOutput(text)
    assert oc.parser is not None
    result = oc.parser.parse(text)
    # Without parallel calls only the first one is answered (the model wrote several anyway).
    calls = result.calls if tools.parallel else result.calls[:1]
    return ToolOutput(result.content, calls)


def chat_choice(index: int, result: dict, oc: OpenAICall) -> dict:
    meta = result["meta_info"]
    reason, matched = finish_reason(meta)
    logprobs = chat_logprobs(meta, oc.logprobs) if oc.logprobs is not None else None
    out = tool_output(oc, result["text"])
    if out.calls:
        reason = "function_call" if oc.tools.legacy else "tool_calls"  # type: ignore[union-attr]
    return {
        "index": index,
        "message": message_fields(out, oc.tools is not None and oc.tools.legacy),
        "logprobs": logprobs,
        "finish_reason": reason,
        "matched_stop": matched,
    }


def usage(results: list[dict], n: int) -> dict:
    """Token counts; a prompt counts once however many samples it has (prompt-major order)."""
    firsts = [r["meta_info"] for r in results[::n]]
    prompt = sum(m["prompt_tokens"] for m in firsts)
    completion = sum(r["meta_info"]["completion_tokens"] for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(m.get("cached_tokens", 0) for m in firsts)},
    }


class StreamState:
    """Turns the tokenizer manager's cumulative per-sample results into OpenAI stream chunks.

    ``head`` is the chunk envelope (id, object, created, model); `chunks` returns the chunks
    for one update of sample ``index`` (text and logprobs since the previous update, and the
    finish); `usage_chunk` is the final usage-only chunk.
    """

    def __init__(self, oc: OpenAICall, head: dict, chat: bool):
        self.oc, self.head, self.chat = oc, head, chat
        self.sent_text: dict[int, str] = {}
        self.sent_tokens: dict[int, int] = {}
        self.offsets: dict[int, int] = {}
        self.finals: dict[int, dict] = {}
        self.tool_streams: dict[int, ToolStream] = {}

    def _chunk(self, index: int, finish: str | None = None, **fields: Any) -> dict:
        choice = {"index": index, **fields, "finish_reason": finish}
        chunk = {**self.head, "choices": [choice]}
        if self.oc.include_usage:
            chunk["usage"] = None
        return chunk

    def role_chunk(self, index: int) -> dict:
        return self._chunk(index, delta={"role": "assistant", "content": ""}, logprobs=None)

    def chunks(self, index: int, result: dict) -> list[dict]:
        meta = result["meta_info"]
        first = index not in self.sent_text
        sent = self.sent_text.get(index, "")
        text = result["text"]
        delta = text[len(sent) :] if text.startswith(sent) else ""
        self.sent_text[index] = sent + delta
        start = self.sent_tokens.get(index, 0)
        self.sent_tokens[index] = meta["completion_tokens"]
        reason, matched = finish_reason(meta)
        if reason is not None:
            self.finals[index] = result
        if self.chat:
            return self._chat_chunks(index, meta, delta, start, reason, matched)
        logprobs = None
        echo = first and self.oc.echo_texts is not None
        if self.oc.logprobs is not None:
            offset = self.offsets.get(index, 0)
            logprobs = completion_logprobs(meta, start, echo, offset)
            self.offsets[index] = offset + sum(map(len, logprobs["tokens"]))
        if echo:
            delta = self.oc.echo_texts[index // self.oc.n] + delta  # type: ignore[index]
        if not delta and reason is None and not (logprobs and logprobs["tokens"]):
            return []
        extra = {"matched_stop": matched} if reason is not None else {}
        return [self._chunk(index, reason, text=delta, logprobs=logprobs, **extra)]

    def _chat_chunks(self, index, meta, delta, start, reason, matched) -> list[dict]:
        out = []
        logprobs = None
        if self.oc.logprobs is not None:
            logprobs = chat_logprobs(meta, self.oc.logprobs, start)
        if self.oc.tools is not None:
            deltas = self._tool_deltas(index, reason is not None)
        else:
            deltas = [{"content": delta}] if delta else []
        if not deltas and logprobs and logprobs["content"]:
            deltas = [{}]  # the logprobs of held-back text still go out as they come
        for i, d in enumerate(deltas):
            out.append(self._chunk(index, delta=d, logprobs=logprobs if i == 0 else None))
        if reason is not None:
            stream = self.tool_streams.get(index)
            if stream is not None and stream.called:
                reason = "function_call" if self.oc.tools.legacy else "tool_calls"  # type: ignore[union-attr]
            out.append(self._chunk(index, reason, delta={}, logprobs=None, matched_stop=matched))
        return out

    def _tool_deltas(self, index: int, finished: bool) -> list[dict]:
        stream = self.tool_streams.get(index)
        if stream is None:
            stream = self.tool_streams[index] = ToolStream(self.oc.tools, self.oc.parser)  # type: ignore[arg-type]
        return stream.update(self.sent_text[index], finished)

    def usage_chunk(self) -> dict:
        results = [self.finals[i] for i in sorted(self.finals)]
        return {**self.head, "choices": [], "usage": usage(results, self.oc.n)}

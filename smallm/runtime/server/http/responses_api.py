"""``POST /v1/responses``: OpenAI's Responses API, text in and text out, over the chat path.

A Responses body is translated into a chat body (``input`` items -> messages, ``instructions``
-> a system message, ``text.format`` -> ``response_format``, flat function tools -> chat tools,
``max_output_tokens`` -> ``max_completion_tokens``) and run by the same code as
``/v1/chat/completions``, so tools, constrained formats and sampling behave identically. Its
result, or its chat stream, is then reshaped into a ``response`` object with ``message`` and
``function_call`` output items, or into the Responses streaming events (``response.created``,
``response.output_text.delta``, ..., ``response.completed``). Nothing is stored: ``store`` is
accepted and ignored, ``previous_response_id`` is a 400.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from aiohttp import web

from smallm.runtime.request_builder import RequestError
from smallm.runtime.sampling import SamplingParamsError
from smallm.runtime.server.http import openai_protocol as proto
from smallm.runtime.server.http.context import SERVER, ServerContext
from smallm.runtime.server.http.errors import ApiError, error_body, read_json
from smallm.runtime.server.http.sse import open_stream
from smallm.runtime.server.tokenizer_manager import GenerationFailed

# Chat fields a Responses error may name, and the Responses field the client sent instead.
_PUBLIC = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text",
}
# Responses fields with the same meaning (and name) in a chat body.
_PASS = ("temperature", "top_p", "parallel_tool_calls", "seed", "top_k", "min_p", "stop")


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param)


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad("input", f"{where}.content must be a string or a list of content parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(
            part.get("text"), str
        ):
            raise _bad("input", f"{where}: only text content parts are supported, got {kind!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def _messages(body: dict) -> list[dict]:
    raw = body.get("input")
    messages: list[dict] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad("instructions", "instructions must be a string")
        messages.append({"role": "system", "content": instructions})
    if isinstance(raw, str):
        return [*messages, {"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise _bad("input", "input is required: a string or a non-empty list of input items")
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad("input", f"{where} must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(
                {"role": item.get("role"), "content": _text_of(item.get("content"), where)}
            )
        elif kind == "function_call":
            call = {
                "id": item.get("call_id") or item.get("id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                output = json.dumps(output)
            messages.append(
                {"role": "tool", "tool_call_id": item.get("call_id"), "content": output}
            )
        else:
            raise _bad("input", f"{where}: unsupported input item type {kind!r}")
    return messages


def _tools(tools: Any) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise _bad("tools", "tools must be a list of function tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else type(t).__name__
            raise _bad("tools", f"tools[{i}]: only function tools are supported, got {kind!r}")
        fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text: Any) -> dict | None:
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise _bad("text", "text.format must be an object")
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    return fmt


def chat_body(body: Any) -> dict:
    """The ``/v1/chat/completions`` body a Responses body stands for (400s name the field)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
    if body.get("previous_response_id") is not None:
        raise _bad(
            "previous_response_id",
            "previous_response_id is not supported: responses are not stored; send the "
            "conversation in input",
        )
    if body.get("background"):
        raise _bad("background", "background responses are not supported")
    chat: dict[str, Any] = {k: body[k] for k in _PASS if body.get(k) is not None}
    chat["messages"] = _messages(body)
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    tools = _tools(body.get("tools"))
    if tools:
        chat["tools"] = tools
        if body.get("tool_choice") is not None:
            chat["tool_choice"] = _tool_choice(body["tool_choice"])
    rf = _response_format(body.get("text"))
    if rf is not None:
        chat["response_format"] = rf
    if body.get("stream") is not None:
        chat["stream"] = body["stream"]
    return chat


class _Builder:
    """Builds the ``response`` object and its output items from chat results."""

    def __init__(self, ctx: ServerContext, body: dict) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.msg_id = f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = ctx.info.served_model_name
        self.body = body

    def response(
        self, status: str, output: list[dict], usage: dict | None, reason: str | None
    ) -> dict:
        b = self.body
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": output,
            "usage": usage,
            "incomplete_details": {"reason": "max_output_tokens"} if reason == "length" else None,
            "error": None,
            "instructions": b.get("instructions"),
            "max_output_tokens": b.get("max_output_tokens"),
            "temperature": b.get("temperature"),
            "top_p": b.get("top_p"),
            "tools": b.get("tools") or [],
            "tool_choice": b.get("tool_choice", "auto"),
            "parallel_tool_calls": b.get("parallel_tool_calls", True),
            "text": b.get("text") or {"format": {"type": "text"}},
            "metadata": b.get("metadata"),
            "store": False,
        }

    def message(self, text: str, status: str = "completed") -> dict:
        return {
            "type": "message",
            "id": self.msg_id,
            "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }

    @staticmethod
    def function_call(call: dict) -> dict:
        fn = call["function"]
        return {
            "type": "function_call",
            "id": f"fc_{uuid.uuid4().hex}",
            "call_id": call["id"],
            "name": fn["name"],
            "arguments": fn["arguments"],
            "status": "completed",
        }


def _usage(chat_usage: dict) -> dict:
    return {
        "input_tokens": chat_usage["prompt_tokens"],
        "output_tokens": chat_usage["completion_tokens"],
        "total_tokens": chat_usage["total_tokens"],
        "input_tokens_details": chat_usage.get("prompt_tokens_details") or {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }


async def responses(request: web.Request) -> web.StreamResponse:
    ctx = request.app[SERVER]
    body = await read_json(request)
    chat = chat_body(body)
    try:
        oc = proto.chat_call(
            chat,
            ctx.tokenizer,
            ctx.info.context_length,
            ctx.tool_parser,
            ctx.args.tool_call_structural_tag,
        )
    except ApiError as e:  # name the Responses field, not the chat field it became
        raise ApiError(e.status, e.message, _PUBLIC.get(e.param or "", e.param)) from None
    oc.include_usage = True
    call = oc.call
    call.rid = call.rid or uuid.uuid4().hex
    try:
        msgs = await ctx.tm.prepare(call)
    except (RequestError, SamplingParamsError) as e:
        err = proto.rename_error(e, oc.names)
        raise ApiError(err.status, err.message, _PUBLIC.get(err.param or "", err.param)) from None
    group = await ctx.tm.submit(msgs, call.return_text_in_logprobs)
    b = _Builder(ctx, body)
    try:
        if not oc.stream:
            await ctx.tm.wait(group)
            result = group.states[0].result()
            choice = proto.chat_choice(0, result, oc)
            msg = choice["message"]
            output = [b.message(msg["content"])] if msg.get("content") else []
            output += [b.function_call(c) for c in msg.get("tool_calls") or []]
            usage = _usage(proto.usage([result], 1))
            return web.json_response(
                b.response(
                    "completed" if choice["finish_reason"] != "length" else "incomplete",
                    output,
                    usage,
                    choice["finish_reason"],
                )
            )
        return await _stream(request, ctx, oc, group, b)
    finally:
        ctx.tm.abort_unfinished(group)


class _Events:
    """Numbered Responses stream events."""

    def __init__(self, resp: web.StreamResponse) -> None:
        self.resp, self.seq = resp, 0

    async def send(self, kind: str, **fields: Any) -> None:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        await self.resp.write(
            f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
        )


async def _stream(request, ctx, oc, group, b: _Builder) -> web.StreamResponse:
    state = proto.StreamState(oc, {}, chat=True)
    resp = await open_stream(request)
    ev = _Events(resp)
    text = ""
    text_open = False
    calls: dict[int, dict] = {}
    reason = None
    usage = None
    try:
        await ev.send("response.created", response=b.response("in_progress", [], None, None))
        await ev.send("response.in_progress", response=b.response("in_progress", [], None, None))
        try:
            async for i, result in ctx.tm.stream(group):
                for chunk in state.chunks(i, result):
                    ch = chunk["choices"][0]
                    delta = ch.get("delta") or {}
                    piece = delta.get("content")
                    if piece:
                        if not text_open:
                            text_open = True
                            await ev.send(
                                "response.output_item.added",
                                output_index=0,
                                item=b.message("", "in_progress"),
                            )
                            part = {"type": "output_text", "text": "", "annotations": []}
                            await ev.send(
                                "response.content_part.added",
                                item_id=b.msg_id,
                                output_index=0,
                                content_index=0,
                                part=part,
                            )
                        text += piece
                        await ev.send(
                            "response.output_text.delta",
                            item_id=b.msg_id,
                            output_index=0,
                            content_index=0,
                            delta=piece,
                            logprobs=[],
                        )
                    for tc in delta.get("tool_calls") or []:
                        entry = calls.setdefault(
                            tc["index"], {"id": None, "function": {"name": None, "arguments": ""}}
                        )
                        entry["id"] = tc.get("id") or entry["id"]
                        fn = tc.get("function") or {}
                        entry["function"]["name"] = fn.get("name") or entry["function"]["name"]
                        entry["function"]["arguments"] += fn.get("arguments") or ""
                    if ch.get("finish_reason"):
                        reason = ch["finish_reason"]
            usage = _usage(state.usage_chunk()["usage"])
        except GenerationFailed as e:
            await ev.send("error", **error_body(e.status, str(e))["error"])
            return resp
        output = []
        if text_open:
            part = {"type": "output_text", "text": text, "annotations": []}
            await ev.send(
                "response.output_text.done",
                item_id=b.msg_id,
                output_index=0,
                content_index=0,
                text=text,
                logprobs=[],
            )
            await ev.send(
                "response.content_part.done",
                item_id=b.msg_id,
                output_index=0,
                content_index=0,
                part=part,
            )
            output.append(b.message(text))
            await ev.send("response.output_item.done", output_index=0, item=output[-1])
        for k in sorted(calls):
            item = b.function_call(calls[k])
            index = len(output)
            await ev.send(
                "response.output_item.added",
                output_index=index,
                item={**item, "status": "in_progress"},
            )
            await ev.send(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                arguments=item["arguments"],
                name=item["name"],
            )
            output.append(item)
            await ev.send("response.output_item.done", output_index=index, item=item)
        status = "incomplete" if reason == "length" else "completed"
        await ev.send(f"response.{status}", response=b.response(status, output, usage, reason))
    except ConnectionError:
        pass  # the client left; the caller's `finally` aborts what is still running
    return resp


def add_responses_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses", responses)

"""OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

The request and response conversions live in ``openai_protocol.py``; this module runs the
calls through the tokenizer manager, as the native ``/generate`` handler does (including
streaming, client disconnects and aborting what is left when a handler exits).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from aiohttp import web

from smallm.runtime.request_builder import RequestError, check_dp_rank
from smallm.runtime.sampling import SamplingParamsError
from smallm.runtime.server.http import openai_protocol as proto
from smallm.runtime.server.http.context import SERVER, ServerContext
from smallm.runtime.server.http.errors import ApiError, error_body, read_json
from smallm.runtime.server.http.sse import DONE, event, open_stream
from smallm.runtime.server.tokenizer_manager import GenerationFailed

OWNED_BY = "sglang"  # routers tell SGLang-API workers apart by it (COMPAT.md)

ChoiceFn = Callable[[int, dict, proto.OpenAICall], dict]


async def completions(request: web.Request) -> web.StreamResponse:
    ctx = request.app[SERVER]
    oc = proto.completion_call(await read_json(request), ctx.tokenizer)
    return await _run(request, ctx, oc, "cmpl", "text_completion", proto.completion_choice)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    ctx = request.app[SERVER]
    oc = proto.chat_call(
        await read_json(request),
        ctx.tokenizer,
        ctx.info.context_length,
        ctx.tool_parser,
        ctx.args.tool_call_structural_tag,
    )
    return await _run(request, ctx, oc, "chatcmpl", "chat.completion", proto.chat_choice)


async def _run(
    request: web.Request,
    ctx: ServerContext,
    oc: proto.OpenAICall,
    id_prefix: str,
    obj: str,
    choice: ChoiceFn,
) -> web.StreamResponse:
    """Submit ``oc`` and answer with one JSON response or an SSE stream of chunks."""
    call = oc.call
    check_dp_rank(call.data_parallel_rank, ctx.args.dp_size)
    if call.rid is None and call.is_single:
        call.rid = uuid.uuid4().hex  # the response id names the native request (abortable)
    try:
        msgs = await ctx.tm.prepare(call)
    except (RequestError, SamplingParamsError) as e:
        raise proto.rename_error(e, oc.names) from None
    group = await ctx.tm.submit(msgs, call.return_text_in_logprobs)
    head = {
        "id": f"{id_prefix}-{call.rid or uuid.uuid4().hex}",
        "object": obj,
        "created": int(time.time()),
        "model": ctx.info.served_model_name,
    }
    try:
        if not oc.stream:
            await ctx.tm.wait(group)
            results = [s.result() for s in group.states]
            body = {
                **head,
                "choices": [choice(i, r, oc) for i, r in enumerate(results)],
                "usage": proto.usage(results, oc.n),
            }
            return web.json_response(body)
        return await _stream(request, ctx, oc, group, head, chat=obj == "chat.completion")
    finally:
        ctx.tm.abort_unfinished(group)


async def _stream(request, ctx, oc, group, head, chat: bool) -> web.StreamResponse:
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    state = proto.StreamState(oc, head, chat)
    resp = await open_stream(request)
    try:
        try:
            if chat:
                for i in range(len(group.states)):
                    await resp.write(event(state.role_chunk(i)))
            async for i, result in ctx.tm.stream(group):
                for chunk in state.chunks(i, result):
                    await resp.write(event(chunk))
            if oc.include_usage:
                await resp.write(event(state.usage_chunk()))
        except GenerationFailed as e:
            await resp.write(event(error_body(e.status, str(e))))
        await resp.write(DONE)
    except ConnectionError:
        pass  # the client left; the caller's `finally` aborts what is still running
    return resp


def _model_card(ctx: ServerContext) -> dict:
    name = ctx.info.served_model_name
    return {
        "id": name,
        "object": "model",
        "created": int(ctx.started),
        "owned_by": OWNED_BY,
        "root": name,
        "max_model_len": ctx.info.context_length,
    }


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request.app[SERVER])]})


async def get_model(request: web.Request) -> web.Response:
    ctx = request.app[SERVER]
    model = request.match_info["model"]
    if model != ctx.info.served_model_name:
        raise ApiError(404, f"the model {model!r} does not exist", "model")
    return web.json_response(_model_card(ctx))


def add_openai_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/completions", completions)
    r.add_post("/v1/chat/completions", chat_completions)
    r.add_get("/v1/models", list_models)
    r.add_get("/v1/models/{model:.+}", get_model)

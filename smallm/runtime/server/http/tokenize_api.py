"""vLLM's tokenizer routes: ``/tokenize``, ``/detokenize`` and ``/tokenizer_info``.

Shapes (vLLM's, which lm-evaluation-harness' ``tokenizer_backend=remote`` and other clients
read): ``POST /tokenize {"prompt": str, "add_special_tokens": true, "return_token_strs": false}``
or ``{"messages": [...], "add_generation_prompt": true, "tools": [...]}`` (rendered exactly as
``/v1/chat/completions`` renders them) -> ``{"count", "max_model_len", "tokens", "token_strs"}``;
``POST /detokenize {"tokens": [...]}`` -> ``{"prompt": str}``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from smallm.runtime.request_builder import is_list_of
from smallm.runtime.server.http import openai_protocol as proto
from smallm.runtime.server.http.context import SERVER
from smallm.runtime.server.http.errors import ApiError, read_json
from smallm.runtime.server.http.tool_calls import tool_request


async def tokenize(request: web.Request) -> web.Response:
    ctx = request.app[SERVER]
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object with prompt or messages")
    want_strs = proto.opt_bool(body, "return_token_strs")
    if body.get("messages") is not None:
        if body.get("prompt") is not None:
            raise ApiError(400, "give prompt or messages, not both", "prompt")
        messages = proto.chat_messages(body["messages"])
        tools = tool_request(body)
        specials = proto.opt_bool(body, "add_special_tokens", False)

        def encode(tok: Any) -> list[int]:
            text = proto.render_chat_prompt(tok, body, messages, tools, ctx.tool_parser)
            return tok.encode(text, add_special_tokens=specials)

    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt is required: a string (or send messages)", "prompt")
        specials = proto.opt_bool(body, "add_special_tokens", True)

        def encode(tok: Any) -> list[int]:
            return tok.encode(prompt, add_special_tokens=specials)

    ids = await ctx.tm.run_tokenizer(encode)
    strs = ctx.tokenizer.convert_ids_to_tokens(ids) if want_strs else None
    return web.json_response(
        {
            "count": len(ids),
            "max_model_len": ctx.info.context_length,
            "tokens": ids,
            "token_strs": strs,
        }
    )


async def detokenize(request: web.Request) -> web.Response:
    ctx = request.app[SERVER]
    body = await read_json(request)
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not (tokens == [] or is_list_of(tokens, int)):
        raise ApiError(400, "tokens is required: a list of token ids", "tokens")
    vocab = max(ctx.info.vocab_size, len(ctx.tokenizer))
    bad = next((t for t in tokens if not 0 <= t < vocab), None)  # type: ignore[union-attr]
    if bad is not None:
        raise ApiError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", "tokens")
    text = await ctx.tm.run_tokenizer(lambda tok: tok.decode(tokens))
    return web.json_response({"prompt": text})


async def tokenizer_info(request: web.Request) -> web.Response:
    ctx = request.app[SERVER]
    tok = ctx.tokenizer
    return web.json_response(
        {
            "tokenizer_class": type(tok).__name__,
            "eos_token": tok.eos_token,
            "eos_token_id": tok.eos_token_id,
            "bos_token": tok.bos_token,
            "bos_token_id": tok.bos_token_id,
            "pad_token": tok.pad_token,
            "chat_template": getattr(tok, "chat_template", None),
            "vocab_size": len(tok),
            "model_max_length": ctx.info.context_length,
        }
    )


def add_tokenize_routes(app: web.Application) -> None:
    r = app.router
    for prefix in ("", "/v1"):
        r.add_post(prefix + "/tokenize", tokenize)
        r.add_post(prefix + "/detokenize", detokenize)
    r.add_get("/tokenizer_info", tokenizer_info)

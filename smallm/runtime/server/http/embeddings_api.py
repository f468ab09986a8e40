"""``POST /v1/embeddings``: the mean of the model's last hidden states over the input's
tokens, L2-normalised.

"Last hidden state" is the output of the model's final norm, the vector the LM head reads; the
mean runs over every input token (no special tokens are added). A causal chat model is not a
trained embedding model, so these vectors suit similarity within one model, not benchmarks.
Each input is a prefill-only request (``max_new_tokens`` 0) that computes every position
itself (no prefix-cache reuse for it), batched with other traffic like any prefill.
"""

from __future__ import annotations

import base64
import struct
import uuid

from aiohttp import web

from smallm.runtime.request_builder import GenerateCall, RequestError, is_list_of
from smallm.runtime.sampling import SamplingParamsError
from smallm.runtime.server.http import openai_protocol as proto
from smallm.runtime.server.http.context import SERVER
from smallm.runtime.server.http.errors import ApiError, read_json

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request


def _inputs(body: dict) -> tuple[list[str] | None, list[list[int]] | None]:
    value = body.get("input")
    if isinstance(value, str):
        value = [value]
    if is_list_of(value, str):
        if any(not s for s in value):
            raise ApiError(400, "input strings must not be empty", "input")
        return value, None
    if is_list_of(value, int):
        return None, [value]
    if is_list_of(value, list) and all(is_list_of(v, int) for v in value):
        return None, value
    raise ApiError(
        400,
        "input is required: a string, a list of strings, a list of token ids, or a list of "
        "token-id lists (none empty)",
        "input",
    )


async def embeddings(request: web.Request) -> web.Response:
    ctx = request.app[SERVER]
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
    texts, ids = _inputs(body)
    count = len(texts or ids or [])
    if count > MAX_INPUTS:
        raise ApiError(400, f"at most {MAX_INPUTS} inputs per request, got {count}", "input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(
            400, f"encoding_format must be float or base64, got {fmt!r}", "encoding_format"
        )
    dims = proto.opt_int(body, "dimensions", 1)
    if texts is not None:
        ids = await ctx.tm.run_tokenizer(
            lambda tok: [tok.encode(t, add_special_tokens=False) for t in texts]
        )
    call = GenerateCall(input_ids=ids, sampling_params={"max_new_tokens": 0})
    try:
        msgs = await ctx.tm.prepare(call)
    except (RequestError, SamplingParamsError) as e:
        raise proto.rename_error(e, {"input_ids": "input", "text": "input"}) from None
    for m in msgs:
        m.return_embedding = True
    group = await ctx.tm.submit(msgs, False)
    try:
        await ctx.tm.wait(group)
        results = [s.result() for s in group.states]
    finally:
        ctx.tm.abort_unfinished(group)
    data = []
    for i, r in enumerate(results):
        vec = r.get("embedding")
        if vec is None:
            raise ApiError(500, "the scheduler returned no embedding")
        if dims is not None and dims != len(vec):
            raise ApiError(
                400,
                f"dimensions must be the model's hidden size ({len(vec)}): this model's "
                "embeddings cannot be shortened",
                "dimensions",
            )
        value = (
            vec if fmt == "float" else base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        )
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = sum(r["meta_info"]["prompt_tokens"] for r in results)
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "model": ctx.info.served_model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "id": f"embd-{uuid.uuid4().hex}",
        }
    )


def add_embeddings_routes(app: web.Application) -> None:
    app.router.add_post("/v1/embeddings", embeddings)

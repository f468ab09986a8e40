"""``GET /openapi.json``: an OpenAPI 3.1 description of every route the server has.

The paths come from the live router, so a route added without a description still appears
(with a generic one) and the document can never list a route that does not exist. The
request bodies name the main fields; docs/openai.md and docs/server.md have the details.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from smallm import __version__


def _obj(*required: str, **props: Any) -> dict:
    return {"type": "object", "properties": props, "required": list(required)}


_ANY = {}
_STR = {"type": "string"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_NUM = {"type": "number"}
_MESSAGES = {"type": "array", "items": _obj("role", role=_STR, content=_ANY)}
_SAMPLING = {
    "temperature": _NUM,
    "top_p": _NUM,
    "top_k": _INT,
    "min_p": _NUM,
    "n": _INT,
    "stop": _ANY,
    "seed": _INT,
    "presence_penalty": _NUM,
    "frequency_penalty": _NUM,
    "logit_bias": {"type": "object", "additionalProperties": _NUM},
    "stream": _BOOL,
    "regex": _STR,
    "json_schema": _ANY,
    "ebnf": _STR,
    "guided_json": _ANY,
    "guided_regex": _STR,
    "guided_choice": {"type": "array", "items": _STR},
    "guided_grammar": _STR,
    "structured_outputs": _ANY,
}

# (method, path) -> (summary, request body schema or None)
_ROUTES: dict[tuple[str, str], tuple[str, dict | None]] = {
    ("POST", "/generate"): (
        "SGLang-native generation",
        _obj(
            text=_ANY,
            input_ids=_ANY,
            sampling_params=_obj(
                max_new_tokens=_INT,
                temperature=_NUM,
                regex=_STR,
                json_schema=_STR,
                ebnf=_STR,
                structural_tag={
                    "type": "string",
                    "description": 'JSON: {"structures": [{"begin", "schema", "end"}], '
                    '"triggers": [...]}',
                },
            ),
            stream=_BOOL,
            return_logprob=_ANY,
        ),
    ),
    ("POST", "/v1/completions"): (
        "OpenAI completions",
        _obj(
            "prompt",
            model=_STR,
            prompt=_ANY,
            max_tokens=_INT,
            echo=_BOOL,
            logprobs=_INT,
            **_SAMPLING,
        ),
    ),
    ("POST", "/v1/chat/completions"): (
        "OpenAI chat completions, with tools and structured outputs",
        _obj(
            "messages",
            model=_STR,
            messages=_MESSAGES,
            max_tokens=_INT,
            max_completion_tokens=_INT,
            tools={"type": "array"},
            tool_choice=_ANY,
            parallel_tool_calls=_BOOL,
            functions={"type": "array"},
            function_call=_ANY,
            response_format=_ANY,
            logprobs=_BOOL,
            top_logprobs=_INT,
            **_SAMPLING,
        ),
    ),
    ("POST", "/v1/responses"): (
        "OpenAI Responses (text in, text out; function tools; streaming events)",
        _obj(
            "input",
            model=_STR,
            input=_ANY,
            instructions=_STR,
            max_output_tokens=_INT,
            tools=_ANY,
            tool_choice=_ANY,
            text=_ANY,
            stream=_BOOL,
        ),
    ),
    ("POST", "/v1/embeddings"): (
        "mean-pooled, L2-normalised last hidden states",
        _obj("input", model=_STR, input=_ANY, encoding_format=_STR, dimensions=_INT),
    ),
    ("POST", "/tokenize"): (
        "vLLM tokenize: prompt or chat messages to token ids",
        _obj(prompt=_STR, messages=_MESSAGES, add_special_tokens=_BOOL, return_token_strs=_BOOL),
    ),
    ("POST", "/detokenize"): (
        "vLLM detokenize: token ids to text",
        _obj("tokens", tokens={"type": "array", "items": _INT}),
    ),
    ("GET", "/tokenizer_info"): ("eos/bos tokens and the chat template", None),
    ("GET", "/v1/models"): ("the served model", None),
    ("GET", "/health"): ("liveness (200 when the workers are up)", None),
    ("GET", "/health_generate"): ("readiness: runs a one-token generation", None),
    ("GET", "/get_model_info"): ("model and tokenizer paths (SGLang)", None),
    ("GET", "/get_server_info"): ("flags and scheduler state (SGLang)", None),
    ("GET", "/metrics"): ("Prometheus metrics (SGLang names)", None),
    ("POST", "/abort_request"): ("abort a request by rid, or all", _obj(rid=_STR, abort_all=_BOOL)),
    ("GET", "/openapi.json"): ("this document", None),
}


def _canonical(path: str) -> str:
    """Aliases share their twin's description."""
    for alias, twin in (
        ("/v1/tokenize", "/tokenize"),
        ("/v1/detokenize", "/detokenize"),
        ("/model_info", "/get_model_info"),
        ("/server_info", "/get_server_info"),
    ):
        if path == alias:
            return twin
    return path


def openapi_spec(app: web.Application) -> dict:
    """The OpenAPI document for ``app``'s routes."""
    paths: dict[str, dict] = {}
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if not path or route.method == "HEAD":
            continue
        methods = ["GET", "POST", "PUT", "DELETE"] if route.method == "*" else [route.method]
        for method in methods:
            summary, schema = _ROUTES.get((method, _canonical(path)), (f"{method} {path}", None))
            op: dict[str, Any] = {
                "summary": summary,
                "responses": {
                    "200": {"description": "success"},
                    "400": {"description": 'bad input: {"error": {message, type, param, code}}'},
                },
            }
            if schema is not None:
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": schema}},
                }
            paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "smallm", "version": __version__},
        "paths": dict(sorted(paths.items())),
    }


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi_spec(request.app))


def add_openapi_route(app: web.Application) -> None:
    app.router.add_get("/openapi.json", openapi_json)

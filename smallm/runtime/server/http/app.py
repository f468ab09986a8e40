"""The aiohttp application: middlewares (auth, draining, errors) and the route tables."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from smallm.runtime.request_builder import RequestError, error_param
from smallm.runtime.sampling import SamplingParamsError
from smallm.runtime.server.http.context import SERVER, ServerContext
from smallm.runtime.server.http.errors import ApiError, error_response
from smallm.runtime.server.tokenizer_manager import GenerationFailed

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Routes that answer without an API key and while draining (probes must see the real state).
_OPEN_PATHS = {"/health"}
_DRAIN_EXEMPT = {"/health", "/metrics", "/get_server_info", "/server_info", "/get_load"}


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    key = request.app[SERVER].args.api_key
    authorized = request.headers.get("Authorization", "") == f"Bearer {key}"
    if key and request.path not in _OPEN_PATHS and not authorized:
        return error_response(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")
    return await handler(request)


@web.middleware
async def _drain(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.app[SERVER].draining and request.path not in _DRAIN_EXEMPT:
        return error_response(503, "the server is shutting down")
    return await handler(request)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e.status, e.message, e.param)
    except (RequestError, SamplingParamsError) as e:
        return error_response(400, str(e), error_param(e))
    except GenerationFailed as e:
        return error_response(e.status, str(e))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = e.text if e.status != 413 else (
            f"the request body is larger than --max-request-bytes "
            f"({request.app[SERVER].args.max_request_bytes} bytes)"
        )  # fmt: skip
        return error_response(e.status, message)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as e:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, f"internal error: {type(e).__name__}: {e}")


def build_app(ctx: ServerContext) -> web.Application:
    from smallm.runtime.server.http.embeddings_api import add_embeddings_routes
    from smallm.runtime.server.http.native import add_native_routes
    from smallm.runtime.server.http.openai_api import add_openai_routes
    from smallm.runtime.server.http.openapi import add_openapi_route
    from smallm.runtime.server.http.responses_api import add_responses_routes
    from smallm.runtime.server.http.router_api import add_router_routes
    from smallm.runtime.server.http.tokenize_api import add_tokenize_routes

    app = web.Application(
        client_max_size=ctx.args.max_request_bytes, middlewares=[_errors, _auth, _drain]
    )
    app[SERVER] = ctx
    add_native_routes(app)
    add_openai_routes(app)
    add_responses_routes(app)
    add_embeddings_routes(app)
    add_tokenize_routes(app)
    add_router_routes(app)
    add_openapi_route(app)
    return app

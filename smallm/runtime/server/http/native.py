"""SGLang-native routes: /generate, model and server info, health, cache flush, abort."""

from __future__ import annotations

import asyncio
import os
import platform
import time

from aiohttp import web

from smallm import __version__
from smallm.runtime.messages import SchedulerStats
from smallm.runtime.metrics import CONTENT_TYPE
from smallm.runtime.request_builder import GenerateCall, check_dp_rank
from smallm.runtime.server.http.context import SERVER, ServerContext
from smallm.runtime.server.http.errors import ApiError, error_body, read_json
from smallm.runtime.server.http.router_api import model_arch, server_info_fields
from smallm.runtime.server.http.sse import DONE, event, open_stream
from smallm.runtime.server.tokenizer_manager import (
    GenerationFailed,
    ServiceUnavailable,
    TokenizerManager,
)

HEALTH_GENERATE_TIMEOUT_S = 20.0


async def generate(request: web.Request) -> web.StreamResponse:
    ctx = request.app[SERVER]
    call = GenerateCall.from_json(await read_json(request))
    check_dp_rank(call.data_parallel_rank, ctx.args.dp_size)
    group = await ctx.tm.submit(await ctx.tm.prepare(call), call.return_text_in_logprobs)
    try:
        if not call.stream:
            await ctx.tm.wait(group)
            results = [s.result() for s in group.states]
            single = call.is_single and len(results) == 1
            return web.json_response(results[0] if single else results)
        resp = await open_stream(request)
        try:
            try:
                async for i, chunk in ctx.tm.stream(group):
                    if len(group.states) > 1:
                        chunk["index"] = i
                    await resp.write(event(chunk))
            except GenerationFailed as e:
                await resp.write(event(error_body(e.status, str(e))))
            await resp.write(DONE)
        except ConnectionError:
            pass  # the client left; `finally` aborts what is still running
        return resp
    finally:
        ctx.tm.abort_unfinished(group)


def model_info(ctx: ServerContext) -> dict:
    return {
        "model_path": ctx.info.model_path,
        "tokenizer_path": ctx.info.tokenizer_path,
        "is_generation": True,
        **model_arch(ctx.info.model_path),
        "served_model_name": ctx.info.served_model_name,
        "context_length": ctx.info.context_length,
        "vocab_size": ctx.info.vocab_size,
        # An extra over SGLang's fields: lets a remote frontend render prompts as this
        # server's chat endpoint does (smallm.lang.RuntimeEndpoint uses it).
        "chat_template": getattr(ctx.tokenizer, "chat_template", None),
    }


async def get_model_info(request: web.Request) -> web.Response:
    return web.json_response(model_info(request.app[SERVER]))


async def get_server_info(request: web.Request) -> web.Response:
    ctx = request.app[SERVER]
    args = {k: v for k, v in vars(ctx.args).items() if k != "api_key"}
    stats = ctx.tm.stats
    return web.json_response(
        {
            **server_info_fields(ctx),
            **args,
            **model_info(ctx),
            "version": __version__,
            "max_total_tokens": ctx.info.max_total_tokens,
            "max_running_requests": ctx.info.max_running_requests,
            **ctx.info.extra,
            "pid": os.getpid(),
            "worker_pids": ctx.worker_pids,
            "python": platform.python_version(),
            "uptime_s": time.time() - ctx.started,
            "healthy": ctx.healthy,
            "draining": ctx.draining,
            "num_pending_requests": ctx.tm.num_pending,
            "scheduler_stats": None if stats is None else {**stats_fields(stats), "token_usage": stats.token_usage},
            "replicas": replica_info(ctx.tm),
        }
    )  # fmt: skip


def stats_fields(stats: SchedulerStats) -> dict:
    """A scheduler report's gauges and counters (its per-report latency list is for /metrics)."""
    return {k: v for k, v in vars(stats).items() if k != "kv_transfer_latencies"}


def replica_info(tm: TokenizerManager) -> list[dict]:
    """Each data-parallel replica: alive, its load as the coordinator sees it, its gauges."""
    out = []
    for r in tm.coordinator.replicas:
        stats = tm.rank_stats.get(r.rank)
        out.append(
            {
                "dp_rank": r.rank,
                "alive": r.alive,
                "num_unfinished_reqs": r.load,
                "num_placed_reqs": tm.coordinator.placed[r.rank],
                "scheduler_stats": None if stats is None else stats_fields(stats),
            }
        )
    return out


async def health(request: web.Request) -> web.Response:
    ctx = request.app[SERVER]
    if not ctx.healthy:
        return web.json_response(error_body(503, f"unhealthy: {ctx.tm.unavailable}"), status=503)
    return web.Response(status=200, text="")


async def health_generate(request: web.Request) -> web.Response:
    """Healthy only if the whole pipeline produces a token."""
    ctx = request.app[SERVER]
    if not ctx.healthy:
        raise ServiceUnavailable(ctx.tm.unavailable or "unhealthy")
    call = GenerateCall(
        input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0}, rid=None
    )
    try:
        await asyncio.wait_for(ctx.tm.generate(call), HEALTH_GENERATE_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise ApiError(503, "no token within the health-check timeout") from None
    return web.Response(status=200, text="")


async def flush_cache(request: web.Request) -> web.Response:
    ctx = request.app[SERVER]
    if await ctx.tm.flush_cache():
        return web.Response(status=200, text="Cache flushed.\n")
    raise ApiError(400, "cache not flushed: requests are running; retry when idle")


async def abort_request(request: web.Request) -> web.Response:
    ctx = request.app[SERVER]
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object with rid or abort_all")
    if body.get("abort_all"):
        ctx.tm.abort_all()
        return web.json_response({"aborted": "all"})
    rid = body.get("rid")
    if not isinstance(rid, str) or not rid:
        raise ApiError(400, "give rid (a string) or abort_all: true", "rid")
    return web.json_response({"aborted": ctx.tm.abort_rid(rid)})


async def metrics(request: web.Request) -> web.Response:
    ctx = request.app[SERVER]
    if ctx.metrics is None:
        raise ApiError(404, "metrics are disabled (start the server without --disable-metrics)")
    resp = web.Response(body=ctx.metrics.render())
    resp.headers["Content-Type"] = CONTENT_TYPE
    return resp


def add_native_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/generate", generate)
    r.add_put("/generate", generate)
    for path in ("/get_model_info", "/model_info"):
        r.add_get(path, get_model_info)
    for path in ("/get_server_info", "/server_info"):
        r.add_get(path, get_server_info)
    r.add_get("/health", health)
    r.add_get("/health_generate", health_generate)
    r.add_route("*", "/flush_cache", flush_cache)
    r.add_post("/abort_request", abort_request)
    r.add_get("/metrics", metrics)

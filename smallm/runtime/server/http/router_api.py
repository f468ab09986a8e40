"""What SGLang's router and the inference gateway read from a worker, beyond the native API.

``GET /get_load`` is the per-replica load list sglang-router polls (its power-of-two policy
and its own ``/get_loads`` read the sum of ``num_tokens``); the helpers here add the fields the
router parses from ``/server_info`` and ``/model_info`` (see docs/server.md, "Behind SGLang's
router").
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from aiohttp import web

from smallm.runtime.messages import SchedulerStats
from smallm.runtime.server.http.context import SERVER, ServerContext
from smallm.runtime.server.kv_events import advertised


def load_entries(rank_stats: dict[int, SchedulerStats], size: int) -> list[dict[str, int]]:
    """One ``{dp_rank, num_reqs, num_waiting_reqs, num_tokens}`` per replica, by rank; a
    replica that has not reported yet counts as idle."""
    entries = []
    for rank in sorted(set(range(size)) | set(rank_stats)):
        s = rank_stats.get(rank)
        if s is None:
            entries.append({"dp_rank": rank, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0})
            continue
        waiting = s.num_queue_reqs + s.num_grammar_queue_reqs
        entries.append(
            {
                "dp_rank": rank,
                "num_reqs": s.num_running_reqs + waiting,
                "num_waiting_reqs": waiting,
                "num_tokens": s.num_used_tokens,
            }
        )
    return entries


async def get_load(request: web.Request) -> web.Response:
    ctx = request.app[SERVER]
    return web.json_response(load_entries(dict(ctx.tm.rank_stats), ctx.args.dp_size))


def server_info_fields(ctx: ServerContext) -> dict[str, Any]:
    """The ``/server_info`` fields SGLang reports that the router parses (defaults; a flag of
    the same name overrides them in the handler), and where KV-cache events are published."""
    args = ctx.args
    chunk = args.chunked_prefill_size
    return {
        "tp_size": 1,
        "dp_size": args.dp_size,
        "load_balance_method": args.load_balance_method,
        "disaggregation_mode": args.disaggregation_mode,
        # The router reads it as an unsigned count: with chunking off a whole prompt (up to
        # the context length) is one prefill.
        "max_prefill_tokens": chunk if chunk > 0 else ctx.info.context_length,
        "page_size": args.page_size,
        "kv_events": advertised(args.kv_events_config, args.page_size, args.dp_size),
    }


@lru_cache(maxsize=8)
def model_arch(model_path: str) -> dict[str, Any]:
    """``model_type`` and ``architectures`` from the model directory's config.json (the router
    labels workers with them); empty values when the file cannot be read."""
    try:
        raw = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        raw = {}
    archs = raw.get("architectures") if isinstance(raw, dict) else None
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    return {
        "model_type": kind if isinstance(kind, str) else None,
        "architectures": [a for a in archs if isinstance(a, str)]
        if isinstance(archs, list)
        else [],
    }


def add_router_routes(app: web.Application) -> None:
    app.router.add_get("/get_load", get_load)

"""What every route handler reaches through ``request.app[SERVER]``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from smallm.runtime.config import ServerArgs
from smallm.runtime.metrics import ServerMetrics
from smallm.runtime.server.http.tool_parsers import ToolCallParser, get_parser
from smallm.runtime.server.tokenizer_manager import ModelInfo, TokenizerManager


@dataclass
class ServerContext:
    args: ServerArgs
    info: ModelInfo
    tm: TokenizerManager
    metrics: ServerMetrics | None
    worker_pids: dict[str, int] = field(default_factory=dict)
    draining: bool = False  # SIGTERM received: new requests get 503
    started: float = field(default_factory=time.time)

    @property
    def healthy(self) -> bool:
        return self.tm.unavailable is None

    @property
    def tool_parser(self) -> ToolCallParser:
        """The ``--tool-call-parser`` that reads ``tool_choice: auto`` output."""
        return get_parser(self.args.tool_call_parser)

    @property
    def tokenizer(self) -> Any:
        return self.tm.tokenizer


SERVER: web.AppKey[ServerContext] = web.AppKey("smallm_server", ServerContext)

"""Logging filters for the HTTP front end."""

from __future__ import annotations

import logging


class Http2ProbeFilter(logging.Filter):
    """Turns aiohttp's traceback for an HTTP/2 prior-knowledge connection (the ``PRI *
    HTTP/2.0`` preface, which sglang-router 0.3.2 sends when it connects) into one debug line:
    the client falls back to HTTP/1.1 and nothing failed, so an ERROR with a traceback in
    every server log would only mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or "PRI/Upgrade" not in str(exc):
            return True
        logging.getLogger("smallm.server").debug(
            "a client opened with HTTP/2 prior knowledge; this server speaks HTTP/1.1"
        )
        return False


def install_http_log_filters() -> None:
    logging.getLogger("aiohttp.server").addFilter(Http2ProbeFilter())

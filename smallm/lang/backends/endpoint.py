"""``RuntimeEndpoint``: programs run on a smallm (or SGLang) server over its native HTTP API."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import requests

from smallm.lang import chat_template as ct
from smallm.lang.backends.base import Backend, BackendError

logger = logging.getLogger(__name__)


class RuntimeEndpoint(Backend):
    """A server at ``base_url``. The chat template comes from ``chat_template`` if given, else
    from the server's ``tokenizer_path`` when that directory exists on this machine, else from
    the Jinja template a smallm server reports in ``/get_model_info``, else ChatML (the same
    fallback SGLang's frontend uses for unknown models)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        chat_template: Any = None,
        timeout: float | None = 600.0,
        verify: Any = None,
        chat_template_name: str | None = None,
    ):
        # verify (TLS: a CA bundle path or False) and chat_template_name are SGLang's names.
        chat_template = chat_template if chat_template is not None else chat_template_name
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.requests_sent = 0  # HTTP requests made, for measuring what a program costs
        self._session = requests.Session()
        # One connection per concurrent program (run_batch runs up to 96 by default), kept.
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=256)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        if verify is not None:
            self._session.verify = verify
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"
        self.model_info = self._get("/get_model_info")
        tok_path = self.model_info.get("tokenizer_path") or self.model_info.get("model_path")
        local = tok_path if tok_path and os.path.isdir(tok_path) else None
        served = self.model_info.get("chat_template")
        if chat_template is None and local is None and isinstance(served, str) and served:
            # A remote smallm server: render its own template (an SGLang server gives none).
            try:
                chat_template = ct.load(served)
            except Exception as e:
                logger.warning("cannot use the server's chat template (%s); using ChatML", e)
        self._template = ct.load(chat_template, local)

    @property
    def chat_template(self) -> ct.ChatTemplate:
        return self._template

    def _get(self, path: str) -> dict:
        self.requests_sent += 1
        r = self._session.get(self.base_url + path, timeout=self.timeout)
        _check(r)
        return r.json()

    def _call(self, payload: dict[str, Any]) -> dict | list[dict]:
        self.requests_sent += 1
        r = self._session.post(self.base_url + "/generate", json=payload, timeout=self.timeout)
        _check(r)
        return r.json()

    def _call_stream(self, payload: dict[str, Any]) -> Iterator[dict]:
        self.requests_sent += 1
        with self._session.post(
            self.base_url + "/generate",
            json={**payload, "stream": True},
            stream=True,
            timeout=self.timeout,
        ) as r:
            _check(r)
            for line in r.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise BackendError(chunk["error"].get("message", str(chunk["error"])))
                yield chunk

    def flush_cache(self) -> bool:
        self.requests_sent += 1
        r = self._session.post(self.base_url + "/flush_cache", timeout=self.timeout)
        return r.status_code == 200


def _check(r: requests.Response) -> None:
    if r.status_code >= 400:
        raise BackendError(f"{r.request.method} {r.url} -> HTTP {r.status_code}: {r.text[:500]}")

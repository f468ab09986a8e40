"""``OpenAI``: programs on any OpenAI-compatible server, through its completions API, or its
chat API for chat-only servers.

Completions (default): the program's text (roles rendered with ``chat_template``, ChatML by
default) is sent as a completion prompt, so the model sees exactly what it would see through the
native API. Chat (``is_chat_model=True``): each gen must be a whole assistant turn; the program's
messages go to ``/chat/completions`` and the server applies its own template; ``json_schema``
becomes ``response_format``; ``select`` cannot work (no prompt logprobs) and says so.
``select`` scores each choice with ``echo`` + ``logprobs`` and ``max_tokens: 0`` (smallm, SGLang
and vLLM servers support that); a server that returns no prompt logprobs gets a clear error.
Grammar constraints (``regex``, ``json_schema``) are passed as the extra fields smallm and SGLang
accept; other servers may reject them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from smallm.lang import chat_template as ct
from smallm.lang.backends.base import Backend
from smallm.lang.choices import ChoicesDecision, ChoicesSamplingMethod
from smallm.lang.sampling import split_request

_DIRECT = {
    "max_new_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "stop": "stop",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "seed": "seed",
    "n": "n",
}
_EXTRA = ("top_k", "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids", "regex",
          "json_schema", "ebnf", "min_new_tokens")  # fmt: skip
_FINISH = {"stop": "stop", "length": "length"}


class OpenAIBackendError(RuntimeError):
    """The server cannot do what the program asked (e.g. no prompt logprobs for select)."""


class OpenAI(Backend):
    """``OpenAI(model, base_url="http://127.0.0.1:30000/v1", api_key=None, chat_template=None)``."""

    # One completions request per gen: compiled batches would only serialise the programs.
    batches_requests = False

    def __init__(
        self,
        model: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        chat_template: Any = None,
        is_chat_model: bool = False,
        **client_kwargs: Any,
    ):
        import openai

        self.chat_only = is_chat_model
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", **client_kwargs)
        self.model = model or self.client.models.list().data[0].id
        self._template = ct.load(chat_template, None)

    @property
    def chat_template(self) -> ct.ChatTemplate:
        return self._template

    def _request(self, params: dict[str, Any]) -> dict[str, Any]:
        sampling, _ = split_request(params)
        body: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for name, value in sampling.items():
            if value is None:
                continue
            if name in _DIRECT:
                body[_DIRECT[name]] = value
            elif name in _EXTRA:
                extra[name] = value
        if extra:
            body["extra_body"] = extra
        return body

    def generate(self, text: str, params: dict[str, Any]) -> tuple[str, dict]:
        resp = self.client.completions.create(
            model=self.model, prompt=text, **self._request(params)
        )
        return _result(resp, lambda c: c.text)

    def generate_chat(
        self, messages: list[dict[str, Any]], params: dict[str, Any], stream: bool = False
    ) -> Any:
        body = self._request(params)
        extra = body.get("extra_body", {})
        schema = extra.pop("json_schema", None)
        if schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": json.loads(schema)},
            }
        if not extra:
            body.pop("extra_body", None)
        if stream:
            return self._chat_stream(messages, body)
        resp = self.client.chat.completions.create(model=self.model, messages=messages, **body)
        return _result(resp, lambda c: c.message.content or "")

    def _chat_stream(self, messages: list[dict], body: dict) -> Iterator[tuple[str, dict]]:
        stream = self.client.chat.completions.create(
            model=self.model,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            **body,
        )
        return _pieces(stream, lambda c: c.delta.content)

    def generate_stream(self, text: str, params: dict[str, Any]) -> Iterator[tuple[str, dict]]:
        stream = self.client.completions.create(
            model=self.model,
            prompt=text,
            stream=True,
            stream_options={"include_usage": True},
            **self._request(params),
        )
        return _pieces(stream, lambda c: c.text)

    def select(
        self, text: str, choices: list[str], temperature: float, method: ChoicesSamplingMethod
    ) -> ChoicesDecision:
        if self.chat_only:
            raise OpenAIBackendError(
                "select needs prompt logprobs, which a chat API does not return; use "
                "is_chat_model=False with a server that has the completions API"
            )
        if method.requires_unconditional_logprobs:
            raise OpenAIBackendError(
                "unconditional_likelihood_normalized needs token ids, which the OpenAI API "
                "does not return; use token_length_normalized or greedy_token_selection"
            )
        if temperature > 1e-5:
            raise ValueError("select supports only temperature 0")
        inputs, normalized = [], []
        for choice in choices:
            resp = self.client.completions.create(
                model=self.model, prompt=text + choice, max_tokens=0, echo=True, logprobs=1
            )
            lp = resp.choices[0].logprobs
            if lp is None or not lp.token_logprobs:
                raise OpenAIBackendError(
                    f"{self.client.base_url} returned no prompt logprobs (echo + logprobs); "
                    "select needs them"
                )
            # The choice's tokens, starting with the one that straddles the prefix's end (the
            # tokenizer may merge the prefix's last characters with the choice's first).
            entries = []
            for offset, token, value in zip(lp.text_offset, lp.tokens, lp.token_logprobs):
                if offset + len(token) > len(text) and value is not None:
                    entries.append([value, 0, token])
            inputs.append(entries)
            normalized.append(sum(e[0] for e in entries) / len(entries) if entries else 0.0)
        return method(
            choices=choices,
            normalized_prompt_logprobs=normalized,
            input_token_logprobs=inputs,
            output_token_logprobs=[[] for _ in choices],
        )

    def generate_many(self, items: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict]]:
        return [self.generate(text, params) for text, params in items]

    def select_many(self, items: list) -> list[ChoicesDecision]:
        return [self.select(*item) for item in items]

    def _call(self, payload: dict[str, Any]) -> dict | list[dict]:
        raise OpenAIBackendError("the OpenAI backend has no native /generate call")

    def _call_stream(self, payload: dict[str, Any]) -> Iterator[dict]:
        raise OpenAIBackendError("the OpenAI backend has no native /generate call")

    def flush_cache(self) -> bool:
        return False  # not part of the OpenAI API


def _result(resp: Any, text_of: Callable[[Any], str]) -> tuple[Any, Any]:
    """(text, meta_info) of a response; with n > 1 choices, (list of texts, list of metas)."""
    metas = [_meta(resp.id, c.finish_reason, resp.usage) for c in resp.choices]
    texts = [text_of(c) for c in resp.choices]
    return (texts, metas) if len(texts) > 1 else (texts[0], metas[0])


def _pieces(stream: Any, text_of: Callable[[Any], str | None]) -> Iterator[tuple[str, dict]]:
    """(new text, meta_info) from an OpenAI stream; the last one carries the finish reason and
    usage (sent with ``include_usage``)."""
    finish, usage, rid = None, None, ""
    for chunk in stream:
        rid = chunk.id
        usage = chunk.usage or usage
        for c in chunk.choices:
            finish = c.finish_reason or finish
            if text_of(c):
                yield text_of(c), _meta(rid, None, None)
    yield "", _meta(rid, finish, usage)


def _meta(rid: str, finish: str | None, usage: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"id": rid}
    if finish is not None:
        meta["finish_reason"] = {"type": _FINISH.get(finish, finish)}
    if usage is not None:
        meta["prompt_tokens"] = usage.prompt_tokens
        meta["completion_tokens"] = usage.completion_tokens
    return meta

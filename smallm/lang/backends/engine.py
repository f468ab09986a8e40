"""``EngineBackend``: programs run on an in-process :class:`smallm.Engine` (no HTTP)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from smallm.lang import chat_template as ct
from smallm.lang.backends.base import Backend


class EngineBackend(Backend):
    """Wrap an existing ``Engine``, or start one from a model path (None = the default model)
    with ``engine_flags``; an engine started here is shut down by :meth:`shutdown`.

    ``chat_template`` overrides the role strings (a :class:`ChatTemplate`, "chatml", "plain"
    or a Jinja string); by default they come from the engine's tokenizer.
    """

    def __init__(
        self,
        engine_or_model_path: Any = None,
        chat_template: Any = None,
        **engine_flags: Any,
    ):
        if engine_or_model_path is None or isinstance(engine_or_model_path, str):
            import smallm

            self.engine = smallm.Engine(engine_or_model_path, **engine_flags)
            self._owns_engine = True
        else:
            if engine_flags:
                raise TypeError("engine flags apply only when the backend starts the engine")
            self.engine = engine_or_model_path
            self._owns_engine = False
        if chat_template is None:
            self._template = ct.from_hf_tokenizer(self.engine.tokenizer, self.engine.model_path)
        else:
            self._template = ct.load(chat_template, self.engine.model_path)

    @property
    def chat_template(self) -> ct.ChatTemplate:
        return self._template

    def _call(self, payload: dict[str, Any]) -> dict | list[dict]:
        payload = dict(payload)
        return self.engine.generate(payload.pop("text", None), **payload)

    def _call_stream(self, payload: dict[str, Any]) -> Iterator[dict]:
        payload = dict(payload)
        return self.engine.generate(payload.pop("text", None), stream=True, **payload)

    def flush_cache(self) -> bool:
        return self.engine.flush_cache()

    def shutdown(self) -> None:
        if self._owns_engine:
            self.engine.shutdown()

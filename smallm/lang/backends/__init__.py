"""Backends: where a program's ``gen`` and ``select`` run."""

from __future__ import annotations

from smallm.lang.backends.base import Backend, BackendError
from smallm.lang.backends.endpoint import RuntimeEndpoint
from smallm.lang.backends.engine import EngineBackend
from smallm.lang.backends.openai_backend import OpenAI
from smallm.lang.backends.runtime import Runtime

__all__ = ["Backend", "BackendError", "EngineBackend", "OpenAI", "Runtime", "RuntimeEndpoint"]

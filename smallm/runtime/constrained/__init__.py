"""Constrained decoding: grammars that mask the vocabulary each step.

- ``vocab``: the raw-bytes vocabulary of a tokenizer;
- ``base``: ``Grammar`` / ``GrammarBackend`` contracts and ``GrammarError``;
- ``outlines_backend`` / ``llguidance_backend``: the two engines;
- ``jump_forward``: forced-string (compressed FSM) tables for regex grammars;
- ``registry``: creating backends and choosing one per kind;
- ``grammar_cache``: compiling off-thread with a cache and a timeout.

See docs/structured-output.md for what each backend enforces and rejects.
"""

from __future__ import annotations

from smallm.runtime.constrained.base import GRAMMAR_KINDS, Grammar, GrammarBackend, GrammarError
from smallm.runtime.constrained.grammar_cache import GrammarCompiler, GrammarHandle
from smallm.runtime.constrained.registry import (
    BACKEND_NAMES,
    DEFAULT_BACKENDS,
    backend_for,
    create_grammar_backend,
)
from smallm.runtime.constrained.vocab import TokenVocabulary, get_token_vocabulary

__all__ = [
    "BACKEND_NAMES",
    "DEFAULT_BACKENDS",
    "GRAMMAR_KINDS",
    "Grammar",
    "GrammarBackend",
    "GrammarCompiler",
    "GrammarError",
    "GrammarHandle",
    "TokenVocabulary",
    "backend_for",
    "create_grammar_backend",
    "get_token_vocabulary",
]

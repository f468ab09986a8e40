"""Choosing and creating grammar backends."""

from __future__ import annotations

from typing import Any

from smallm.runtime.constrained.base import GrammarBackend, GrammarError, check_kind

__all__ = ["BACKEND_NAMES", "DEFAULT_BACKENDS", "backend_for", "create_grammar_backend"]

BACKEND_NAMES = ("outlines", "llguidance")

# Per-kind defaults when the server is not told otherwise (measured in docs/structured-output.md):
# - json_schema: llguidance. On the 77-schema test corpus it compiled 91% of the schemas
#   (outlines path: 82%), enforced every keyword it accepted (strict mode), and compiles in
#   ~1 ms instead of 30-700 ms (outlines builds a token index over the whole vocabulary per
#   schema), so a new schema never stalls the grammar queue.
# - regex, choices: outlines. Its precomputed index makes each mask a ~2 us copy (llguidance
#   computes masks lazily, tens of us), and these specs are small, so its compile is short.
# - ebnf, structural_tag: llguidance, the only backend with context-free grammars (a structural
#   tag's free text is a lexeme "any text & not containing a trigger", which needs llguidance's
#   lexeme intersection and negation too).
DEFAULT_BACKENDS = {
    "json_schema": "llguidance",
    "regex": "outlines",
    "choices": "outlines",
    "ebnf": "llguidance",
    "structural_tag": "llguidance",
}
# Kinds only llguidance compiles, whatever --grammar-backend says.
LLGUIDANCE_ONLY = ("ebnf", "structural_tag")


def create_grammar_backend(
    name: str, tokenizer: Any, vocab_size: int, **options: Any
) -> GrammarBackend:
    """The backend called ``name`` ("outlines" or "llguidance") for a tokenizer and the model's
    vocabulary size (the logits width). ``options`` go to the backend's constructor (e.g.
    ``whitespace_pattern``, ``eos_token_ids``). Building one takes ~0.3 s (vocabulary tables);
    make one per server and share it."""
    if name == "outlines":
        from smallm.runtime.constrained.outlines_backend import OutlinesBackend

        return OutlinesBackend(tokenizer, vocab_size, **options)
    if name == "llguidance":
        from smallm.runtime.constrained.llguidance_backend import LLGuidanceBackend

        return LLGuidanceBackend(tokenizer, vocab_size, **options)
    raise ValueError(f"unknown grammar backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")


def backend_for(kind: str, default_name: str | None = None) -> str:
    """The backend that should compile a spec of ``kind``.

    ``default_name`` is the server's ``--grammar-backend``: None or "auto" picks the per-kind
    default (``DEFAULT_BACKENDS``); a named backend is used for every kind it supports, and
    ``ebnf`` and ``structural_tag`` always go to llguidance (outlines has no context-free
    grammars).
    """
    check_kind(kind)
    if default_name in (None, "", "auto"):
        return DEFAULT_BACKENDS[kind]
    if default_name not in BACKEND_NAMES:
        raise GrammarError(
            f"unknown grammar backend {default_name!r}; choose one of auto, {', '.join(BACKEND_NAMES)}"
        )
    if kind in LLGUIDANCE_ONLY:
        return "llguidance"
    return default_name

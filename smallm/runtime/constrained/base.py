"""The contracts every grammar backend implements.

A ``GrammarBackend`` turns a request's constraint (a regex, a JSON schema, a list of choices, an
EBNF/Lark grammar or a structural tag) into a ``Grammar``: the per-request matcher the scheduler drives once per
decode step. Compilation is the expensive part (milliseconds to a second); a compiled grammar
is cached and every request gets its own ``copy()``, which shares the compiled tables.

Bitmask layout (the one `smallm.runtime.sampling.batch_info` uses): a packed int32 tensor of
shape ``[B, ceil(V / 32)]`` where bit ``t % 32`` of word ``t // 32`` set means token ``t`` is
allowed. ``V`` is the model's vocabulary (the logits width).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

import numpy as np
import torch

__all__ = ["GRAMMAR_KINDS", "Grammar", "GrammarBackend", "GrammarError"]

# The constraint kinds a backend may be asked to compile.
GRAMMAR_KINDS = ("regex", "json_schema", "choices", "ebnf", "structural_tag")


class GrammarError(ValueError):
    """A constraint that cannot be compiled: invalid syntax (with the parser's message), or a
    JSON-schema keyword the backend cannot enforce (the message names the keyword). Requests
    that raise it are answered with a 400, never generated unconstrained."""


class Grammar(ABC):
    """One request's matcher state over a compiled grammar.

    Token semantics: a token is allowed when its bytes keep the text generated so far a prefix
    of some string of the grammar's language. EOS ids are allowed exactly when the text so far
    is a complete match (an *accepting* state). Special tokens other than EOS are never allowed.

    Not thread-safe: one request, one thread at a time.
    """

    vocab_size: int

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write this grammar's allowed tokens into row ``row`` of ``bitmask``.

        ``bitmask`` is a contiguous CPU int32 tensor ``[B, ceil(V/32)]``; the whole row is
        overwritten (bits past ``V`` and ids outside the tokenizer's vocabulary are 0). After
        termination only EOS is allowed.
        """

    @abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token. Returns False (state unchanged) when the token is not
        allowed; an EOS id in an accepting state terminates the grammar and returns True."""

    def accept_tokens(self, token_ids: Iterable[int]) -> bool:
        """Advance by several tokens; stops at (and returns False on) the first disallowed one,
        leaving the state after the tokens that were accepted."""
        return all(self.accept_token(t) for t in token_ids)

    @abstractmethod
    def accept_string(self, text: str) -> bool:
        """Advance by ``text`` regardless of how it will be tokenized (used after a jump-forward:
        the scheduler appends the forced text, re-tokenizes the output tail for the model, and
        the grammar, whose state depends only on the text, advances by the text). Returns False
        (state unchanged) if the text is not a valid continuation."""

    @abstractmethod
    def is_accepting(self) -> bool:
        """True when the text so far is a complete match (EOS would be allowed)."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """True once EOS was accepted; the request is finished."""

    @abstractmethod
    def jump_forward(self) -> str | None:
        """The text the grammar forces from the current state (e.g. ``{"name":"`` at the start
        of a fixed-key object), or None when the next character is not determined or the
        backend cannot tell. Does not change the state: advance with ``accept_string``."""

    @abstractmethod
    def copy(self) -> Grammar:
        """A fresh matcher (initial state) sharing this grammar's compiled data: for each
        request, each of n>1 samples, and each fork. Cheap."""

    def allowed_token_ids(self) -> list[int]:
        """The allowed ids as a list: for tests and debugging, not for the decode loop."""
        words = (self.vocab_size + 31) // 32
        mask = torch.zeros(1, words, dtype=torch.int32)
        self.fill_bitmask(mask, 0)
        # Bit j of word w is token 32w+j: on a little-endian view of the words as bytes, that
        # is bit j%8 of byte 4w+j//8, i.e. numpy's "little" bit order.
        data = mask[0].numpy().astype("<i4").view(np.uint8)
        bits = np.unpackbits(data, bitorder="little")[: self.vocab_size]
        return np.flatnonzero(bits).tolist()


class GrammarBackend(ABC):
    """Compiles constraints for one tokenizer and model vocabulary size."""

    name: str

    @abstractmethod
    def compile(self, kind: str, spec: str) -> Grammar:
        """Compile ``spec`` of ``kind`` (one of ``GRAMMAR_KINDS``) into a fresh ``Grammar``.

        - ``regex``: the whole output must match (full match, not search);
        - ``json_schema``: a JSON schema as a string;
        - ``choices``: a JSON list of strings; the output is exactly one of them;
        - ``ebnf``: a Lark or GBNF-style grammar (backends that support it);
        - ``structural_tag``: SGLang's structural tag as JSON (free text; a trigger opens a
          structure constrained to its schema; see ``structural_tag.py``), llguidance only.

        Raises ``GrammarError`` for invalid input or unenforceable constraints. Thread-safe:
        the grammar compiler calls it from worker threads.
        """

    def supports(self, kind: str) -> bool:
        """Whether this backend can compile ``kind`` at all."""
        return kind in GRAMMAR_KINDS


def check_kind(kind: str) -> None:
    """Raise GrammarError for a kind no backend knows."""
    if kind not in GRAMMAR_KINDS:
        raise GrammarError(f"unknown grammar kind {kind!r}; expected one of {GRAMMAR_KINDS}")

"""The llguidance backend: JSON schema, regex, choices, EBNF/Lark grammars and structural tags.

llguidance (1.9) runs an Earley parser over a lexer of derivative-based regexes, computing each
step's token mask lazily over a token trie: compiling takes about a millisecond (outlines-core
builds a whole token index up front: 0.1-0.5 s for a JSON schema with a 49k vocabulary), at the
cost of tens of microseconds per mask. It supports context-free grammars (``ebnf``: Lark syntax,
or GBNF which it converts to Lark) and enforces JSON schemas in strict mode: a keyword it cannot
enforce is an error naming it, never silently ignored.

API used (checked on 1.9.1): ``LLTokenizer`` built from the HF fast tokenizer's JSON (n_vocab =
the model's vocabulary, EOS ids given explicitly), ``LLMatcher`` per request (``deep_copy`` of a
pristine compiled matcher), ``unsafe_compute_mask_ptr`` writing our packed row directly (the same
layout as ``llguidance.torch.fill_next_token_bitmask``), ``compute_ff_bytes`` for jump-forward.
A token that is not allowed is checked with ``validate_tokens`` first, because ``consume_token``
on a bad token puts the matcher in a permanent error state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from smallm.runtime.constrained.base import Grammar, GrammarBackend, GrammarError, check_kind
from smallm.runtime.constrained.regex_utils import (
    ascii_digit_classes,
    choices_regex,
    parse_choices,
    strip_anchors,
)
from smallm.runtime.constrained.structural_tag import parse_structural_tag, structural_tag_lark
from smallm.runtime.constrained.vocab import (
    TokenVocabulary,
    cached_per_tokenizer,
    get_token_vocabulary,
)

__all__ = ["LLGuidanceBackend", "LLGuidanceGrammar"]


def _utf8_prefix(data: bytes) -> str:
    """The longest prefix of ``data`` that is complete UTF-8, decoded."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            return data[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return ""


@dataclass
class _Compiled:
    template: Any  # a pristine LLMatcher, only ever deep-copied
    vocab: TokenVocabulary
    words: int
    ll_words: int  # row width llguidance writes (its vocabulary may be wider than ours)


class LLGuidanceGrammar(Grammar):
    """One request's llguidance matcher."""

    __slots__ = ("_c", "_m", "_terminated", "vocab_size")

    def __init__(self, compiled: _Compiled, matcher: Any) -> None:
        self._c = compiled
        self._m = matcher
        self._terminated = False
        self.vocab_size = compiled.vocab.vocab_size

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        c = self._c
        if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or bitmask.stride(1) != 1:
            raise ValueError("bitmask must be a CPU int32 tensor with contiguous rows")
        if bitmask.shape[1] != c.words:
            raise ValueError(f"bitmask has {bitmask.shape[1]} words a row, expected {c.words}")
        words = bitmask[row].numpy()
        if self._terminated:
            words[:] = 0
            for e in c.vocab.eos_token_ids:
                words.view(np.uint32)[e // 32] |= np.uint32(1 << (e % 32))
            return
        if c.ll_words == c.words:
            self._m.unsafe_compute_mask_ptr(words.ctypes.data, c.words * 4)
        else:  # llguidance's vocabulary is the tokenizer's and wider than the model's
            scratch = np.zeros(c.ll_words, dtype=np.int32)
            self._m.unsafe_compute_mask_ptr(scratch.ctypes.data, c.ll_words * 4)
            words[:] = scratch[: c.words]
            tail = c.vocab.vocab_size % 32
            if tail:
                words.view(np.uint32)[-1] &= np.uint32((1 << tail) - 1)

    def accept_token(self, token_id: int) -> bool:
        c = self._c
        if token_id in c.vocab.eos_token_ids:
            if self._terminated:
                return True
            if not self._m.is_accepting():
                return False
            self._m.consume_token(token_id)
            self._terminated = True
            return True
        if self._terminated or not 0 <= token_id < self.vocab_size:
            return False
        if c.vocab.token_bytes[token_id] is None:
            return False
        if self._m.validate_tokens([token_id]) != 1:
            return False
        return bool(self._m.consume_token(token_id))

    def accept_string(self, text: str) -> bool:
        if self._terminated:
            return text == ""
        path = self._c.vocab.text_token_ids(text.encode("utf-8"))
        if path is None or self._m.validate_tokens(path) != len(path):
            return False
        return bool(self._m.consume_tokens(path))

    def is_accepting(self) -> bool:
        return self._terminated or bool(self._m.is_accepting())

    def is_terminated(self) -> bool:
        return self._terminated

    def jump_forward(self) -> str | None:
        if self._terminated or self._m.is_error():
            return None
        forced = _utf8_prefix(self._m.compute_ff_bytes())
        return forced or None

    def copy(self) -> LLGuidanceGrammar:
        return LLGuidanceGrammar(self._c, self._c.template.deep_copy())


class LLGuidanceBackend(GrammarBackend):
    """llguidance grammars for one (fast) HF tokenizer.

    ``whitespace_pattern`` is the regex allowed between JSON tokens (default one optional space,
    like the outlines backend; llguidance's own default is unbounded whitespace, which lets a
    weak model loop on newlines); ``""`` means compact JSON.
    """

    name = "llguidance"

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        *,
        eos_token_ids: list[int] | None = None,
        whitespace_pattern: str = "[ ]?",
    ) -> None:
        import llguidance

        self.vocab = get_token_vocabulary(tokenizer, vocab_size, eos_token_ids)
        self.whitespace_pattern = whitespace_pattern
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError("the llguidance backend needs a fast (tokenizers-based) tokenizer")
        eos = list(self.vocab.eos_token_ids)
        n_vocab = max(vocab_size, len(tokenizer))

        def build() -> Any:
            # ~0.25 s for a 49k vocabulary: built once per tokenizer and vocabulary size.
            return llguidance.LLTokenizer(backend.to_str(), n_vocab=n_vocab, eos_token=eos)

        key = ("llguidance-tokenizer", n_vocab, tuple(eos))
        self.ll_tokenizer = cached_per_tokenizer(tokenizer, key, build)
        self._words = (vocab_size + 31) // 32
        self._ll_words = (self.ll_tokenizer.vocab_size + 31) // 32

    def supports(self, kind: str) -> bool:
        return kind in ("regex", "json_schema", "choices", "ebnf", "structural_tag")

    def json_options(self) -> dict[str, Any]:
        """The llguidance JSON compile options we force (strict, bounded whitespace)."""
        opts: dict[str, Any] = {"lenient": False, "coerce_one_of": False}
        if self.whitespace_pattern:
            opts["whitespace_pattern"] = self.whitespace_pattern
        else:
            opts["whitespace_flexible"] = False
        return opts

    def to_grammar(self, kind: str, spec: str) -> str:
        """The llguidance grammar definition for a spec (raises GrammarError)."""
        import llguidance
        from llguidance import LLMatcher

        check_kind(kind)
        if not isinstance(spec, str):
            raise GrammarError(f"{kind} spec must be a string")
        if kind == "json_schema":
            try:
                schema = json.loads(spec)
            except json.JSONDecodeError as e:
                raise GrammarError(f"json_schema is not valid JSON: {e}") from None
            if schema is True:
                schema = {}  # llguidance wants an object schema to attach its options to
            if schema is False:
                raise GrammarError("json_schema false allows no value")
            if not isinstance(schema, dict):
                raise GrammarError("json_schema must be a JSON object or a boolean")
            try:
                return LLMatcher.grammar_from_json_schema(
                    json.dumps(schema), overrides=self.json_options()
                )
            except ValueError as e:
                raise GrammarError(f"invalid JSON schema: {e}") from None
        if kind == "regex":
            return LLMatcher.grammar_from_regex(ascii_digit_classes(strip_anchors(spec)))
        if kind == "choices":
            return LLMatcher.grammar_from_regex(choices_regex(parse_choices(spec)))
        if kind == "structural_tag":
            lark = structural_tag_lark(parse_structural_tag(spec), self.json_options())
            return llguidance.grammar_from("lark", lark)
        try:
            # Lark passes through; GBNF (``root ::= ...``) is converted to Lark.
            return llguidance.grammar_from("ebnf", spec)
        except ValueError as e:
            raise GrammarError(f"invalid EBNF grammar: {e}") from None

    def compile(self, kind: str, spec: str) -> LLGuidanceGrammar:
        from llguidance import LLMatcher

        grammar = self.to_grammar(kind, spec)
        matcher = LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{kind}: {matcher.get_error().strip()}")
        compiled = _Compiled(matcher, self.vocab, self._words, self._ll_words)
        return LLGuidanceGrammar(compiled, matcher.deep_copy())

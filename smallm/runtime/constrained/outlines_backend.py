"""The outlines-core backend: regex, JSON schema (as a regex) and choices.

outlines-core compiles a regex into a token-level ``Index`` (DFA state -> allowed token ->
next state) over the tokenizer's raw-bytes vocabulary; a ``Guide`` walks it and writes the
packed allowed-token bitmask straight into our tensor (``Guide.write_mask_into``, ~2 us).

Traps handled here (outlines-core 0.2.14):

- **Dropped token boundaries.** ``Index`` builds on a regex-automata DFA, whose match flag is
  delayed by one byte; a token is kept only if the DFA after it is "not a match" or "a full
  match at end of input". So a token whose bytes *minus the last one* complete a match but
  whose full bytes do not (``.`` after ``1`` under a number regex, ``ax`` under ``a(xc)?``) is
  silently dropped: SmolLM2's own tokenization of ``1.5`` (``1`` ``.`` ``5``) is rejected.
  Workaround: we compile ``(?:R)\\U0010FFFF``. The sentinel character (a Unicode noncharacter,
  UTF-8 ``F4 8F BF BF``) cannot be produced by the index's vocabulary, from which we drop the
  tokens containing byte 0xF4 (they only encode plane-16 private-use characters), so no real
  text is ever a match of the extended regex and every live token transition is kept. The sentinel is added to the index vocabulary under a spare
  special-token id; "R matches the text so far" is then exactly "the sentinel token leads to a
  final state", cached per state. The sentinel's bit is always cleared from the mask.
- **EOS.** outlines lists EOS as allowed in final states but ``advance(eos)`` raises; we never
  advance on EOS: EOS bits are set by us exactly in accepting states and end the grammar.
- **Unicode classes.** Rust's ``\\d`` is Unicode-aware (e.g. 177 DFA states instead of 9 for
  ``\\d{3}-\\d{4}``, each costing a pass over the vocabulary); ``\\d``/``\\D`` are rewritten to
  ASCII, and every regex we generate uses ASCII classes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from smallm.runtime.constrained.base import Grammar, GrammarBackend, GrammarError, check_kind
from smallm.runtime.constrained.jump_forward import JumpForwardMap, JumpForwardTracker
from smallm.runtime.constrained.outlines_schema import schema_to_regex
from smallm.runtime.constrained.regex_utils import (
    ascii_digit_classes,
    choices_regex,
    parse_choices,
    strip_anchors,
)
from smallm.runtime.constrained.vocab import (
    TokenVocabulary,
    cached_per_tokenizer,
    get_token_vocabulary,
)

__all__ = ["OutlinesBackend", "OutlinesGrammar"]

SENTINEL = "\U0010ffff"
_SENTINEL_BYTES = SENTINEL.encode("utf-8")


def _regex_error(regex: str, err: Exception) -> GrammarError:
    # The Rust message for syntax errors is just "error building NFA"; Python's parser says
    # where and what, and agrees with Rust on ordinary syntax.
    try:
        re.compile(regex)
    except re.error as py_err:
        return GrammarError(f"invalid regex {regex!r}: {py_err}")
    return GrammarError(f"invalid or unsupported regex {regex!r}: {err}")


@dataclass
class _Compiled:
    """What every copy of one grammar shares."""

    index: Any  # outlines_core.Index of (?:regex)SENTINEL
    regex: str
    vocab: TokenVocabulary
    sentinel_id: int
    jump: JumpForwardMap | None
    words: int
    eos_ids: tuple[int, ...]
    eos_bits: tuple[tuple[int, int], ...]  # (word, bit mask) per EOS id
    sentinel_bit: tuple[int, int]
    # state -> whether the regex fully matches there; filled lazily, shared by all copies
    # (dict assignment is atomic under the GIL, and recomputation is idempotent).
    accepting: dict[int, bool] = field(default_factory=dict)

    def is_accepting(self, state: int) -> bool:
        acc = self.accepting.get(state)
        if acc is None:
            nxt = self.index.get_next_state(state, self.sentinel_id)
            acc = nxt is not None and self.index.is_final_state(nxt)
            self.accepting[state] = acc
        return acc

    def walk(self, state: int, token_ids: list[int]) -> int | None:
        for tok in token_ids:
            nxt = self.index.get_next_state(state, tok)
            if nxt is None:
                return None
            state = nxt
        return state


def _bit(token_id: int) -> tuple[int, int]:
    return token_id // 32, 1 << (token_id % 32)


class OutlinesGrammar(Grammar):
    """One request's walk over a compiled outlines index."""

    __slots__ = ("_c", "_guide", "_jf", "_state", "_terminated", "vocab_size")

    def __init__(self, compiled: _Compiled) -> None:
        from outlines_core import Guide

        self._c = compiled
        self.vocab_size = compiled.vocab.vocab_size
        self._guide = Guide(compiled.index, max_rollback=0)
        self._state: int = self._guide.get_state()
        self._terminated = False
        self._jf: JumpForwardTracker | None = compiled.jump.tracker() if compiled.jump else None

    @property
    def regex(self) -> str:
        """The regex this grammar enforces (after ASCII rewriting)."""
        return self._c.regex

    def _row_words(self, bitmask: torch.Tensor, row: int) -> np.ndarray:
        if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or bitmask.stride(1) != 1:
            raise ValueError("bitmask must be a CPU int32 tensor with contiguous rows")
        if bitmask.shape[1] != self._c.words:
            raise ValueError(
                f"bitmask has {bitmask.shape[1]} words a row, expected {self._c.words}"
            )
        return bitmask[row].numpy().view(np.uint32)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        c = self._c
        words = self._row_words(bitmask, row)
        if self._terminated:
            words[:] = 0
            accepting = True
        else:
            self._guide.write_mask_into(words.ctypes.data, c.words, 4)
            w, b = c.sentinel_bit
            words[w] &= np.uint32(~b & 0xFFFFFFFF)
            accepting = c.is_accepting(self._state)
        for w, b in c.eos_bits:
            if accepting:
                words[w] |= np.uint32(b)
            else:
                words[w] &= np.uint32(~b & 0xFFFFFFFF)

    def accept_token(self, token_id: int) -> bool:
        c = self._c
        if token_id in c.eos_ids:
            if self._terminated or c.is_accepting(self._state):
                self._terminated = True
                return True
            return False
        if self._terminated or not 0 <= token_id < self.vocab_size:
            return False
        data = c.vocab.token_bytes[token_id]
        if data is None:  # special tokens (incl. the sentinel's id) never match text
            return False
        try:
            self._guide.advance(token_id, return_tokens=False)
        except ValueError:
            return False
        self._state = self._guide.get_state()
        if self._jf is not None:
            self._jf.feed(data)
        return True

    def accept_string(self, text: str) -> bool:
        if self._terminated:
            return text == ""
        data = text.encode("utf-8")
        path = self._c.vocab.text_token_ids(data)
        if path is None or self._c.walk(self._state, path) is None:
            return False
        for tok in path:
            self._guide.advance(tok, return_tokens=False)
        self._state = self._guide.get_state()
        if self._jf is not None:
            self._jf.feed(data)
        return True

    def is_accepting(self) -> bool:
        return self._terminated or self._c.is_accepting(self._state)

    def is_terminated(self) -> bool:
        return self._terminated

    def jump_forward(self) -> str | None:
        if self._terminated or self._jf is None:
            return None
        forced = self._jf.forced()
        if not forced:
            return None
        # Trust but verify: the interegular DFA must agree with the index on this text.
        path = self._c.vocab.text_token_ids(forced.encode("utf-8"))
        if path is None or self._c.walk(self._state, path) is None:
            return None
        return forced

    def copy(self) -> OutlinesGrammar:
        return OutlinesGrammar(self._c)


class OutlinesBackend(GrammarBackend):
    """outlines-core grammars for one tokenizer.

    ``whitespace_pattern`` is the regex allowed between JSON tokens: bounded (default one
    optional space) so a model cannot loop on whitespace; ``""`` gives compact JSON (more text
    is then forced, so jump-forward saves more). ``jump_forward`` builds the interegular map at
    compile time (adds a few ms to tens of ms per grammar). ``build_timeout_s`` builds each
    index in a child process killed after that long (the server sets it to its compile
    timeout); None builds in the calling thread.
    """

    name = "outlines"

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        *,
        eos_token_ids: list[int] | None = None,
        whitespace_pattern: str = "[ ]?",
        jump_forward: bool = True,
        build_timeout_s: float | None = None,
    ) -> None:
        from outlines_core import Vocabulary

        self.vocab = get_token_vocabulary(tokenizer, vocab_size, eos_token_ids)
        self.whitespace_pattern = whitespace_pattern
        self.enable_jump_forward = jump_forward
        vocab = self.vocab
        if not vocab.eos_token_ids:
            raise ValueError("the tokenizer has no EOS token")
        spare = [
            i for i, b in enumerate(vocab.token_bytes) if b is None and i not in vocab.eos_token_ids
        ]
        if not spare:
            raise ValueError("no spare special-token id for the outlines sentinel")
        self.sentinel_id = spare[0]

        def build_vocabulary() -> Any:
            # Tokens holding byte 0xF4 could spell the sentinel; they only ever encode
            # plane-16 private-use characters, so dropping them loses no real text.
            mapping = {b: ids for b, ids in vocab.bytes_to_ids().items() if 0xF4 not in b}
            mapping[_SENTINEL_BYTES] = [self.sentinel_id]
            return Vocabulary(vocab.eos_token_ids[0], mapping)

        key = ("outlines-vocabulary", vocab.vocab_size, vocab.eos_token_ids, self.sentinel_id)
        self._vocabulary = cached_per_tokenizer(tokenizer, key, build_vocabulary)
        # With a timeout, indexes are built in a child process that is killed at the timeout
        # (index_worker.py); without, in the calling thread.
        self._index_worker = None
        if build_timeout_s is not None:
            from smallm.runtime.constrained.index_worker import IndexWorker

            self._index_worker = IndexWorker(self._vocabulary, build_timeout_s)

    def supports(self, kind: str) -> bool:
        return kind in ("regex", "json_schema", "choices")

    def to_regex(self, kind: str, spec: str) -> str:
        """The regex a spec of ``kind`` compiles to (for inspection and tests)."""
        check_kind(kind)
        if kind == "regex":
            if not isinstance(spec, str):
                raise GrammarError("regex must be a string")
            return ascii_digit_classes(strip_anchors(spec))
        if kind == "json_schema":
            return schema_to_regex(spec, self.whitespace_pattern)
        if kind == "choices":
            return choices_regex(parse_choices(spec))
        raise GrammarError(f"the outlines backend does not support {kind} grammars; use llguidance")

    def compile(self, kind: str, spec: str) -> OutlinesGrammar:
        from outlines_core import Index

        regex = self.to_regex(kind, spec)
        pattern = f"(?:{regex}){SENTINEL}"
        try:
            if self._index_worker is not None:
                index = self._index_worker.build(pattern)
            else:
                index = Index(pattern, self._vocabulary)
        except GrammarError:
            raise  # the index worker's timeout: already says what happened
        except ValueError as e:
            if "incompatible with the regex" in str(e):
                raise GrammarError(
                    f"regex {regex!r} matches no text this vocabulary can produce"
                ) from None
            raise _regex_error(regex, e) from None
        jump = None
        if self.enable_jump_forward:
            try:
                jump = JumpForwardMap.build(regex)
            except Exception:  # interegular lacks some syntax: no jump-forward, still correct
                jump = None
        vocab = self.vocab
        compiled = _Compiled(
            index=index,
            regex=regex,
            vocab=vocab,
            sentinel_id=self.sentinel_id,
            jump=jump,
            words=(vocab.vocab_size + 31) // 32,
            eos_ids=vocab.eos_token_ids,
            eos_bits=tuple(_bit(e) for e in vocab.eos_token_ids if e < vocab.vocab_size),
            sentinel_bit=_bit(self.sentinel_id),
        )
        grammar = OutlinesGrammar(compiled)
        if not compiled.is_accepting(grammar._state) and not index.get_allowed_tokens(
            grammar._state
        ):
            raise GrammarError(f"regex {regex!r} matches no text")
        return grammar

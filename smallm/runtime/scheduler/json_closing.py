"""Steering a JSON request to close before it runs out of tokens.

A small model can loop inside an unbounded string or array ("1.1.1.1...") until
``max_new_tokens``, and a JSON document cut there does not parse. When a ``json_schema``
request is within ``margin`` tokens of its limit, its grammar's mask row is narrowed to the
tokens that move the document towards its end, chosen by where the output is (a tiny JSON lexer
over the text so far):

- inside a string: the closing quote (alone or with the brackets after it); if the grammar does
  not allow it yet (a formatted string such as an email or a timestamp), the separator that
  ends the current part: ``@``, then ``.``, ``:``, ``+``, ``-``;
- outside strings: ``}`` / ``]``; if not allowed yet (a required key is missing, an array is
  below ``minItems``), ``,``.

The first tier with an allowed token wins; with none, the row is left alone. Narrowing only
ever removes tokens from the grammar's own mask, so the output stays valid; jump-forward then
writes the forced keys, and the document ends well-formed instead of truncated.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from smallm.runtime.sampling.batch_info import bitmask_words

_IN_STRING = [b'"}]', b"@", b".", b":", b"+", b"-"]
_OUTSIDE = [b"}]", b","]


def inside_string(text: str) -> bool:
    """Whether a JSON prefix ends inside a string literal."""
    inside = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = inside
        elif ch == '"':
            inside = not inside
    return inside


class JsonCloser:
    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int], margin: int):
        from smallm.runtime.constrained import get_token_vocabulary

        self.margin = margin
        self.tokenizer = tokenizer
        vocab = get_token_vocabulary(tokenizer, vocab_size, eos_token_ids)

        def pack(chars: bytes, first: bytes | None = None) -> torch.Tensor:
            allowed = np.zeros(bitmask_words(vocab_size) * 32, dtype=bool)
            for tok, data in enumerate(vocab.token_bytes):
                if data and set(data) <= set(chars) and (first is None or data[:1] == first):
                    allowed[tok] = True
            for tok in vocab.eos_token_ids:  # a finished document may always end
                if tok < vocab_size:
                    allowed[tok] = True
            return torch.from_numpy(np.packbits(allowed, bitorder="little").view(np.int32).copy())

        # In a string, the quote must come first: `}` alone may be an email character.
        self.in_string = [pack(_IN_STRING[0], first=b'"')] + [pack(c) for c in _IN_STRING[1:]]
        self.outside = [pack(c) for c in _OUTSIDE]

    def restrict(self, row: torch.Tensor, output_ids: list[int]) -> None:
        """Narrow one bitmask row (see the module docstring)."""
        text = self.tokenizer.decode(output_ids)
        for narrow in self.in_string if inside_string(text) else self.outside:
            kept = row & narrow
            if bool(kept.any()):
                row.copy_(kept)
                return

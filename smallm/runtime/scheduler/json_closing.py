"""Steering a JSON request to close before it runs out of tokens.

A small model can loop inside an unbounded string or array ("1.1.1.1...") until
``max_new_tokens``, and a JSON document cut there does not parse. When a ``json_schema``
request is within ``margin`` tokens of its limit, its grammar's mask is narrowed to the tokens
that only close things (``"``, ``}``, ``]`` and their combinations, and EOS) whenever the grammar
allows any of them; where it allows none (a required key is still missing, an array is below
``minItems``), the mask is left alone, so the output always stays valid. Jump-forward then writes
the forced keys, and the document ends well-formed instead of truncated.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from smallm.runtime.sampling.batch_info import bitmask_words

_CLOSERS = frozenset(b'"}]')


class JsonCloser:
    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int], margin: int):
        from smallm.runtime.constrained import get_token_vocabulary

        self.margin = margin
        vocab = get_token_vocabulary(tokenizer, vocab_size, eos_token_ids)
        allowed = np.zeros(bitmask_words(vocab_size) * 32, dtype=bool)
        for tok, data in enumerate(vocab.token_bytes):
            if data and set(data) <= _CLOSERS:
                allowed[tok] = True
        for tok in vocab.eos_token_ids:
            if tok < vocab_size:
                allowed[tok] = True
        packed = np.packbits(allowed, bitorder="little").view(np.int32)
        self.mask = torch.from_numpy(packed.copy())

    def restrict(self, row: torch.Tensor) -> None:
        """Narrow one bitmask row to its closing tokens, if it allows any."""
        closing = row & self.mask
        if bool(closing.any()):
            row.copy_(closing)

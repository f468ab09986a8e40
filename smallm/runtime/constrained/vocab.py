"""The raw-bytes vocabulary of a tokenizer, as grammar engines need it.

A grammar constrains *text*, so every backend needs to know which bytes each token id emits.
Decoding each token to ``str`` is wrong: byte-level BPE vocabularies contain hundreds of tokens
that are partial UTF-8 sequences (SmolLM2 has ~300), and ``decode`` turns those into U+FFFD.
So the bytes are recovered from the token *strings*:

- byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2): each character of a token string stands for
  one byte through GPT-2's printable ``bytes_to_unicode`` table, which is inverted here;
- SentencePiece-style vocabularies (Llama 2, Mistral): ``▁`` is a space and ``<0xNN>`` is the
  single byte NN (byte fallback); other characters are their UTF-8 encoding.

Special and added tokens (and every EOS id) get ``None``: they never match grammar text, and
EOS is handled by the grammar layer itself (allowed exactly in accepting states).
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TokenVocabulary", "bytes_to_unicode", "get_token_vocabulary"]

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPIECE_SPACE = "▁"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte to the printable character byte-level BPE writes for it.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to U+0100 and
    up, in byte order. Rewritten here (not imported) because transformers 5 no longer exports it.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


@dataclass(frozen=True)
class TokenVocabulary:
    """Which bytes each token id emits, for ids ``0 .. vocab_size - 1``.

    ``token_bytes[i]`` is None for ids a grammar must never allow as text: special and added
    tokens, EOS ids, and ids past the tokenizer's own vocabulary (a model's embedding table is
    often padded beyond ``len(tokenizer)``). ``eos_token_ids`` end generation; the grammar layer
    allows them exactly when the grammar is in an accepting state.
    """

    token_bytes: list[bytes | None]
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    # For each byte value, one token id that emits exactly that byte (None if the vocabulary has
    # none). Lets a grammar be advanced by arbitrary text, independent of how it was tokenized.
    byte_token_ids: tuple[int | None, ...] = field(repr=False, default=())

    def bytes_to_ids(self) -> dict[bytes, list[int]]:
        """Map each distinct token byte string to the ids that emit it (outlines-core's input)."""
        out: dict[bytes, list[int]] = {}
        for i, b in enumerate(self.token_bytes):
            if b is not None:
                out.setdefault(b, []).append(i)
        return out

    def decode(self, ids: Iterable[int]) -> bytes:
        """Concatenate the bytes of ``ids``, skipping ids that emit no grammar text (EOS...)."""
        parts = []
        for i in ids:
            if 0 <= i < self.vocab_size:
                b = self.token_bytes[i]
                if b is not None:
                    parts.append(b)
        return b"".join(parts)

    def text_token_ids(self, data: bytes) -> list[int] | None:
        """A token path that emits exactly ``data`` (one single-byte token per byte), or None
        when some byte has no single-byte token."""
        out = []
        for b in data:
            tok = self.byte_token_ids[b] if self.byte_token_ids else None
            if tok is None:
                return None
            out.append(tok)
        return out


def _tokenizer_json(tokenizer: Any) -> dict[str, Any] | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        return json.loads(backend.to_str())
    except Exception:  # a backend that cannot serialise itself: fall back to the vocab heuristics
        return None


def _component_types(node: Any) -> set[str]:
    """All ``type`` names in a (possibly nested ``Sequence``) tokenizers component."""
    found: set[str] = set()
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            found.add(node["type"])
        for value in node.values():
            found |= _component_types(value)
    elif isinstance(node, list):
        for value in node:
            found |= _component_types(value)
    return found


def _detect_scheme(tokenizer: Any, vocab: dict[str, int]) -> str:
    """'byte_level', 'sentencepiece' or 'plain' (decode each token; lossy but last resort)."""
    spec = _tokenizer_json(tokenizer)
    if spec is not None:
        types = _component_types(spec.get("decoder")) | _component_types(spec.get("pre_tokenizer"))
        if "ByteLevel" in types:
            return "byte_level"
        if types & {"ByteFallback", "Metaspace"} or spec.get("model", {}).get("byte_fallback"):
            return "sentencepiece"
        if "Replace" in types and any(_SPIECE_SPACE in tok for tok in list(vocab)[:5000]):
            return "sentencepiece"
    # Slow tokenizers and unusual backends: look at the vocabulary itself.
    if "<0x0A>" in vocab or any(tok.startswith(_SPIECE_SPACE) for tok in list(vocab)[:5000]):
        return "sentencepiece"
    if "Ġ" in vocab or "Ċ" in vocab:
        return "byte_level"
    return "plain"


def _token_to_bytes(token: str, scheme: str, tokenizer: Any) -> bytes | None:
    if scheme == "byte_level":
        try:
            return bytes(_UNICODE_TO_BYTE[c] for c in token)
        except KeyError:
            return None  # a character outside the byte table: not a byte-level text token
    if scheme == "sentencepiece":
        m = _BYTE_FALLBACK.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace(_SPIECE_SPACE, " ").encode("utf-8")
    text = tokenizer.convert_tokens_to_string([token])
    return None if "\ufffd" in text else text.encode("utf-8")


def _special_ids(tokenizer: Any) -> set[int]:
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i in decoder)
    return ids


def _build(tokenizer: Any, vocab_size: int, eos: tuple[int, ...]) -> TokenVocabulary:
    vocab: dict[str, int] = tokenizer.get_vocab()
    scheme = _detect_scheme(tokenizer, vocab)
    excluded = _special_ids(tokenizer) | set(eos)
    token_bytes: list[bytes | None] = [None] * vocab_size
    for token, i in vocab.items():
        if i >= vocab_size or i in excluded:
            continue
        data = _token_to_bytes(token, scheme, tokenizer)
        if data:  # empty tokens would let a grammar loop without emitting text
            token_bytes[i] = data
    byte_ids: list[int | None] = [None] * 256
    for i, data in enumerate(token_bytes):
        if data is not None and len(data) == 1 and byte_ids[data[0]] is None:
            byte_ids[data[0]] = i
    return TokenVocabulary(token_bytes, eos, vocab_size, tuple(byte_ids))


# Cache per tokenizer *object* (tokenizers need not be hashable, and two loads of the same files
# are distinct objects with possibly different added tokens). Entries die with the tokenizer.
_CACHE: dict[int, tuple[weakref.ref[Any] | None, dict[tuple[int, tuple[int, ...]], Any]]] = {}
_CACHE_LOCK = threading.Lock()


def _eos_ids(tokenizer: Any, eos_token_ids: Sequence[int] | None) -> tuple[int, ...]:
    ids = set(eos_token_ids or ())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


def cached_per_tokenizer(tokenizer: Any, key: tuple[Any, ...], build: Any) -> Any:
    """``build()`` once per (tokenizer object, key); later calls return the same object."""
    tid = id(tokenizer)
    with _CACHE_LOCK:
        entry = _CACHE.get(tid)
        if entry is not None and (entry[0] is None or entry[0]() is tokenizer):
            if key in entry[1]:
                return entry[1][key]
        else:
            try:
                ref: weakref.ref[Any] | None = weakref.ref(
                    tokenizer, lambda _r, tid=tid: _CACHE.pop(tid, None)
                )
            except TypeError:  # not weak-referenceable: keep it alive with its cache
                ref = None
            entry = (ref, {})
            _CACHE[tid] = entry
    value = build()  # outside the lock: building can take a second
    with _CACHE_LOCK:
        return entry[1].setdefault(key, value)


def get_token_vocabulary(
    tokenizer: Any, vocab_size: int | None = None, eos_token_ids: Sequence[int] | None = None
) -> TokenVocabulary:
    """The (cached) raw-bytes vocabulary of an HF tokenizer.

    ``vocab_size`` is the *model's* vocabulary (logits width; default ``len(tokenizer)``): ids
    past the tokenizer's vocabulary get None and are never allowed. ``eos_token_ids`` adds ids
    that end generation (e.g. the model config's) to the tokenizer's own EOS.
    """
    size = int(vocab_size) if vocab_size is not None else len(tokenizer)
    eos = _eos_ids(tokenizer, eos_token_ids)
    return cached_per_tokenizer(
        tokenizer, ("vocab", size, eos), lambda: _build(tokenizer, size, eos)
    )

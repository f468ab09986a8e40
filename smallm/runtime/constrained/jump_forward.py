"""Jump-forward (compressed FSM) for regex grammars.

Where a grammar allows exactly one next character, decoding it token by token wastes a model
forward per token: JSON keys, punctuation and ``const`` values are fully determined by the
schema. This module finds such *forced* strings.

Design:
- The same regex the backend compiled is parsed by interegular into a character-level DFA
  (``interegular`` FSMs use an alphabet of character classes; ``anything_else`` stands for
  every character not named in the regex).
- Dead states (from which no final state is reachable) are ignored. A state is *forcing* when
  it is not final and has exactly one live transition, labelled by a class holding a single
  character. The forced string of a state follows forcing states and stops at the first
  branching or accepting state; it is precomputed once per regex for every state.
- The grammar's current position is mapped to this DFA by feeding it the generated text
  (UTF-8 decoded incrementally, so tokens that split a character are fine). If the text
  leaves interegular's language (its regex dialect differs from Rust's in corners), the
  tracker is marked lost and jump-forward is off for that request: never wrong, only absent.
- The backend double-checks every forced string against its own token index before offering
  it, so a dialect difference can never make it emit text the grammar would reject.

How the scheduler uses it (see ``Grammar.jump_forward``): after sampling a token, ask for the
forced string; append it to the output text, re-tokenize the tail of the output for the model
(the forced tokens are then a short prefill that reuses the radix cache), and advance the
grammar with ``accept_string`` — the grammar state depends only on the text, not on how it is
split into tokens.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Any

__all__ = ["JumpForwardMap", "JumpForwardTracker"]


@dataclass
class JumpForwardMap:
    """Forced strings for every state of one regex's character DFA (shared, read-only)."""

    initial: int
    transitions: dict[int, dict[Any, int]]
    alphabet: Any  # interegular Alphabet: char -> transition key
    forced: dict[int, str]

    @classmethod
    def build(cls, regex: str) -> JumpForwardMap:
        """Parse ``regex`` with interegular and precompute the forced strings.

        Raises whatever interegular raises for syntax it does not support; callers treat that
        as "no jump-forward for this grammar".
        """
        import interegular
        from interegular.fsm import anything_else

        fsm = interegular.parse_pattern(regex).to_fsm()
        transitions: dict[int, dict[Any, int]] = {s: dict(m) for s, m in fsm.map.items()}
        live = _live_states(transitions, set(fsm.finals))
        key_chars: dict[Any, list[Any]] = fsm.alphabet.by_transition

        def forced_char(state: int) -> str | None:
            if state in fsm.finals:
                return None
            live_out = [(k, t) for k, t in transitions.get(state, {}).items() if t in live]
            if len(live_out) != 1:
                return None
            chars = key_chars.get(live_out[0][0], [])
            if len(chars) != 1 or chars[0] is anything_else:
                return None
            return chars[0]

        forced: dict[int, str] = {}
        for state in live:
            out: list[str] = []
            cur, seen = state, set()
            while cur not in seen:  # a forced cycle would be an infinite language of one word
                seen.add(cur)
                ch = forced_char(cur)
                if ch is None:
                    break
                out.append(ch)
                cur = transitions[cur][fsm.alphabet[ch]]
            if out:
                forced[state] = "".join(out)
        return cls(fsm.initial, transitions, fsm.alphabet, forced)

    def tracker(self) -> JumpForwardTracker:
        """A fresh position at the start of the text."""
        return JumpForwardTracker(self)


def _live_states(transitions: dict[int, dict[Any, int]], finals: set[int]) -> set[int]:
    reverse: dict[int, set[int]] = {}
    for src, m in transitions.items():
        for dst in m.values():
            reverse.setdefault(dst, set()).add(src)
    live, todo = set(finals), list(finals)
    while todo:
        for src in reverse.get(todo.pop(), ()):
            if src not in live:
                live.add(src)
                todo.append(src)
    return live


class JumpForwardTracker:
    """One request's position in a ``JumpForwardMap``, fed with the bytes it generates."""

    __slots__ = ("_decoder", "_map", "_pending", "state")

    def __init__(self, jf_map: JumpForwardMap) -> None:
        self._map = jf_map
        self.state: int | None = jf_map.initial  # None: lost (text outside interegular's DFA)
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._pending = 0  # bytes of an unfinished UTF-8 character

    def feed(self, data: bytes) -> None:
        """Advance by generated bytes (may split UTF-8 characters across calls)."""
        if self.state is None:
            return
        try:
            text = self._decoder.decode(data)
        except UnicodeDecodeError:
            self.state = None
            return
        self._pending = len(self._decoder.getstate()[0])
        m = self._map
        state = self.state
        for ch in text:
            try:
                state = m.transitions[state][m.alphabet[ch]]
            except KeyError:
                self.state = None
                return
        self.state = state

    def forced(self) -> str | None:
        """The forced string from here, or None."""
        if self.state is None or self._pending:
            return None
        return self._map.forced.get(self.state)

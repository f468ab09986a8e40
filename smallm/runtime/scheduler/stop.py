"""Stop strings, matched on the decoded tail of the output."""

from __future__ import annotations

from typing import Any


class StopChecker:
    """Finds a stop string in the text of the last few output tokens.

    Only the tail is decoded: a stop string that just appeared ends within the newest token,
    and starts at most len(stop) characters before it, so a window of len(stop) + a few tokens
    (every token is at least one byte) always contains it.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def find(self, output_ids: list[int], stops: list[str]) -> str | None:
        if self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        window = max(len(s.encode()) for s in stops) + 2
        tail = self.tokenizer.decode(output_ids[-window:], skip_special_tokens=False)
        newest = self.tokenizer.decode(output_ids[-1:], skip_special_tokens=False)
        # Only a match that the newest token completed counts: older ones stopped earlier.
        horizon = len(tail) - len(newest)
        for s in stops:
            at = tail.find(s, max(horizon - len(s) + 1, 0))
            if at >= 0:
                return s
        return None

"""Streaming tool calls: turns one sample's growing completion into ``delta`` payloads.

- named choice: the output *is* the arguments, so the call's header (id, name) goes first and
  every new piece of text follows as an ``arguments`` delta, as OpenAI streams them;
- required: the output is a JSON array of calls; it is sent as ``tool_calls`` deltas, whole
  calls, once it is complete;
- auto: text that cannot be part of a call is streamed as ``content`` at once; from where a
  call may begin (the parser's marker, or a leading ``{`` / ``[``) the text is held back and
  parsed when the sample finishes: calls become ``tool_calls`` deltas, anything else is sent
  as content after all.
"""

from __future__ import annotations

from smallm.runtime.server.http.tool_calls import ToolRequest, enforced_calls, new_call_id
from smallm.runtime.server.http.tool_parsers import ParsedCall, ToolCallParser


class ToolStream:
    """Per-sample state of a streamed chat completion that may call tools."""

    def __init__(self, req: ToolRequest, parser: ToolCallParser | None) -> None:
        self.req, self.parser = req, parser
        self.sent = 0  # characters of the completion already sent (as content or arguments)
        self.called = False  # at least one tool call was sent

    def update(self, text: str, finished: bool) -> list[dict]:
        """The deltas for the completion so far (``text`` is cumulative)."""
        if self.req.choice == "named" and not self.req.legacy:
            return self._named(text)
        if self.req.choice == "required" or (self.req.choice == "named" and self.req.legacy):
            if not finished:
                return []
            calls = enforced_calls(self.req, text)
            return self._calls(calls) if calls else self._content(text, len(text))
        assert self.parser is not None
        if not finished:
            return self._content(text, self.parser.safe_content_len(text))
        result = self.parser.parse(text)
        if not result.calls:
            return self._content(text, len(text))
        deltas = []
        if len(result.content) > self.sent:
            deltas.append({"content": result.content[self.sent :]})
        self.sent = len(text)
        calls = result.calls if self.req.parallel else result.calls[:1]
        return deltas + self._calls(calls)

    def _content(self, text: str, upto: int) -> list[dict]:
        if upto <= self.sent:
            return []
        piece, self.sent = text[self.sent : upto], upto
        return [{"content": piece}]

    def _named(self, text: str) -> list[dict]:
        deltas = []
        if not self.called:
            self.called = True
            head = {"index": 0, "id": new_call_id(), "type": "function"}
            deltas.append(
                {"tool_calls": [{**head, "function": {"name": self.req.named, "arguments": ""}}]}
            )
        if len(text) > self.sent:
            piece, self.sent = text[self.sent :], len(text)
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        return deltas

    def _calls(self, calls: list[ParsedCall]) -> list[dict]:
        self.called = True
        if self.req.legacy:
            c = calls[0]
            return [{"function_call": {"name": c.name, "arguments": c.arguments}}]
        return [
            {
                "tool_calls": [
                    {
                        "index": i,
                        "id": new_call_id(),
                        "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments},
                    }
                ]
            }
            for i, c in enumerate(calls)
        ]

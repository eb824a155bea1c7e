"""A chat answer read token by token into OpenAI's message fields: `reasoning_content` (a reasoning
model's thoughts), `content`, and `tool_calls` (as streaming deltas), for full responses and streams
alike."""

from __future__ import annotations

from dataclasses import dataclass

from tgi_router.engine import TokenEvent
from tgi_router.reasoning import END, START, ReasoningParser
from tgi_router.request import FinishReason
from tgi_router.tools import ToolCall, ToolCallParser, ToolRequest


@dataclass(frozen=True)
class ChatOutput:
    """How a chat answer is read: for tool calls when the request has tools, and for thoughts when
    the template writes them (`reasoning`: whether the prompt opened them; None: no thoughts)."""

    tools: ToolRequest | None = None
    reasoning: bool | None = None

    @property
    def is_parsed(self) -> bool:
        """The answer is more than its text."""
        return self.tools is not None or self.reasoning is not None


class AnswerParser:
    """Reads an answer into OpenAI's delta fields: `reasoning_content`, `content`, `tool_calls`."""

    def __init__(self, output: ChatOutput):
        self._reasoning = None if output.reasoning is None else ReasoningParser(output.reasoning)
        self._tools = None if output.tools is None else ToolCallParser(output.tools.format)
        fmt = output.tools.format if output.tools else None
        # Special tokens are read only when they are one of the formats' markers (Mistral's [TOOL_CALLS]).
        self._markers = {START, END} | ({fmt.start, fmt.end} if fmt else set())

    @property
    def calls(self) -> list[ToolCall]:
        return self._tools.calls if self._tools else []

    def feed(self, event: TokenEvent) -> dict:
        """The delta fields that this token adds (and, on the answer's last token, all that is left)."""
        text = "" if event.token.special and event.token.text not in self._markers else event.token.text
        return self.feed_text(text, is_last=event.finish_reason is not None)

    def feed_text(self, text: str, is_last: bool) -> dict:
        reasoning, content = self._reasoning.feed(text) if self._reasoning else ("", text)
        if is_last and self._reasoning:
            rest = self._reasoning.finish()
            reasoning, content = reasoning + rest[0], content + rest[1]
        delta = {"content": content}
        if self._tools:
            parsed = self._tools.feed(content)
            if is_last:
                parsed += self._tools.finish()
            delta["content"] = parsed.content
            if parsed.deltas:
                delta["tool_calls"] = parsed.deltas
        if reasoning:
            delta["reasoning_content"] = reasoning
        return delta

    def finish_reason(self, reason: FinishReason) -> str | None:
        """OpenAI's finish reason once the answer holds tool calls ("tool_calls", unless it was cut
        short); None when it holds none."""
        if not self.calls:
            return None
        return "length" if reason == FinishReason.LENGTH else "tool_calls"

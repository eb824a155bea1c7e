"""Reasoning models' thoughts apart from their answer: OpenAI-style `reasoning_content`.

Qwen3, DeepSeek-R1 and their kin write `<think>…</think>` before the answer; some chat templates open
the `<think>` in the prompt (the answer then starts inside it), and some close it there when thinking
is switched off (`chat_template_kwargs: {"enable_thinking": false}`). `ReasoningParser` reads the
output piece by piece and splits it; the blank lines after `</think>` belong to neither part.
"""

from __future__ import annotations

import re

START, END = "<think>", "</think>"


def template_reasons(template: str | None) -> bool:
    """The template writes thoughts in <think> tags (so its model does)."""
    return bool(template) and START in template and END in template


def prompt_opens_reasoning(prompt: str) -> bool:
    """The prompt ends inside an open <think>: the output starts with thoughts."""
    return re.search(r"<think>\s*$", prompt) is not None


class ReasoningParser:
    def __init__(self, starts_in_reasoning: bool):
        self._state = "reasoning" if starts_in_reasoning else "start"
        self._pending = ""
        self._after_end = False  # strip the blank lines that follow </think>

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) that `text` adds."""
        self._pending += text
        reasoning = content = ""
        while self._pending:
            if self._state == "start":
                stripped = self._pending.lstrip()
                if stripped.startswith(START):
                    self._pending, self._state = stripped[len(START):], "reasoning"
                elif not stripped or START.startswith(stripped):
                    break  # may still open thoughts
                else:
                    self._state = "content"
            elif self._state == "reasoning":
                index = self._pending.find(END)
                if index >= 0:
                    reasoning += self._pending[:index]
                    self._pending, self._state, self._after_end = self._pending[index + len(END):], "content", True
                    continue
                keep = next((n for n in range(min(len(END) - 1, len(self._pending)), 0, -1)
                             if END.startswith(self._pending[-n:])), 0)
                reasoning += self._pending[: len(self._pending) - keep]
                self._pending = self._pending[len(self._pending) - keep:]
                break
            else:
                if self._after_end:
                    self._pending = self._pending.lstrip()
                    if not self._pending:
                        break
                    self._after_end = False
                content += self._pending
                self._pending = ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is left at the end of the output: unfinished thoughts stay thoughts."""
        pending, self._pending = self._pending, ""
        if self._state == "reasoning":
            return pending, ""
        return "", "" if self._after_end else pending

"""Turning sampled ids into text one token at a time, and finding stop sequences in that text."""

from __future__ import annotations

from tgi_router.tokenizer import Tokenizer

# Prompt tokens decoded with the first generated ones, so the tokenizer's clean-up rules (leading
# spaces, word joining) see the same context as in a full decode.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Decodes a growing sequence, emitting text only once it is complete UTF-8.

    A byte-fallback or byte-level token can hold part of a character; its text is held back (the
    decode ends in U+FFFD) and emitted with the token that completes it.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._pieces)

    def push(self, token_id: int) -> str:
        """Adds one token; returns the text it completes (possibly empty)."""
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        emitted = decode(self._ids[self._prefix_offset : self._read_offset])
        current = decode(self._ids[self._prefix_offset :])
        if len(current) <= len(emitted) or current.endswith("\ufffd"):
            return ""
        piece = current[len(emitted) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._pieces.append(piece)
        return piece


class StopSequenceMatcher:
    """Watches generated text for stop sequences, which may span tokens or sit inside one."""

    def __init__(self, stop_sequences: list[str]):
        self._stops = [s for s in stop_sequences if s]
        self._tail_size = max((len(s) for s in self._stops), default=1) - 1
        self._tail = ""
        self._num_chars = 0

    def feed(self, new_text: str) -> int | None:
        """Adds the next text; when a stop sequence has appeared, returns how many characters of the
        generated text to keep (up to and including the stop sequence, as TGI does), else None."""
        if not self._stops or not new_text:
            self._num_chars += len(new_text)
            return None
        window = self._tail + new_text
        window_start = self._num_chars - len(self._tail)
        ends = [window.find(s) + len(s) for s in self._stops if s in window]
        self._num_chars += len(new_text)
        self._tail = window[len(window) - self._tail_size :] if self._tail_size else ""
        return window_start + min(ends) if ends else None

"""Turning sampled ids into text one token at a time, and finding stop sequences in that text."""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from tgi_router.tokenizer import Tokenizer

# Prompt tokens decoded with the first generated ones, so the tokenizer's clean-up rules (leading
# spaces, word joining) see the same context as in a full decode.
_NUM_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Decodes one request's growing sequence, emitting text only once it is complete UTF-8 (TGI's
    `decode_token`).

    Each push decodes two short windows: the ids whose text was already emitted (from
    `prefix_offset` to `read_offset`) and the same plus the ids since; the new text is the
    difference. A byte-fallback or byte-level token can hold part of a character; then the decode
    ends in U+FFFD, nothing is emitted, and the text comes with the token that completes it.
    Special tokens are decoded as text (`skip_special_tokens=False`), as TGI's per-token texts are.

    The `tokenizers` library runs the same algorithm in Rust (`DecodeStream`: its window is the one
    kept here), a third of the cost of two decodes from Python, which matters at a token per request
    and step; it makes the pushes' texts while it can. It cannot when the tokenizer's decode is
    cleaned up in Python (`is_cleaning_up_spaces`), when the prompt's last tokens end inside a
    character (it would emit them later), or if it refuses a window; the decodes here then do.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self._tokenizer = tokenizer
        # Only the ids from prefix_offset on are kept: decodes never look further back.
        self._ids = list(prompt_ids[-_NUM_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._pieces: list[str] = []
        self._stream: DecodeStream | None = None
        if not tokenizer.is_cleaning_up_spaces:
            stream = DecodeStream(skip_special_tokens=False)
            # The prompt's window counts as emitted: its text is the stream's prefix from here on.
            if not self._ids or stream.step(tokenizer.backend, self._ids) is not None:
                self._stream = stream

    @property
    def text(self) -> str:
        """Everything emitted so far (the pushes' results, joined)."""
        return "".join(self._pieces)

    def push(self, token_id: int) -> str:
        """Adds one token; returns the text it completes, "" while a character is incomplete."""
        self._ids.append(token_id)
        if self._stream is not None:
            try:
                piece = self._stream.step(self._tokenizer.backend, token_id)
            except Exception:  # a window it cannot decode as a continuation: the decodes here take over
                self._stream = None
            else:
                return "" if piece is None else self._advance(piece)
        return self._emit(is_final=False)

    def flush(self) -> str:
        """At the end of generation: the text still held back, with U+FFFD for the incomplete
        character, so that `text` equals a decode of all generated ids."""
        return self._emit(is_final=True)

    def _emit(self, is_final: bool) -> str:
        decode = self._tokenizer.decode
        emitted = decode(self._ids[self._prefix_offset : self._read_offset])
        current = decode(self._ids[self._prefix_offset :])
        is_complete = len(current) > len(emitted) and not current.endswith(_REPLACEMENT_CHAR)
        if not (is_complete or (is_final and len(current) > len(emitted))):
            return ""
        return self._advance(current[len(emitted) :])

    def _advance(self, piece: str) -> str:
        """`piece` emitted: the window moves past the ids it was decoded after."""
        self._ids = self._ids[self._read_offset :]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        self._pieces.append(piece)
        return piece


class StopSequenceMatcher:
    """Watches one request's generated text for stop sequences, which may span several tokens or
    sit inside one token's text.

    Only a tail of the text is kept: the last `max(len(stop)) - 1` characters, the most a stop
    sequence can have before the newest text. An empty stop sequence matches after the first
    token, as TGI's end-anchored regex `$` does.
    """

    def __init__(self, stop_sequences: list[str]):
        self._stops = tuple(dict.fromkeys(s for s in stop_sequences if s))
        self._has_empty_stop = "" in stop_sequences
        self._tail_size = max((len(s) for s in self._stops), default=1) - 1
        self._tail = ""
        self._num_chars = 0

    def feed(self, new_text: str) -> int | None:
        """Adds the next text. When a stop sequence has appeared, returns how many characters of the
        generated text to keep: up to the end of the earliest match, the stop sequence included (as
        TGI returns it); else None."""
        num_chars_before = self._num_chars
        self._num_chars += len(new_text)
        if self._has_empty_stop:
            return self._num_chars
        if not self._stops or not new_text:
            return None
        window = self._tail + new_text
        window_start = num_chars_before - len(self._tail)
        match_ends = []
        for stop in self._stops:
            # A match that lies wholly in the tail was reported before; look only for new ones.
            start = window.find(stop, max(0, len(self._tail) - len(stop) + 1))
            if start >= 0:
                match_ends.append(start + len(stop))
        self._tail = window[-self._tail_size :] if self._tail_size else ""
        return window_start + min(match_ends) if match_ends else None

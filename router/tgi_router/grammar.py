"""Constrained decoding with llguidance: grammars compiled in the router, one token mask per step.

A request's grammar (a JSON schema, a regex, or any JSON object for OpenAI's `json_object`) compiles
to an llguidance grammar once per distinct text (cached) and off the event loop. Each constrained
request holds a matcher: for a step in which it samples, the router asks it for the bitmask of
allowed next tokens (bit t of little-endian 32-bit word t // 32, one bit per id of the model's
vocabulary) while the shards run the step's forward, and sends it after the step (StepMasks); the
shard sets every other logit to -inf before sampling.
Each sampled token then advances the matcher. Where the grammar may end, the mask also allows the
end-of-sequence tokens; once it can only end, the request finishes (reason `eos_token`) without a
step to sample the end-of-sequence token it would be forced to.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import threading
from dataclasses import dataclass

from tgi_router.errors import ValidationError

GRAMMAR_TYPES = ("json", "json_schema", "regex")
# Any JSON value that is an object: OpenAI's response_format {"type": "json_object"}.
ANY_JSON_OBJECT = {"type": "object"}
# JSON may be indented, but a run of whitespace is bounded: with unbounded whitespace, greedy decoding
# of a small model can emit newlines for ever between two tokens (seen with SmolLM2-135M). A schema's
# own "x-guidance" options override this.
JSON_DEFAULTS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,48}"}


@dataclass(frozen=True)
class GrammarSpec:
    """What the request asked for: `kind` "json" (a JSON schema, as JSON text), "regex", or "lark" (a
    Lark grammar the router wrote: tool calls, see tools.py)."""

    kind: str
    value: str

    @classmethod
    def from_tgi(cls, grammar: dict) -> GrammarSpec:
        """TGI's `parameters.grammar`: {"type": "json" | "json_schema" | "regex", "value": ...}."""
        kind, value = grammar.get("type"), grammar.get("value")
        if kind not in GRAMMAR_TYPES:
            raise ValidationError(f"grammar `type` must be one of {', '.join(GRAMMAR_TYPES)}, got {kind!r}")
        if kind == "regex":
            if not isinstance(value, str):
                raise ValidationError("a regex grammar's `value` must be a string")
            return cls("regex", value)
        if isinstance(value, str):  # TGI accepts the schema as JSON text too
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise ValidationError(f"grammar `value` is not valid JSON: {error}") from None
        if kind == "json_schema" and isinstance(value, dict) and "schema" in value:  # {"name", "schema"}
            value = value["schema"]
        return cls.json_schema(value)

    @classmethod
    def json_schema(cls, schema) -> GrammarSpec:
        if not isinstance(schema, (dict, bool)):
            raise ValidationError(f"a JSON schema must be an object, got {type(schema).__name__}")
        return cls("json", json.dumps(schema))  # key order kept: properties are generated in it


class Grammars:
    """Compiles grammars for one tokenizer and makes matchers; thread-safe, cached by grammar text.

    `tokenizer_json` is the tokenizer.json text, `vocab_size` the model's logits width (masks cover
    it), `eos_token_ids` the ids that end a request. The llguidance tokenizer (about a second to
    build for a 128k vocabulary) is built on first use.
    """

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int], cache_size: int = 256):
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self._eos_token_ids = list(eos_token_ids)
        self._lock = threading.Lock()
        self._tokenizer = None
        self._initial = functools.lru_cache(maxsize=cache_size)(self._initial_matcher)

    def preload(self) -> None:
        """Builds the llguidance tokenizer in a background thread, so that the first request with a
        grammar does not wait for it."""
        threading.Thread(target=self._llg_tokenizer, name="grammar-tokenizer", daemon=True).start()

    def _llg_tokenizer(self):
        import llguidance

        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.LLTokenizer(
                    self._tokenizer_json, n_vocab=self.vocab_size, eos_token=self._eos_token_ids or None
                )
            return self._tokenizer

    def _initial_matcher(self, spec: GrammarSpec):
        """A matcher at the start of `spec`'s grammar, compiled and validated; ValidationError naming
        the problem otherwise. Cached: requests copy it."""
        from llguidance import LLMatcher

        try:
            if spec.kind == "regex":
                grammar = LLMatcher.grammar_from_regex(spec.value)
            elif spec.kind == "lark":
                grammar = LLMatcher.grammar_from_lark(spec.value)
            else:
                grammar = LLMatcher.grammar_from_json_schema(spec.value, defaults=JSON_DEFAULTS)
        except Exception as error:  # the library's own type checks; any of them is the request's fault
            raise ValidationError(f"invalid grammar: {error}") from None
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self._llg_tokenizer())
        if is_error:
            kind = {"regex": "regex", "lark": "tool-call"}.get(spec.kind, "JSON schema")
            raise ValidationError(f"invalid {kind} grammar: {messages[0]}")
        matcher = LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise ValidationError(f"invalid grammar: {matcher.get_error()}")
        return matcher

    async def prepare_async(self, spec: GrammarSpec) -> None:
        """Compiles `spec` (unless cached) in a worker thread, so that a large schema does not stall
        the event loop; raises ValidationError for a grammar that does not compile."""
        await asyncio.get_running_loop().run_in_executor(None, self._initial, spec)

    def matcher(self, spec: GrammarSpec) -> Constraint:
        """A fresh matcher at the start of `spec`'s grammar (cheap once `prepare_async` compiled it)."""
        tokenizer = self._llg_tokenizer()
        mask_bytes = (tokenizer.vocab_size + 31) // 32 * 4
        return Constraint(self._initial(spec).deep_copy(), mask_bytes, self._added_tokens)

    @functools.cached_property
    def _added_tokens(self) -> AddedTokens:
        tokenizer = self._llg_tokenizer()
        ids = [entry["id"] for entry in json.loads(self._tokenizer_json).get("added_tokens", [])]
        text = {i: tokenizer.decode_bytes([i]) for i in ids
                if i < tokenizer.vocab_size and i not in self._eos_token_ids and tokenizer.is_special_token(i)}
        bits: dict[int, int] = {}
        for token_id in text:
            bits[token_id >> 3] = bits.get(token_id >> 3, 0) | 1 << (token_id & 7)
        return AddedTokens(tokenizer, text, tuple(bits.items()))


_executor = None


def compute_masks(constraints: list[Constraint]) -> list[bytes]:
    """The next-token masks of several requests at once: llguidance's executor computes them on its
    own threads (the GIL released), into one buffer."""
    global _executor
    live = [(i, c) for i, c in enumerate(constraints) if c._end_mask is None]
    masks = [c._end_mask for c in constraints]
    if len(live) == 1:
        index, constraint = live[0]
        masks[index] = constraint.mask()
    elif live:
        import llguidance

        if _executor is None:
            _executor = llguidance.LLExecutor()
        size = live[0][1].mask_bytes
        buffer = bytearray(size * len(live))
        pointer = ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))
        _executor.unsafe_compute_mask_ptr([(c._matcher, row) for row, (_, c) in enumerate(live)], pointer, size, len(live))
        view = memoryview(buffer)
        for row, (index, constraint) in enumerate(live):
            masks[index] = constraint.checked(view[row * size : (row + 1) * size].tobytes())
    return masks


@dataclass(frozen=True)
class AddedTokens:
    """The llguidance tokenizer, and the text of the tokenizer's added tokens that llguidance holds
    as special (Qwen3's `<think>`, `<tool_call>`; end-of-sequence tokens aside)."""

    tokenizer: object
    text: dict[int, bytes]
    # (byte of a mask, its bits that are added tokens): a mask without any costs a few byte tests.
    mask_bits: tuple[tuple[int, int], ...] = ()


class Constraint:
    """One request's position in its grammar."""

    def __init__(self, matcher, mask_bytes: int, added: AddedTokens | None = None):
        self._matcher = matcher
        self.mask_bytes = mask_bytes  # the size of its masks: 4 bytes per 32 token ids
        self._end_mask: bytes | None = None  # once the grammar has ended: end of sequence only
        self._added = added

    def mask(self) -> bytes:
        """The packed bitmask of tokens allowed next."""
        if self._end_mask is not None:
            return self._end_mask
        return self.checked(self._matcher.compute_bitmask())

    def checked(self, mask: bytes) -> bytes:
        """`mask` without the added tokens the grammar would refuse. llguidance 1.9 puts an added
        token in the mask where the grammar forces bytes equal to its text (a regex or a JSON string
        spelling `<think>` with Qwen3's tokenizer), yet its matcher refuses that token when it comes;
        such a token gives way to the first token of the same text spelled byte by byte."""
        if self._added is None or not any(mask[byte] & bits for byte, bits in self._added.mask_bits):
            return mask
        fixed = None
        for token_id, text in self._added.text.items():
            if mask[token_id >> 3] >> (token_id & 7) & 1 and self._matcher.validate_tokens([token_id]) != 1:
                fixed = fixed or bytearray(mask)
                fixed[token_id >> 3] &= ~(1 << (token_id & 7)) & 0xFF
                spelled = self._added.tokenizer.greedy_tokenize(text.decode("utf-8", "replace"))  # no added tokens
                if spelled and self._matcher.validate_tokens(spelled[:1]) == 1:
                    fixed[spelled[0] >> 3] |= 1 << (spelled[0] & 7)
        return mask if fixed is None else bytes(fixed)

    @property
    def is_finished(self) -> bool:
        """The grammar is complete and allows nothing but end of sequence: the request ends here
        (as if the model had sampled it)."""
        return self._matcher.is_stopped()

    def advance(self, token_id: int) -> None:
        """Consumes a sampled token; raises RuntimeError if the grammar forbids it (a bug: the mask
        allowed only what the grammar allows)."""
        if self._end_mask is not None:  # past the end (`ignore_eos`): only end-of-sequence tokens came
            return
        if self.is_finished:
            self._end_mask = self._matcher.compute_bitmask()
        if not self._matcher.consume_token(token_id):
            raise RuntimeError(f"token {token_id} violates the request's grammar: {self._matcher.get_error()}")

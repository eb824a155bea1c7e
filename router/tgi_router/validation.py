"""TGI's request validation: the same checks, in the same order, with the same messages.

A handler runs, in this order (TGI's):
1. `parse_generate_request`: the JSON body against TGI's types (where TGI's JSON extractor would
   fail, a clear 422 here);
2. `validate_parameters`: parameter values, before tokenization;
3. `validate_inputs`: the input text and `truncate`, before tokenization;
4. tokenization (the caller's, e.g. in a thread);
5. `validate_input_ids`: left truncation, the length limits, then the `ValidRequest` the engine needs.
"""

from __future__ import annotations

import math
import secrets
import struct
from dataclasses import dataclass, field

from tgi_router.adapters import LoraAdapters
from tgi_router.errors import ValidationError
from tgi_router.grammar import GrammarSpec
from tgi_router.parameters import BY_NAME
from tgi_router.request import SamplingParams

# TGI schedules at most this many new tokens at a time and re-queues the request to continue, so
# the length check counts no more than this many.
DEFAULT_GENERATION_LENGTH = 1024



@dataclass(frozen=True)
class ValidationConfig:
    max_best_of: int
    max_stop_sequences: int
    max_top_n_tokens: int
    max_input_tokens: int
    max_total_tokens: int
    # False: requests with a grammar get 422 (the launcher's --disable-grammar-support).
    grammar_support: bool = True
    # The model's logits width: `logit_bias` ids must be below it (0: unchecked).
    vocab_size: int = 0
    # The LoRA adapters the shards hold (loaded at start or at run time); `adapter_id` picks one by name.
    lora: LoraAdapters = field(default_factory=LoraAdapters)

    def adapter_number(self, adapter_id: str | None) -> int:
        """The id of the adapter named `adapter_id` (0: none given); ValidationError for one not loaded."""
        if not adapter_id:
            return 0
        if adapter_id not in self.lora.ids:
            loaded = ", ".join(f"`{name}`" for name in self.lora.ids) or "none"
            raise ValidationError(f"adapter `{adapter_id}` is not loaded (loaded: {loaded})")
        return self.lora.ids[adapter_id]


@dataclass(frozen=True)
class GenerateParameters:
    """TGI's `GenerateParameters` as the client sent them; None means "not given"."""

    best_of: int | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool = False
    max_new_tokens: int | None = None
    return_full_text: bool | None = None
    stop: tuple[str, ...] = ()
    truncate: int | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    seed: int | None = None
    top_n_tokens: int | None = None
    grammar: dict | None = None
    # vLLM's extension, not TGI's: end-of-sequence tokens do not stop generation, so a request runs
    # to max_new_tokens (or a stop sequence). Benchmarks use it for fixed output lengths.
    ignore_eos: bool = False
    # OpenAI's and vLLM's, not TGI's: tokens below min_p times the most likely one's probability are
    # dropped when sampling; {token id: bias} added to the logits before anything else.
    min_p: float | None = None
    logit_bias: dict | None = None
    # The LoRA adapter to generate with, by name; one not loaded is a 422, never the base model's answer.
    adapter_id: str | None = None

    @property
    def is_sampling(self) -> bool:
        """Sampling as TGI's shards decide it: asked for, or implied by any non-default warper."""
        return (
            self.do_sample
            or (self.temperature is not None and self.temperature != 1.0)
            or bool(self.top_k)
            or (self.top_p is not None and self.top_p < 1.0)
            or (self.typical_p is not None and self.typical_p < 1.0)
        )

    @property
    def is_sampling_requested(self) -> bool:
        """TGI's test for `best_of`: any warper given, whatever its value, counts as sampling."""
        warpers = (self.temperature, self.top_k, self.top_p, self.typical_p)
        return self.do_sample or any(value is not None for value in warpers)


@dataclass(frozen=True)
class GenerateRequest:
    inputs: str
    parameters: GenerateParameters
    # A grammar the router built (tool calls), in place of `parameters.grammar`.
    grammar: GrammarSpec | None = None


@dataclass(frozen=True)
class ValidRequest:
    """Everything a TGI handler and the engine need, with TGI's defaults filled in."""

    inputs: str
    input_ids: list[int]  # after left truncation
    max_new_tokens: int
    # do_sample is the effective one (see GenerateParameters.is_sampling); seed is random if not given.
    sampling: SamplingParams
    is_seed_given: bool
    stop: tuple[str, ...]
    top_n_tokens: int
    details: bool
    decoder_input_details: bool
    return_full_text: bool
    best_of: int
    watermark: bool
    ignore_eos: bool = False
    # The grammar the output must follow (compiled by the router before the request is queued).
    grammar: GrammarSpec | None = None
    # The LoRA adapter of `adapter_id` (`LoraAdapters` id; 0: the base model).
    adapter_id: int = 0


_KIND_NAMES = {"boolean": "a boolean", "string": "a string", "strings": "a list of strings", "object": "an object"}
# OpenAI's range of a logit bias.
MAX_LOGIT_BIAS = 100.0


def parse_generate_request(body: dict) -> GenerateRequest:
    """Type-checks `{"inputs": str, "parameters"?: {...}}`; unknown fields are ignored, as in TGI.

    Without `parameters`, TGI samples (`do_sample: true`); with them, every missing field takes
    its default, so `do_sample` is false.
    """
    if not isinstance(body, dict):
        raise ValidationError("the request body must be a JSON object")
    inputs = body.get("inputs")
    if not isinstance(inputs, str):
        raise ValidationError("`inputs` must be a string")
    if "parameters" not in body:
        return GenerateRequest(inputs, GenerateParameters(do_sample=True))
    raw = body["parameters"]
    if not isinstance(raw, dict):
        raise ValidationError("`parameters` must be an object")
    values = {name: _checked(name, raw[name]) for name in BY_NAME if name in raw}
    return GenerateRequest(inputs, GenerateParameters(**{k: v for k, v in values.items() if v is not None}))


def _checked(name: str, value):
    """`value` as TGI's type for parameter `name` reads it (parameters.py), or a ValidationError."""
    parameter = BY_NAME[name]
    if value is None:
        if not parameter.nullable:
            raise ValidationError(f"`{name}` must not be null")
        return None
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if parameter.kind == "integer":
        low, high = parameter.integer_range
        if not is_number or isinstance(value, float):
            raise ValidationError(f"`{name}` must be an integer, got {value!r}")
        if not low <= value <= high:
            raise ValidationError(f"`{name}` must be an integer between {low} and {high}, got {value}")
        return value
    if parameter.kind == "number":
        if not is_number:
            raise ValidationError(f"`{name}` must be a number, got {value!r}")
        number = _as_f32(value)
        if not math.isfinite(number):
            raise ValidationError(f"`{name}` must be a finite number, got {value!r}")
        return number
    expected = {"boolean": bool, "string": str, "strings": list, "object": dict}[parameter.kind]
    if not isinstance(value, expected) or (parameter.kind == "strings" and not all(isinstance(s, str) for s in value)):
        raise ValidationError(f"`{name}` must be {_KIND_NAMES[parameter.kind]}, got {value!r}")
    return tuple(value) if parameter.kind == "strings" else value


def _as_f32(value: int | float) -> float:
    """The value TGI compares: JSON numbers are read as f32 (so 0.99999999 is 1.0 there too)."""
    try:
        return struct.unpack("f", struct.pack("f", float(value)))[0]
    except OverflowError:
        return math.inf


def validate_parameters(params: GenerateParameters, config: ValidationConfig, is_stream: bool = False) -> None:
    """Value checks that need no tokenization, in TGI's order, first failure raised."""
    best_of = 1 if params.best_of is None else params.best_of
    if is_stream:
        # TGI's streaming handler refuses these before validating anything else.
        if best_of != 1:
            raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
        if params.decoder_input_details:
            raise ValidationError("`decoder_input_details` == true is not supported when streaming tokens")
    elif best_of > 1:
        if config.max_best_of == 1:
            raise ValidationError("`best_of` != 1 is not allowed for this endpoint")
        if best_of > config.max_best_of:
            raise ValidationError(f"`best_of` must be > 0 and <= {config.max_best_of}. Given: {best_of}")
    temperature, top_k, top_p, typical_p = params.temperature, params.top_k, params.top_p, params.typical_p
    num_stops, top_n_tokens = len(params.stop), params.top_n_tokens
    checks = [
        (best_of > 1 and not params.is_sampling_requested, "you must use sampling when `best_of` is > 1"),
        (temperature is not None and temperature <= 0, "`temperature` must be strictly positive"),
        (params.repetition_penalty is not None and params.repetition_penalty <= 0,
         "`repetition_penalty` must be strictly positive"),
        (params.frequency_penalty is not None and not -2.0 <= params.frequency_penalty <= 2.0,
         "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        (top_p is not None and not 0.0 < top_p < 1.0, "`top_p` must be > 0.0 and < 1.0"),
        (typical_p is not None and not 0.0 < typical_p < 1.0, "`typical_p` must be > 0.0 and < 1.0"),
        (top_k is not None and top_k <= 0, "`top_k` must be strictly positive"),
        (params.min_p is not None and not 0.0 <= params.min_p <= 1.0, "`min_p` must be >= 0.0 and <= 1.0"),
        (params.max_new_tokens == 0, "`max_new_tokens` must be strictly positive"),
        (num_stops > config.max_stop_sequences,
         f"`stop` supports up to {config.max_stop_sequences} stop sequences. Given: {num_stops}"),
        (params.seed is not None and best_of > 1, "`seed` must not be set when `best_of` > 1"),
        (top_n_tokens is not None and top_n_tokens > config.max_top_n_tokens,
         f"`top_n_tokens` must be >= 0 and <= {config.max_top_n_tokens}. Given: {top_n_tokens}"),
    ]
    config.adapter_number(params.adapter_id)
    for is_failed, message in checks:
        if is_failed:
            raise ValidationError(message)
    _logit_bias(params.logit_bias, config.vocab_size)


def _logit_bias(bias: dict | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """`logit_bias` ({"token id": bias}, as OpenAI's JSON has it) as sorted (id, bias) pairs."""
    pairs = []
    for key, value in (bias or {}).items():
        token_id = int(key) if isinstance(key, str) and key.isdigit() else key
        if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0 \
                or (vocab_size and token_id >= vocab_size):
            raise ValidationError(f"`logit_bias` keys must be token ids below {vocab_size or 'the vocabulary size'}, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise ValidationError(f"`logit_bias` values must be numbers between -100 and 100, got {value!r}")
        pairs.append((token_id, float(value)))
    return tuple(sorted(pairs))


def validate_inputs(request: GenerateRequest, config: ValidationConfig) -> None:
    """Checks on the raw input text and `truncate`, before tokenization."""
    if not request.inputs:
        raise ValidationError("`inputs` cannot be empty")
    truncate = request.parameters.truncate
    if truncate is not None and not 0 < truncate <= config.max_input_tokens:
        raise ValidationError(
            f"`truncate` must be strictly positive and less than {config.max_input_tokens}. Given: {truncate}"
        )


def validate_input_ids(request: GenerateRequest, input_ids: list[int], config: ValidationConfig,
                       default_return_full_text: bool = False) -> ValidRequest:
    """After tokenization: keeps the last `truncate` ids, checks the lengths, fills the defaults.

    TGI checks `inputs + min(max_new_tokens, 1024)` against max_total_tokens, since it generates
    1024 tokens at a time and re-queues for more; this engine generates in one go, so
    `max_new_tokens` is clamped to what fits, where TGI would stop re-queueing.
    """
    params = request.parameters
    num_input_tokens = min(len(input_ids), params.truncate or len(input_ids))
    input_ids = input_ids[len(input_ids) - num_input_tokens :]
    if params.max_new_tokens is None:
        max_new_tokens = max(config.max_total_tokens - num_input_tokens, 0)
    else:
        max_new_tokens = params.max_new_tokens
    num_first_new_tokens = min(max_new_tokens, DEFAULT_GENERATION_LENGTH)
    if num_input_tokens + num_first_new_tokens > config.max_total_tokens:
        raise ValidationError(
            f"`inputs` tokens + `max_new_tokens` must be <= {config.max_total_tokens}. "
            f"Given: {num_input_tokens} `inputs` tokens and {num_first_new_tokens} `max_new_tokens`"
        )
    if num_input_tokens > config.max_input_tokens:
        raise ValidationError(
            f"`inputs` must have less than {config.max_input_tokens} tokens. Given: {num_input_tokens}"
        )
    grammar = request.grammar
    if params.grammar is not None or grammar is not None:
        if not config.grammar_support:
            raise ValidationError("grammar is not supported")  # TGI's message when grammars are disabled
        grammar = grammar or GrammarSpec.from_tgi(params.grammar)
    return ValidRequest(
        inputs=request.inputs,
        input_ids=input_ids,
        max_new_tokens=min(max_new_tokens, config.max_total_tokens - num_input_tokens),
        sampling=_sampling(params),
        is_seed_given=params.seed is not None,
        stop=params.stop,
        top_n_tokens=params.top_n_tokens or 0,
        details=params.details,
        decoder_input_details=params.decoder_input_details,
        return_full_text=default_return_full_text if params.return_full_text is None else params.return_full_text,
        best_of=max(params.best_of or 1, 1),
        watermark=params.watermark,
        ignore_eos=params.ignore_eos,
        grammar=grammar,
        adapter_id=config.adapter_number(params.adapter_id),
    )


def _sampling(params: GenerateParameters) -> SamplingParams:
    return SamplingParams(
        do_sample=params.is_sampling,
        temperature=1.0 if params.temperature is None else params.temperature,
        top_k=params.top_k or 0,
        top_p=1.0 if params.top_p is None else params.top_p,
        typical_p=1.0 if params.typical_p is None else params.typical_p,
        repetition_penalty=1.0 if params.repetition_penalty is None else params.repetition_penalty,
        frequency_penalty=0.0 if params.frequency_penalty is None else params.frequency_penalty,
        seed=secrets.randbits(64) if params.seed is None else params.seed,
        watermark=params.watermark,
        min_p=params.min_p or 0.0,
        logit_bias=_logit_bias(params.logit_bias, 0),
    )

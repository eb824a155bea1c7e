"""TGI's request validation: the same checks, in the same order, with the same messages.

`parse_generate_request` type-checks the JSON; `validate_parameters` checks values before
tokenization; `validate_input_ids` checks lengths after it and fills the derived defaults.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields

from tgi_router.errors import ValidationError
from tgi_router.request import SamplingParams


@dataclass(frozen=True)
class ValidationConfig:
    max_best_of: int
    max_stop_sequences: int
    max_top_n_tokens: int
    max_input_tokens: int
    max_total_tokens: int


@dataclass(frozen=True)
class GenerateParameters:
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
    stop: list[str] = field(default_factory=list)
    truncate: int | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    seed: int | None = None
    top_n_tokens: int | None = None
    grammar: dict | None = None
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


@dataclass(frozen=True)
class GenerateRequest:
    inputs: str
    parameters: GenerateParameters


@dataclass(frozen=True)
class ValidRequest:
    inputs: str
    input_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stop: list[str]
    top_n_tokens: int
    details: bool
    decoder_input_details: bool
    return_full_text: bool


# JSON type each parameter accepts (None is always allowed for optional ones).
_FIELD_TYPES = {
    "best_of": int, "temperature": float, "repetition_penalty": float, "frequency_penalty": float,
    "top_k": int, "top_p": float, "typical_p": float, "do_sample": bool, "max_new_tokens": int,
    "return_full_text": bool, "stop": list, "truncate": int, "watermark": bool, "details": bool,
    "decoder_input_details": bool, "seed": int, "top_n_tokens": int, "grammar": dict, "adapter_id": str,
}
_NOT_NULLABLE = {"do_sample", "watermark", "details", "decoder_input_details", "stop"}


def parse_generate_request(body: dict) -> GenerateRequest:
    inputs = body.get("inputs")
    if not isinstance(inputs, str):
        raise ValidationError("`inputs` must be a string")
    raw = body.get("parameters")
    if raw is None:
        # TGI quirk kept for compatibility: without a parameters object, requests are sampled.
        return GenerateRequest(inputs, GenerateParameters(do_sample=True))
    if not isinstance(raw, dict):
        raise ValidationError("`parameters` must be an object")
    known = {f.name for f in fields(GenerateParameters)}
    values = {name: _checked(name, value) for name, value in raw.items() if name in known}
    return GenerateRequest(inputs, GenerateParameters(**{k: v for k, v in values.items() if v is not None}))


def _checked(name: str, value):
    expected = _FIELD_TYPES[name]
    if value is None and name not in _NOT_NULLABLE:
        return None
    is_bool = isinstance(value, bool)
    if expected is float and isinstance(value, (int, float)) and not is_bool:
        return float(value)
    if expected is int and isinstance(value, int) and not is_bool:
        if value < 0 or value >= 1 << 64:
            raise ValidationError(f"`{name}` must be a non-negative integer below 2^64, got {value}")
        return value
    if expected is list and isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    if expected in (bool, dict, str) and isinstance(value, expected):
        return value
    raise ValidationError(f"`{name}` must be of type {_type_name(expected)}, got {value!r}")


def _type_name(expected) -> str:
    return {int: "integer", float: "number", bool: "boolean", list: "list of strings", dict: "object", str: "string"}[expected]


def validate_parameters(params: GenerateParameters, config: ValidationConfig, is_stream: bool = False) -> None:
    """Value checks that need no tokenization, in TGI's order."""
    _validate_best_of(params, config, is_stream)
    checks = [
        (params.temperature is not None and params.temperature <= 0, "`temperature` must be strictly positive"),
        (params.repetition_penalty is not None and params.repetition_penalty <= 0,
         "`repetition_penalty` must be strictly positive"),
        (params.frequency_penalty is not None and not -2.0 <= params.frequency_penalty <= 2.0,
         "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        (params.top_p is not None and not 0.0 < params.top_p < 1.0, "`top_p` must be > 0.0 and < 1.0"),
        (params.typical_p is not None and not 0.0 < params.typical_p < 1.0, "`typical_p` must be > 0.0 and < 1.0"),
        (params.top_k is not None and params.top_k <= 0, "`top_k` must be strictly positive"),
        (params.max_new_tokens == 0, "`max_new_tokens` must be strictly positive"),
        (len(params.stop) > config.max_stop_sequences,
         f"`stop` supports up to {config.max_stop_sequences} stop sequences. Given: {len(params.stop)}"),
        ((params.top_n_tokens or 0) > config.max_top_n_tokens,
         f"`top_n_tokens` must be >= 0 and <= {config.max_top_n_tokens}. Given: {params.top_n_tokens}"),
        (is_stream and params.decoder_input_details,
         "`decoder_input_details` == true is not supported when streaming tokens"),
        (params.grammar is not None, "grammar is not supported yet by this server"),
        (params.watermark, "`watermark` is not supported yet by this server"),
        (params.decoder_input_details, "`decoder_input_details` is not supported yet by this server"),
    ]
    for failed, message in checks:
        if failed:
            raise ValidationError(message)


def _validate_best_of(params: GenerateParameters, config: ValidationConfig, is_stream: bool) -> None:
    best_of = params.best_of
    if best_of is None or best_of == 1:
        return
    if config.max_best_of == 1:
        raise ValidationError("`best_of` != 1 is not allowed for this endpoint")
    if best_of == 0 or best_of > config.max_best_of:
        raise ValidationError(f"`best_of` must be > 0 and <= {config.max_best_of}. Given: {best_of}")
    if not params.is_sampling:
        raise ValidationError("you must use sampling when `best_of` is > 1")
    if params.seed is not None:
        raise ValidationError("`seed` must not be set when `best_of` > 1")
    if is_stream:
        raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
    raise ValidationError("`best_of` > 1 is not supported yet by this server")


def validate_inputs(request: GenerateRequest, config: ValidationConfig) -> None:
    """Checks on the raw input text, before tokenization."""
    if not request.inputs:
        raise ValidationError("`inputs` cannot be empty")
    truncate = request.parameters.truncate
    if truncate is not None and not 0 < truncate <= config.max_input_tokens:
        raise ValidationError(
            f"`truncate` must be strictly positive and less than {config.max_input_tokens}. Given: {truncate}"
        )


def validate_input_ids(request: GenerateRequest, input_ids: list[int], config: ValidationConfig,
                       default_return_full_text: bool = False) -> ValidRequest:
    """Length checks after tokenization (left truncation first); fills the derived defaults."""
    params = request.parameters
    if params.truncate is not None:
        input_ids = input_ids[-params.truncate:]
    num_inputs = len(input_ids)
    if num_inputs > config.max_input_tokens:
        raise ValidationError(f"`inputs` must have less than {config.max_input_tokens} tokens. Given: {num_inputs}")
    max_new_tokens = params.max_new_tokens or config.max_total_tokens - num_inputs
    if num_inputs + max_new_tokens > config.max_total_tokens:
        raise ValidationError(
            f"`inputs` tokens + `max_new_tokens` must be <= {config.max_total_tokens}. "
            f"Given: {num_inputs} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
        )
    return ValidRequest(
        inputs=request.inputs,
        input_ids=input_ids,
        max_new_tokens=max_new_tokens,
        sampling=SamplingParams(
            do_sample=params.is_sampling,
            temperature=params.temperature or 1.0,
            top_k=params.top_k or 0,
            top_p=params.top_p or 1.0,
            typical_p=params.typical_p or 1.0,
            repetition_penalty=params.repetition_penalty or 1.0,
            frequency_penalty=params.frequency_penalty or 0.0,
            seed=params.seed if params.seed is not None else random.getrandbits(64),
        ),
        stop=params.stop,
        top_n_tokens=params.top_n_tokens or 0,
        details=params.details,
        decoder_input_details=params.decoder_input_details,
        return_full_text=default_return_full_text if params.return_full_text is None else params.return_full_text,
    )

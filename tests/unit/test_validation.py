"""TGI's validation rules: one row per rule, with its exact message, all answered with 422."""

import pytest

from tgi_router.errors import ValidationError
from tgi_router.validation import (
    ValidationConfig,
    parse_generate_request,
    validate_input_ids,
    validate_inputs,
    validate_parameters,
)

CONFIG = ValidationConfig(max_best_of=2, max_stop_sequences=4, max_top_n_tokens=5, max_input_tokens=10, max_total_tokens=16)


def validate(body, input_ids=(1, 2, 3), is_stream=False):
    request = parse_generate_request(body)
    validate_parameters(request.parameters, CONFIG, is_stream=is_stream)
    validate_inputs(request, CONFIG)
    return validate_input_ids(request, list(input_ids), CONFIG)


RULES = [
    ({"best_of": 3, "do_sample": True}, "`best_of` must be > 0 and <= 2. Given: 3"),
    ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
    ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
    ({"temperature": 0}, "`temperature` must be strictly positive"),
    ({"temperature": -1.5}, "`temperature` must be strictly positive"),
    ({"repetition_penalty": 0}, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"frequency_penalty": -3}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_p": 0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"typical_p": 1.0}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"top_k": 0}, "`top_k` must be strictly positive"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
    ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    ({"truncate": 11}, "`truncate` must be strictly positive and less than 10. Given: 11"),
    ({"max_new_tokens": 14}, "`inputs` tokens + `max_new_tokens` must be <= 16. Given: 3 `inputs` tokens and 14 `max_new_tokens`"),
    ({"top_k": "ten"}, "`top_k` must be of type integer, got 'ten'"),
    ({"temperature": True}, "`temperature` must be of type number, got True"),
    ({"stop": "END"}, "`stop` must be of type list of strings, got 'END'"),
    ({"seed": -1}, "`seed` must be a non-negative integer below 2^64, got -1"),
    ({"max_new_tokens": 2**70}, "`max_new_tokens` must be a non-negative integer below 2^64, got 1180591620717411303424"),
    ({"grammar": {"type": "json", "value": {}}}, "grammar is not supported yet by this server"),
]


@pytest.mark.parametrize("parameters, message", RULES)
def test_each_rule_rejects_with_tgi_message_and_422(parameters, message):
    with pytest.raises(ValidationError) as caught:
        validate({"inputs": "hi", "parameters": parameters})
    assert caught.value.status == 422
    assert caught.value.to_json() == {"error": f"Input validation error: {message}", "error_type": "validation"}


@pytest.mark.parametrize(
    "body, message",
    [
        ({"inputs": ""}, "`inputs` cannot be empty"),
        ({"inputs": 5}, "`inputs` must be a string"),
        ({"inputs": "hi", "parameters": [1]}, "`parameters` must be an object"),
    ],
)
def test_inputs_rules(body, message):
    with pytest.raises(ValidationError, match=message):
        validate(body)


def test_too_long_input_is_rejected():
    with pytest.raises(ValidationError, match="`inputs` must have less than 10 tokens. Given: 11"):
        validate({"inputs": "hi", "parameters": {"max_new_tokens": 1}}, input_ids=range(11))


def test_streaming_refuses_best_of_and_decoder_input_details():
    with pytest.raises(ValidationError, match="`best_of` != 1 is not supported when streaming tokens"):
        validate({"inputs": "hi", "parameters": {"best_of": 2, "do_sample": True}}, is_stream=True)
    with pytest.raises(ValidationError, match="`decoder_input_details` == true is not supported when streaming"):
        validate({"inputs": "hi", "parameters": {"decoder_input_details": True}}, is_stream=True)


def test_missing_parameters_means_sampling_as_in_tgi():
    assert validate({"inputs": "hi"}).sampling.do_sample is True
    assert validate({"inputs": "hi", "parameters": {}}).sampling.do_sample is False


def test_any_warper_turns_sampling_on():
    assert validate({"inputs": "hi", "parameters": {"temperature": 0.5}}).sampling.do_sample is True
    assert validate({"inputs": "hi", "parameters": {"temperature": 1.0}}).sampling.do_sample is False
    assert validate({"inputs": "hi", "parameters": {"top_k": 3}}).sampling.do_sample is True


def test_max_new_tokens_defaults_to_the_remaining_budget():
    assert validate({"inputs": "hi", "parameters": {}}, input_ids=range(6)).max_new_tokens == 10


def test_truncate_keeps_the_last_tokens():
    valid = validate({"inputs": "hi", "parameters": {"truncate": 2, "max_new_tokens": 1}}, input_ids=[7, 8, 9])
    assert valid.input_ids == [8, 9]


def test_seed_is_random_when_absent_and_kept_when_given():
    assert validate({"inputs": "hi", "parameters": {"seed": 2**64 - 1}}).sampling.seed == 2**64 - 1
    seeds = {validate({"inputs": "hi", "parameters": {"do_sample": True}}).sampling.seed for _ in range(5)}
    assert len(seeds) == 5

"""TGI's validation rules: one row per rule with its exact message, all answered with 422, in TGI's
order; then the defaults a valid request gets."""

import dataclasses

import pytest

from tgi_router.adapters import LoraAdapters
from tgi_router.errors import ValidationError
from tgi_router.parameters import PARAMETERS
from tgi_router.validation import (
    GenerateParameters,
    ValidationConfig,
    parse_generate_request,
    validate_input_ids,
    validate_inputs,
    validate_parameters,
)

CONFIG = ValidationConfig(max_best_of=2, max_stop_sequences=4, max_top_n_tokens=5, max_input_tokens=10, max_total_tokens=16)
NO_GRAMMARS = dataclasses.replace(CONFIG, grammar_support=False)  # --disable-grammar-support


def validate(body, num_input_tokens=3, is_stream=False, config=CONFIG, default_return_full_text=False):
    """The handler's sequence: parse, parameters, inputs, (tokenize), lengths."""
    request = parse_generate_request(body)
    validate_parameters(request.parameters, config, is_stream=is_stream)
    validate_inputs(request, config)
    input_ids = list(range(100, 100 + num_input_tokens))
    return validate_input_ids(request, input_ids, config, default_return_full_text=default_return_full_text)


def rejection(body, **kwargs) -> str:
    with pytest.raises(ValidationError) as caught:
        validate(body, **kwargs)
    assert caught.value.status == 422
    assert caught.value.to_json() == {"error": caught.value.message, "error_type": "validation"}
    assert caught.value.message.startswith("Input validation error: ")
    return caught.value.message.removeprefix("Input validation error: ")


SAMPLED = {"do_sample": True}
RULES = [
    # (parameters, keyword arguments of `validate`, TGI's message)
    ({"best_of": 3, **SAMPLED}, {}, "`best_of` must be > 0 and <= 2. Given: 3"),
    ({"best_of": 2, **SAMPLED}, {"config": dataclasses.replace(CONFIG, max_best_of=1)},
     "`best_of` != 1 is not allowed for this endpoint"),
    ({"best_of": 2}, {}, "you must use sampling when `best_of` is > 1"),
    ({"temperature": 0}, {}, "`temperature` must be strictly positive"),
    ({"temperature": -1.5}, {}, "`temperature` must be strictly positive"),
    ({"repetition_penalty": 0}, {}, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": 2.5}, {}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"frequency_penalty": -3}, {}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"top_p": 1.0}, {}, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_p": 0}, {}, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_p": 0.99999999}, {}, "`top_p` must be > 0.0 and < 1.0"),  # 1.0 as an f32, as in TGI
    ({"typical_p": 1.0}, {}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"typical_p": -0.5}, {}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"top_k": 0}, {}, "`top_k` must be strictly positive"),
    ({"top_k": -1}, {}, "`top_k` must be strictly positive"),
    ({"max_new_tokens": 0}, {}, "`max_new_tokens` must be strictly positive"),
    ({"stop": ["a", "b", "c", "d", "e"]}, {}, "`stop` supports up to 4 stop sequences. Given: 5"),
    ({"best_of": 2, "seed": 1, **SAMPLED}, {}, "`seed` must not be set when `best_of` > 1"),
    ({"top_n_tokens": 6}, {}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    ({"truncate": 0}, {}, "`truncate` must be strictly positive and less than 10. Given: 0"),
    ({"truncate": 11}, {}, "`truncate` must be strictly positive and less than 10. Given: 11"),
    ({"max_new_tokens": 14}, {},
     "`inputs` tokens + `max_new_tokens` must be <= 16. Given: 3 `inputs` tokens and 14 `max_new_tokens`"),
    ({}, {"num_input_tokens": 17},
     "`inputs` tokens + `max_new_tokens` must be <= 16. Given: 17 `inputs` tokens and 0 `max_new_tokens`"),
    ({"max_new_tokens": 1}, {"num_input_tokens": 11}, "`inputs` must have less than 10 tokens. Given: 11"),
    ({"grammar": {"type": "json", "value": {"properties": {}}}}, {"config": NO_GRAMMARS}, "grammar is not supported"),
    ({"grammar": {"type": "cfg", "value": "x"}}, {}, "grammar `type` must be one of json, json_schema, regex, got 'cfg'"),
    ({"grammar": {"type": "regex", "value": 5}}, {}, "a regex grammar's `value` must be a string"),
    ({"grammar": {"type": "json", "value": "{not json"}}, {}, "grammar `value` is not valid JSON: "
     "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ({"grammar": {"type": "json", "value": [1]}}, {}, "a JSON schema must be an object, got list"),
    ({"adapter_id": "customer-a"}, {}, "adapter `customer-a` is not loaded (loaded: none)"),
    ({"adapter_id": "customer-a"}, {"config": dataclasses.replace(CONFIG, lora=LoraAdapters(("b", "c"), num_slots=1))},
     "adapter `customer-a` is not loaded (loaded: `b`, `c`)"),
    ({"best_of": 2}, {"is_stream": True}, "`best_of` != 1 is not supported when streaming tokens"),
    ({"best_of": 0}, {"is_stream": True}, "`best_of` != 1 is not supported when streaming tokens"),
    ({"decoder_input_details": True}, {"is_stream": True},
     "`decoder_input_details` == true is not supported when streaming tokens"),
]


@pytest.mark.parametrize("parameters, kwargs, message", RULES)
def test_each_rule_rejects_with_tgi_message_and_422(parameters, kwargs, message):
    assert rejection({"inputs": "hi", "parameters": parameters}, **kwargs) == message


def test_empty_inputs_are_rejected():
    assert rejection({"inputs": ""}) == "`inputs` cannot be empty"


ORDER = [
    # Two rules broken at once: TGI reports the one it checks first.
    ({"best_of": 3, "temperature": 0}, {}, "`best_of` must be > 0"),
    ({"best_of": 2, "temperature": 0}, {"is_stream": True}, "`best_of` != 1 is not supported when streaming"),
    ({"temperature": 0, "top_p": 1.0}, {}, "`temperature`"),
    ({"repetition_penalty": 0, "frequency_penalty": 3}, {}, "`repetition_penalty`"),
    ({"frequency_penalty": 3, "top_p": 1.0}, {}, "`frequency_penalty`"),
    ({"top_p": 1.0, "typical_p": 1.0}, {}, "`top_p`"),
    ({"typical_p": 1.0, "top_k": 0}, {}, "`typical_p`"),
    ({"top_k": 0, "max_new_tokens": 0}, {}, "`top_k`"),
    ({"max_new_tokens": 0, "stop": ["a"] * 5}, {}, "`max_new_tokens` must be strictly positive"),
    ({"stop": ["a"] * 5, "best_of": 2, "seed": 1, **SAMPLED}, {}, "`stop`"),
    ({"best_of": 2, "seed": 1, "top_n_tokens": 6, **SAMPLED}, {}, "`seed`"),
    ({"top_n_tokens": 6, "truncate": 0}, {}, "`top_n_tokens`"),
    ({"truncate": 0}, {"num_input_tokens": 17}, "`truncate`"),
    ({"max_new_tokens": 10}, {"num_input_tokens": 11}, "`inputs` tokens + `max_new_tokens`"),
    ({"grammar": {"type": "regex", "value": "a+"}}, {"num_input_tokens": 11}, "`inputs` must have less than"),
    ({"grammar": {"type": "regex", "value": "a+"}, "watermark": True}, {"config": NO_GRAMMARS}, "grammar is not supported"),
]


@pytest.mark.parametrize("parameters, kwargs, prefix", ORDER)
def test_first_rule_in_tgi_order_is_reported(parameters, kwargs, prefix):
    assert rejection({"inputs": "hi", "parameters": parameters}, **kwargs).startswith(prefix)


def test_empty_inputs_are_checked_before_truncate_but_after_parameters():
    assert rejection({"inputs": "", "parameters": {"truncate": 0}}) == "`inputs` cannot be empty"
    assert rejection({"inputs": "", "parameters": {"top_n_tokens": 6}}).startswith("`top_n_tokens`")


TYPE_ERRORS = [
    ({"inputs": 5}, "`inputs` must be a string"),
    ({"parameters": {}}, "`inputs` must be a string"),
    ({"inputs": "hi", "parameters": [1]}, "`parameters` must be an object"),
    ({"inputs": "hi", "parameters": None}, "`parameters` must be an object"),
    ({"inputs": "hi", "parameters": {"top_k": "ten"}}, "`top_k` must be an integer, got 'ten'"),
    ({"inputs": "hi", "parameters": {"top_k": 2.0}}, "`top_k` must be an integer, got 2.0"),
    ({"inputs": "hi", "parameters": {"top_k": 2**31}},
     "`top_k` must be an integer between -2147483648 and 2147483647, got 2147483648"),
    ({"inputs": "hi", "parameters": {"max_new_tokens": 2**32}},
     "`max_new_tokens` must be an integer between 0 and 4294967295, got 4294967296"),
    ({"inputs": "hi", "parameters": {"seed": -1}},
     "`seed` must be an integer between 0 and 18446744073709551615, got -1"),
    ({"inputs": "hi", "parameters": {"temperature": True}}, "`temperature` must be a number, got True"),
    ({"inputs": "hi", "parameters": {"temperature": "hot"}}, "`temperature` must be a number, got 'hot'"),
    ({"inputs": "hi", "parameters": {"temperature": float("nan")}}, "`temperature` must be a finite number, got nan"),
    ({"inputs": "hi", "parameters": {"top_p": 10**400}}, f"`top_p` must be a finite number, got {10**400!r}"),
    ({"inputs": "hi", "parameters": {"stop": "END"}}, "`stop` must be a list of strings, got 'END'"),
    ({"inputs": "hi", "parameters": {"stop": ["a", 1]}}, "`stop` must be a list of strings, got ['a', 1]"),
    ({"inputs": "hi", "parameters": {"stop": None}}, "`stop` must not be null"),
    ({"inputs": "hi", "parameters": {"details": None}}, "`details` must not be null"),
    ({"inputs": "hi", "parameters": {"do_sample": "yes"}}, "`do_sample` must be a boolean, got 'yes'"),
    ({"inputs": "hi", "parameters": {"ignore_eos": "true"}}, "`ignore_eos` must be a boolean, got 'true'"),
    ({"inputs": "hi", "parameters": {"ignore_eos": 1}}, "`ignore_eos` must be a boolean, got 1"),
    ({"inputs": "hi", "parameters": {"ignore_eos": None}}, "`ignore_eos` must not be null"),
    ({"inputs": "hi", "parameters": {"grammar": "a+"}}, "`grammar` must be an object, got 'a+'"),
    ({"inputs": "hi", "parameters": {"adapter_id": 3}}, "`adapter_id` must be a string, got 3"),
]


@pytest.mark.parametrize("body, message", TYPE_ERRORS)
def test_wrong_json_types_are_422_with_a_clear_message(body, message):
    assert rejection(body) == message


def test_nulls_mean_not_given_for_optional_fields():
    valid = validate({"inputs": "hi", "parameters": {"temperature": None, "top_k": None, "max_new_tokens": None}})
    assert valid.sampling.temperature == 1.0 and valid.sampling.top_k == 0 and valid.max_new_tokens == 13


def test_unknown_fields_are_ignored():
    assert validate({"inputs": "hi", "stream": True, "parameters": {"max_new_tokens": 2, "foo": 1}}).max_new_tokens == 2


def test_missing_parameters_means_sampling_as_in_tgi():
    assert validate({"inputs": "hi"}).sampling.do_sample is True
    assert validate({"inputs": "hi", "parameters": {}}).sampling.do_sample is False


@pytest.mark.parametrize(
    "parameters, is_sampling",
    [
        ({"temperature": 0.5}, True), ({"temperature": 1.0}, False), ({"top_k": 3}, True),
        ({"top_p": 0.9}, True), ({"typical_p": 0.5}, True), ({"repetition_penalty": 1.3}, False),
        ({"frequency_penalty": 0.5}, False), ({"do_sample": True}, True), ({}, False),
    ],
)
def test_any_non_default_warper_turns_sampling_on(parameters, is_sampling):
    assert validate({"inputs": "hi", "parameters": parameters}).sampling.do_sample is is_sampling


def test_sampling_values_are_passed_on_with_tgi_defaults():
    sampling = validate({"inputs": "hi", "parameters": {
        "temperature": 0.5, "top_k": 7, "top_p": 0.25, "typical_p": 0.5, "repetition_penalty": 1.5,
        "frequency_penalty": -0.5, "seed": 42,
    }}).sampling
    assert (sampling.temperature, sampling.top_k, sampling.top_p, sampling.typical_p) == (0.5, 7, 0.25, 0.5)
    assert (sampling.repetition_penalty, sampling.frequency_penalty, sampling.seed) == (1.5, -0.5, 42)
    defaults = validate({"inputs": "hi", "parameters": {}}).sampling
    assert (defaults.temperature, defaults.top_k, defaults.top_p, defaults.typical_p) == (1.0, 0, 1.0, 1.0)
    assert (defaults.repetition_penalty, defaults.frequency_penalty) == (1.0, 0.0)


def test_integer_json_numbers_are_accepted_for_floats():
    assert validate({"inputs": "hi", "parameters": {"temperature": 2}}).sampling.temperature == 2.0


def test_max_new_tokens_defaults_to_the_remaining_budget():
    assert validate({"inputs": "hi", "parameters": {}}, num_input_tokens=6).max_new_tokens == 10


def test_length_check_counts_at_most_1024_new_tokens_and_the_engine_gets_what_fits():
    # TGI generates 1024 tokens at a time and re-queues, so only the first 1024 must fit.
    config = ValidationConfig(max_best_of=2, max_stop_sequences=4, max_top_n_tokens=5,
                              max_input_tokens=4000, max_total_tokens=4096)
    assert validate({"inputs": "hi", "parameters": {"max_new_tokens": 5000}}, 10, config=config).max_new_tokens == 4086
    assert validate({"inputs": "hi", "parameters": {"max_new_tokens": 500}}, 10, config=config).max_new_tokens == 500
    message = rejection({"inputs": "hi", "parameters": {"max_new_tokens": 2000}}, num_input_tokens=3500, config=config)
    assert message.endswith("Given: 3500 `inputs` tokens and 1024 `max_new_tokens`")


def test_truncate_keeps_the_last_tokens():
    valid = validate({"inputs": "hi", "parameters": {"truncate": 2, "max_new_tokens": 1}}, num_input_tokens=3)
    assert valid.input_ids == [101, 102]
    assert validate({"inputs": "hi", "parameters": {"truncate": 9}}, num_input_tokens=3).input_ids == [100, 101, 102]


def test_truncation_happens_before_the_length_checks():
    valid = validate({"inputs": "hi", "parameters": {"truncate": 4}}, num_input_tokens=30)
    assert len(valid.input_ids) == 4 and valid.max_new_tokens == 12


def test_seed_is_random_when_absent_and_kept_when_given():
    given = validate({"inputs": "hi", "parameters": {"seed": 2**64 - 1}})
    assert given.sampling.seed == 2**64 - 1 and given.is_seed_given
    drawn = [validate({"inputs": "hi", "parameters": {"do_sample": True}}) for _ in range(5)]
    assert len({valid.sampling.seed for valid in drawn}) == 5
    assert all(0 <= valid.sampling.seed < 2**64 and not valid.is_seed_given for valid in drawn)


def test_valid_request_defaults():
    valid = validate({"inputs": "hi", "parameters": {}})
    assert (valid.inputs, valid.input_ids) == ("hi", [100, 101, 102])
    assert valid.stop == () and valid.top_n_tokens == 0 and valid.best_of == 1
    assert not (valid.details or valid.decoder_input_details or valid.return_full_text or valid.watermark)


def test_valid_request_carries_the_flags_given():
    valid = validate({"inputs": "hi", "parameters": {
        "stop": ["\n", "END"], "top_n_tokens": 5, "details": True, "decoder_input_details": True,
        "return_full_text": True, "best_of": 1,
    }})
    assert valid.stop == ("\n", "END") and valid.top_n_tokens == 5
    assert valid.details and valid.decoder_input_details and valid.return_full_text and valid.best_of == 1


def test_ignore_eos_is_off_by_default_and_carried_when_given():
    assert validate({"inputs": "hi", "parameters": {}}).ignore_eos is False
    assert validate({"inputs": "hi", "parameters": {"ignore_eos": True}}).ignore_eos is True


def test_return_full_text_defaults_per_route():
    assert validate({"inputs": "hi"}, default_return_full_text=True).return_full_text is True
    body = {"inputs": "hi", "parameters": {"return_full_text": False}}
    assert validate(body, default_return_full_text=True).return_full_text is False


def test_best_of_zero_is_taken_as_one_outside_streams_as_in_tgi():
    assert validate({"inputs": "hi", "parameters": {"best_of": 0}}).best_of == 1


def test_best_of_with_sampling_is_accepted_up_to_the_maximum():
    assert validate({"inputs": "hi", "parameters": {"best_of": 2, **SAMPLED}}).best_of == 2


BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


@pytest.mark.parametrize("parameter", [p for p in PARAMETERS if set(p.schema) & set(BOUNDS)], ids=lambda p: p.name)
def test_each_documented_bound_is_the_one_validation_enforces(parameter):
    """The table's bounds (the OpenAPI document's) accept the value at or inside the bound, and refuse
    the first one outside it with a message naming the parameter."""
    step = 1 if parameter.kind == "integer" else 1e-3
    sampled = {} if parameter.name in ("best_of", "seed") else SAMPLED
    for bound, edge in parameter.schema.items():
        if bound not in BOUNDS:
            continue
        inside, outside = {"minimum": (edge, edge - step), "maximum": (edge, edge + step),
                           "exclusiveMinimum": (edge + step, edge), "exclusiveMaximum": (edge - step, edge)}[bound]
        request = parse_generate_request({"inputs": "hi", "parameters": {**sampled, parameter.name: inside}})
        validate_parameters(request.parameters, dataclasses.replace(CONFIG, max_input_tokens=2**64), is_stream=False)
        with pytest.raises(ValidationError, match=f"`{parameter.name}`"):
            request = parse_generate_request({"inputs": "hi", "parameters": {**sampled, parameter.name: outside}})
            validate_parameters(request.parameters, CONFIG)
            validate_inputs(request, CONFIG)


def test_the_parameter_table_names_every_generate_parameter():
    assert [f.name for f in dataclasses.fields(GenerateParameters)] == [p.name for p in PARAMETERS]

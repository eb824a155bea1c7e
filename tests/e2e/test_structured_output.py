"""Constrained decoding through HTTP on the real SmolLM2-135M-Instruct: TGI's `grammar` parameter
(JSON schema, regex), checked against independent oracles (the `jsonschema` validator, Python's `re`),
through raw HTTP and the unmodified `text-generation` client."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import jsonschema
import pytest
from server_helpers import running_server

pytestmark = pytest.mark.slow

SCHEMAS = {
    "nested objects, required fields": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                          "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"], "additionalProperties": False},
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "enums and bounded numbers": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["color", "age", "score"],
        "additionalProperties": False,
    },
    "arrays": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 10},
                                "minItems": 1, "maxItems": 3},
                       "done": {"type": "boolean"}},
        "required": ["tags", "done"],
        "additionalProperties": False,
    },
}
PROMPT = "<|im_start|>user\nDescribe a person as JSON.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def server(smollm2_gguf, hf_home):
    with running_server(str(smollm2_gguf), hf_home, "--max-batch-prefill-tokens", "512", "--max-total-tokens", "1024") as server:
        yield server


async def generate(url: str, inputs: str, max_new_tokens: int, grammar: dict | None = None) -> tuple[int, dict]:
    parameters = {"max_new_tokens": max_new_tokens, "details": True}
    if grammar is not None:
        parameters["grammar"] = grammar
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/generate", json={"inputs": inputs, "parameters": parameters}) as response:
            return response.status, await response.json()


@pytest.mark.parametrize("name", SCHEMAS)
async def test_json_schema_grammar_output_parses_and_validates(server, name):
    schema = SCHEMAS[name]
    status, body = await generate(server.url, PROMPT, 200, {"type": "json", "value": schema})
    assert status == 200, body
    assert body["details"]["finish_reason"] == "eos_token", body  # the grammar completed
    parsed = json.loads(body["generated_text"])
    jsonschema.validate(parsed, schema)
    assert list(parsed) == [key for key in schema["properties"] if key in parsed]  # the schema's order


async def test_regex_grammar_output_matches(server):
    pattern = r"(Mon|Tue|Wed) [0-2][0-9]:[0-5][0-9] (am|pm)"
    status, body = await generate(server.url, "When shall we meet?", 30, {"type": "regex", "value": pattern})
    assert status == 200, body
    assert re.fullmatch(pattern, body["generated_text"]), body["generated_text"]


async def test_constrained_and_unconstrained_requests_in_one_batch_each_get_what_they_get_alone(server):
    grammar = {"type": "json", "value": SCHEMAS["enums and bounded numbers"]}
    alone = [await generate(server.url, PROMPT, 40, grammar), await generate(server.url, "The capital of France is", 40)]
    together = await asyncio.gather(*(
        generate(server.url, PROMPT, 40, grammar) if i % 2 == 0 else generate(server.url, "The capital of France is", 40)
        for i in range(6)
    ))
    for i, (status, body) in enumerate(together):
        assert status == 200
        assert body["generated_text"] == alone[i % 2][1]["generated_text"]
    assert alone[0][1]["generated_text"] != alone[1][1]["generated_text"]


async def test_a_grammar_cut_short_by_max_new_tokens_ends_with_length(server):
    status, body = await generate(server.url, PROMPT, 5, {"type": "json", "value": SCHEMAS["arrays"]})
    assert status == 200 and body["details"]["finish_reason"] == "length"
    assert body["generated_text"].startswith("{")


@pytest.mark.parametrize("grammar, message", [
    ({"type": "regex", "value": "(ab"}, "invalid regex grammar"),
    ({"type": "json", "value": {"type": "objekt"}}, "invalid JSON schema grammar"),
    ({"type": "xml", "value": "<a/>"}, "grammar `type` must be one of json, json_schema, regex"),
])
async def test_a_grammar_that_does_not_compile_gets_422_naming_the_problem(server, grammar, message):
    status, body = await generate(server.url, "Hi", 5, grammar)
    assert status == 422 and body["error_type"] == "validation"
    assert message in body["error"]


async def test_text_generation_client_grammar_works_unchanged(server):
    from text_generation import AsyncClient
    from text_generation.types import Grammar, GrammarType

    client = AsyncClient(server.url)
    schema = SCHEMAS["enums and bounded numbers"]
    response = await client.generate(PROMPT, max_new_tokens=100, grammar=Grammar(type=GrammarType.Json, value=schema))
    jsonschema.validate(json.loads(response.generated_text), schema)
    streamed = [r async for r in client.generate_stream(PROMPT, max_new_tokens=100,
                                                        grammar=Grammar(type=GrammarType.Json, value=schema))]
    assert streamed[-1].generated_text == response.generated_text


async def test_openai_json_object_response_format_gives_a_json_object(server):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=server.url + "/v1", api_key="-")
    completion = await client.chat.completions.create(
        model="tgi", messages=[{"role": "user", "content": 'Return JSON with the keys "city" and "country" for Paris.'}],
        response_format={"type": "json_object"}, max_tokens=150, temperature=0,
    )
    assert completion.choices[0].finish_reason == "stop"
    assert json.loads(completion.choices[0].message.content) == {"city": "Paris", "country": "France"}


async def test_openai_client_parse_with_a_pydantic_model_works_unchanged(server):
    from typing import Literal

    from openai import AsyncOpenAI
    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        name: str = Field(max_length=20)
        species: Literal["cat", "dog", "bird"]
        age: int

    client = AsyncOpenAI(base_url=server.url + "/v1", api_key="-")
    completion = await client.beta.chat.completions.parse(
        model="tgi", messages=[{"role": "user", "content": "Describe a pet."}], response_format=Pet,
        max_tokens=100, temperature=0,
    )
    pet = completion.choices[0].message.parsed
    assert isinstance(pet, Pet) and pet.species in ("cat", "dog", "bird")


async def test_an_unknown_response_format_gets_422(server):
    body = {"model": "tgi", "messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": "yaml"}}
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/v1/chat/completions", json=body) as response:
            status, error = response.status, await response.json()
    assert status == 422 and "`response_format.type` must be one of" in error["error"]


async def test_huggingface_hub_inference_client_response_format_works_unchanged(server):
    from huggingface_hub import AsyncInferenceClient

    client = AsyncInferenceClient(base_url=server.url)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "country": {"type": "string", "maxLength": 20}},
              "required": ["city", "country"], "additionalProperties": False}
    output = await client.chat_completion(
        [{"role": "user", "content": "Where is the Eiffel Tower? Answer in JSON."}],
        response_format={"type": "json", "value": schema}, max_tokens=60, temperature=0,
    )
    jsonschema.validate(json.loads(output.choices[0].message.content), schema)


async def test_ignore_eos_runs_a_completed_grammar_to_max_new_tokens_on_end_of_sequence_tokens(server):
    """Benchmarks' fixed output lengths: past the grammar's end only end-of-sequence tokens come."""
    async with aiohttp.ClientSession() as session:
        body = {"inputs": "Is Paris in France?", "parameters": {
            "max_new_tokens": 6, "ignore_eos": True, "details": True, "grammar": {"type": "regex", "value": "(yes|no)"}}}
        async with session.post(server.url + "/generate", json=body) as response:
            payload = await response.json()
    assert payload["generated_text"] in ("yes", "no")  # the end-of-sequence tokens are special: not in the text
    assert payload["details"]["generated_tokens"] == 6 and payload["details"]["finish_reason"] == "length"


async def test_two_tensor_parallel_shards_sample_under_the_grammar_as_one_does(tmp_path, hf_home, smollm2_tokenizer_dir):
    """Every rank gets the step's masks (they follow the step): a tiny random Llama's constrained
    greedy output is the same on one shard and on two, and matches the regex."""
    from server_helpers import save_tiny_model, tiny_config

    model = save_tiny_model(tiny_config("llama"), smollm2_tokenizer_dir, tmp_path / "llama")
    grammar = {"type": "regex", "value": r"[a-z]{3,8}( [a-z]{2,8}){2,5}\."}
    outputs = []
    for num_shard in (1, 2):
        with running_server(str(model), hf_home, "--max-total-tokens", "256", num_shard=num_shard) as server:
            status, body = await generate(server.url, "Say something.", 40, grammar)
            assert status == 200, body
            outputs.append(body["generated_text"])
    assert re.fullmatch(grammar["value"], outputs[0]) and outputs[0] == outputs[1]

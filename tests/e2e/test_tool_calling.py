"""OpenAI tool calling through HTTP on the real SmolLM2-135M-Instruct, whose chat template knows no
tools (they reach it in a system message asking for Hermes-format calls): `tool_choice` required, a
named function, auto and none; full responses and streams through the unmodified `openai` and
`huggingface_hub` clients; arguments checked with the `jsonschema` validator against the tool's own
parameter schema."""

from __future__ import annotations

import json

import aiohttp
import jsonschema
import pytest
from server_helpers import running_server

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "Adds two integers", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(smollm2_gguf, hf_home):
    with running_server(str(smollm2_gguf), hf_home, "--max-batch-prefill-tokens", "1024", "--max-total-tokens", "2048") as server:
        yield server


def openai_client(server):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=server.url + "/v1", api_key="-")


async def post_chat(server, **body) -> tuple[int, dict]:
    body = {"model": "tgi", "messages": WEATHER_QUESTION, "max_tokens": 100, "temperature": 0, **body}
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/v1/chat/completions", json=body) as response:
            return response.status, await response.json()


def assert_valid_calls(tool_calls, names=tuple(SCHEMAS)) -> None:
    assert tool_calls
    for call in tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({call.id for call in tool_calls}) == len(tool_calls)


async def test_required_tool_choice_yields_a_call_that_follows_the_tools_schema(server):
    completion = await openai_client(server).chat.completions.create(
        model="tgi", messages=WEATHER_QUESTION, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        max_tokens=100, temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    assert_valid_calls(choice.message.tool_calls)


async def test_a_named_tool_choice_calls_that_function(server):
    completion = await openai_client(server).chat.completions.create(
        model="tgi", messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}}, parallel_tool_calls=False,
        max_tokens=100, temperature=0,
    )
    (call,) = completion.choices[0].message.tool_calls
    assert call.function.name == "add"
    assert_valid_calls([call], ["add"])


async def test_parallel_calls_are_each_a_valid_call(server):
    """With parallel calls allowed (OpenAI's default) the grammar takes one call after another."""
    completion = await openai_client(server).chat.completions.create(
        model="tgi", messages=WEATHER_QUESTION, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=0,
    )
    choice = completion.choices[0]
    complete = choice.message.tool_calls if choice.finish_reason == "tool_calls" else choice.message.tool_calls[:-1]
    assert choice.finish_reason in ("tool_calls", "length") and complete
    assert_valid_calls(complete)


async def test_auto_answers_in_plain_text_when_no_tool_fits(server):
    completion = await openai_client(server).chat.completions.create(
        model="tgi", messages=[{"role": "user", "content": "Write a haiku about the sea."}], tools=TOOLS,
        tool_choice="auto", max_tokens=60, temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert "sea" in choice.message.content.lower()


async def test_none_renders_the_prompt_without_the_tools(server):
    async with aiohttp.ClientSession() as session:
        prompts = []
        for extra in ({}, {"tools": TOOLS, "tool_choice": "none"}, {"tools": TOOLS}):
            body = {"model": "tgi", "messages": WEATHER_QUESTION, **extra}
            async with session.post(server.url + "/chat_tokenize", json=body) as response:
                prompts.append((await response.json())["templated_text"])
    assert prompts[0] == prompts[1] and "get_weather" not in prompts[1]
    assert "get_weather" in prompts[2] and "<tool_call>" in prompts[2]


async def test_streamed_tool_calls_arrive_as_openai_deltas_name_first_then_argument_fragments(server):
    request = dict(model="tgi", messages=WEATHER_QUESTION, tools=TOOLS, tool_choice="required",
                   parallel_tool_calls=False, max_tokens=100, temperature=0)
    client = openai_client(server)
    whole = (await client.chat.completions.create(**request)).choices[0].message.tool_calls[0]
    deltas, finish_reasons = [], []
    async for chunk in await client.chat.completions.create(**request, stream=True):
        deltas += chunk.choices[0].delta.tool_calls or []
        finish_reasons.append(chunk.choices[0].finish_reason)
    first, rest = deltas[0], deltas[1:]
    assert first.index == 0 and first.id.startswith("call_") and first.function.name == "get_weather"
    assert len(rest) > 3 and all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    arguments = first.function.arguments + "".join(d.function.arguments for d in rest)
    assert json.loads(arguments) == json.loads(whole.function.arguments)
    assert finish_reasons[-1] == "tool_calls" and set(finish_reasons[:-1]) == {None}


async def test_the_openai_stream_helper_and_pydantic_function_tools_work_unchanged(server):
    import openai
    from pydantic import BaseModel

    class Add(BaseModel):
        a: int
        b: int

    client = openai_client(server)
    request = dict(model="tgi", messages=[{"role": "user", "content": "Add 2 and 3."}],
                   tools=[openai.pydantic_function_tool(Add)], tool_choice="required", parallel_tool_calls=False,
                   max_tokens=60, temperature=0)
    async with client.chat.completions.stream(**request) as stream:
        final = await stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert call.function.name == "Add" and isinstance(call.function.parsed_arguments, Add)
    parsed = await client.chat.completions.parse(**request)
    assert parsed.choices[0].message.tool_calls[0].function.parsed_arguments == call.function.parsed_arguments


async def test_huggingface_hub_inference_client_tools_work_unchanged(server):
    from huggingface_hub import AsyncInferenceClient

    output = await AsyncInferenceClient(base_url=server.url).chat_completion(
        WEATHER_QUESTION, tools=TOOLS, tool_choice="required", max_tokens=100, temperature=0,
    )
    calls = output.choices[0].message.tool_calls
    assert calls and calls[0].function.name in SCHEMAS
    jsonschema.validate(json.loads(calls[0].function.arguments), SCHEMAS[calls[0].function.name])


async def test_a_conversation_with_a_tool_result_puts_the_call_and_the_result_in_the_prompt(server):
    messages = WEATHER_QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]
    async with aiohttp.ClientSession() as session:
        body = {"model": "tgi", "messages": messages, "tools": TOOLS}
        async with session.post(server.url + "/chat_tokenize", json=body) as response:
            prompt = (await response.json())["templated_text"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>' in prompt
    assert "<tool_response>\n18 degrees, sunny\n</tool_response>" in prompt
    status, body = await post_chat(server, messages=messages, tools=TOOLS, max_tokens=30)
    assert status == 200 and body["choices"][0]["message"]["content"], body


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"tool_choice": {"type": "function", "function": {"name": "fly"}}}, "names `fly`, which is not among the tools"),
        ({"tool_choice": "sometimes"}, "`tool_choice` must be one of none, auto, required"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "x": {"type": "integer", "minimum": 5, "maximum": 1}}, "required": ["x"]}}}]}, "invalid tool-call grammar"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "must be a JSON schema object"),
        ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "`tools[0].function.name` must be"),
        ({"tools": TOOLS[:1] * 2}, "names a function twice"),
        ({"tools": None, "tool_choice": "required"}, "only allowed when `tools` are given"),
        ({"response_format": {"type": "json_object"}}, "cannot be combined with `tools`"),
        ({"parallel_tool_calls": "yes"}, "`parallel_tool_calls` must be a boolean"),
    ],
)
async def test_bad_tools_get_422_naming_the_problem(server, fields, message):
    status, body = await post_chat(server, **{"tools": TOOLS, **fields})
    assert status == 422 and message in body["error"], body
    assert body["error_type"] == "validation"

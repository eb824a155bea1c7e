"""A tiny random Qwen3 with Qwen3's real tokenizer and chat template, through HTTP: thoughts split into
`reasoning_content` (the output forced by a regex `response_format`, since random weights think
nothing), `chat_template_kwargs` reaching the template, and a required tool call written with Qwen3's
own `<tool_call>` tokens (added tokens the grammar names by id)."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import jsonschema
import pytest
from server_helpers import running_server, save_tiny_model, tiny_config

pytestmark = pytest.mark.slow

QWEN3_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tokenizers" / "qwen3"
THOUGHT_AND_ANSWER = "<think>\nTwo and two make four.\n</think>\n\nFour."
QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, hf_home):
    config = tiny_config("qwen3", vocab_size=151936, bos_token_id=None, eos_token_id=151645)
    model_dir = save_tiny_model(config, QWEN3_TOKENIZER, tmp_path_factory.mktemp("qwen3-thinking"))
    with running_server(str(model_dir), hf_home, "--max-batch-prefill-tokens", "1024", "--max-total-tokens", "2048") as server:
        yield server


async def post(server, path: str, **body) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + path, json={"model": "tgi", "messages": QUESTION, **body}) as response:
            return response.status, await response.json()


def forced(text: str) -> dict:
    return {"type": "regex", "value": text.replace(".", r"\.").replace("+", r"\+")}


async def test_thoughts_come_as_reasoning_content_apart_from_the_answer(server):
    status, body = await post(server, "/v1/chat/completions", response_format=forced(THOUGHT_AND_ANSWER), max_tokens=60)
    assert status == 200, body
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] == "\nTwo and two make four.\n"
    assert message["content"] == "Four."


async def test_streamed_thoughts_come_before_the_answer_and_add_up_to_the_full_response(server):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=server.url + "/v1", api_key="-")
    chunks = [chunk async for chunk in await client.chat.completions.create(
        model="tgi", messages=QUESTION, response_format=forced(THOUGHT_AND_ANSWER), max_tokens=60, stream=True)]
    deltas = [chunk.choices[0].delta for chunk in chunks]
    reasoning = [d.model_extra.get("reasoning_content") or "" for d in deltas]
    content = [d.content or "" for d in deltas]
    assert "".join(reasoning) == "\nTwo and two make four.\n" and "".join(content) == "Four."
    last_thought = max(i for i, text in enumerate(reasoning) if text)
    assert all(not text for text in content[: last_thought + 1])  # no answer before the thoughts end


async def test_chat_template_kwargs_reach_the_template(server):
    _, thinking = await post(server, "/chat_tokenize")
    _, quiet = await post(server, "/chat_tokenize", chat_template_kwargs={"enable_thinking": False})
    assert "<think>" not in thinking["templated_text"]
    assert quiet["templated_text"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    status, body = await post(server, "/v1/chat/completions", chat_template_kwargs={"messages": []})
    assert status == 422 and "cannot set `messages`" in body["error"]


async def test_a_required_tool_call_uses_qwen3s_own_tool_call_tokens(server):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
              "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": schema}}]
    status, body = await post(server, "/v1/chat/completions", tools=tools, tool_choice="required",
                              parallel_tool_calls=False, max_tokens=80, temperature=0, logprobs=True)
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    (call,) = choice["message"]["tool_calls"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
    tokens = [entry["token"] for entry in choice["logprobs"]["content"]]
    assert tokens[0] == "<tool_call>" and "</tool_call>" in tokens  # one token each, as Qwen3 writes them

"""The real trained model (SmolLM2-135M-Instruct GGUF) served through the launcher, over HTTP."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from server_helpers import running_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_server(hf_home, smollm2_gguf, smollm2_tokenizer_dir):
    with running_server(str(smollm2_gguf), hf_home, "--max-batch-prefill-tokens", "512") as server:
        yield server


async def post(session, url, body):
    async with session.post(url, json=body) as response:
        return response.status, await response.json()


async def test_generate_answers_paris_for_the_capital_of_france(smollm2_server):
    body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 8}}
    async with aiohttp.ClientSession() as session:
        status, payload = await post(session, smollm2_server.url + "/generate", body)
    assert status == 200
    assert "Paris" in payload["generated_text"]


async def test_fp8_weights_and_kv_cache_still_answer_paris_also_from_a_cached_prefix(hf_home, smollm2_gguf, smollm2_tokenizer_dir):
    """`--quantize fp8` and `--kv-cache-dtype fp8_e4m3fn` (TGI's flags) through launcher, shard and the
    portable path; the same question again starts from its first block of fp8 KV, cached."""
    prompt = "Here is a question about geography, answered in one word by a helpful assistant. The capital of France is"
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 8, "details": True}}
    with running_server(str(smollm2_gguf), hf_home, "--kv-cache-dtype", "fp8_e4m3fn", "--quantize", "fp8",
                        "--max-batch-prefill-tokens", "512", "--max-total-tokens", "1024") as server:
        async with aiohttp.ClientSession() as session:
            answers = [await post(session, server.url + "/generate", body) for _ in range(2)]
            async with session.get(server.url + "/info") as response:
                info = await response.json()
    assert [status for status, _ in answers] == [200, 200]
    assert all("Paris" in payload["generated_text"] for _, payload in answers)
    assert [payload["details"]["cached_tokens"] for _, payload in answers] == [0, 16]
    assert info["kv_cache_dtype"] == "float8_e4m3fn" and info["model_dtype"] == "float32" and info["quantize"] == "fp8"


async def test_generate_stream_sends_tgi_events_ending_with_the_full_text(smollm2_server):
    body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 6, "details": True}}
    async with aiohttp.ClientSession() as session:
        async with session.post(smollm2_server.url + "/generate_stream", json=body) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            raw = await response.text()
    events = [json.loads(line[len("data:"):]) for line in raw.splitlines() if line.startswith("data:")]
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["generated_text"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert events[-1]["details"]["finish_reason"] in ("length", "eos_token")
    assert events[-1]["details"]["generated_tokens"] == len(events)


async def test_stop_sequence_ends_generation_and_is_kept_in_the_text(smollm2_server):
    body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 20, "stop": ["Paris"], "details": True}}
    async with aiohttp.ClientSession() as session:
        status, payload = await post(session, smollm2_server.url + "/generate", body)
    assert status == 200
    assert payload["generated_text"].endswith("Paris")
    assert payload["details"]["finish_reason"] == "stop_sequence"


async def test_same_seed_gives_same_text_alone_and_inside_a_busy_batch(smollm2_server):
    sampled = {"inputs": "Write a short poem about the sea.", "parameters": {
        "max_new_tokens": 16, "do_sample": True, "temperature": 0.9, "seed": 42}}
    url = smollm2_server.url + "/generate"
    async with aiohttp.ClientSession() as session:
        _, alone = await post(session, url, sampled)
        noise = [
            post(session, url, {"inputs": f"Tell me a fact about the number {i}.", "parameters": {
                "max_new_tokens": 24, "do_sample": True, "seed": i}})
            for i in range(5)
        ]
        results = await asyncio.gather(post(session, url, sampled), *noise)
    assert results[0][1]["generated_text"] == alone["generated_text"]


async def test_info_reports_the_model_and_limits(smollm2_server):
    async with aiohttp.ClientSession() as session:
        async with session.get(smollm2_server.url + "/info") as response:
            info = await response.json()
    assert info["model_id"] == "SmolLM2-135M-Instruct"  # the GGUF's model name, not its path
    assert info["max_input_tokens"] < info["max_total_tokens"]
    assert info["router"] == "text-generation-router"


def sse_payloads(raw: str) -> list[str]:
    return [line[len("data:"):].strip() for line in raw.splitlines() if line.startswith("data:")]


async def test_container_readme_chat_stream_curl_works_verbatim(smollm2_server):
    body = {"model": "tgi", "messages": [{"role": "user", "content": "What is deep learning?"}],
            "stream": True, "max_tokens": 128}
    async with aiohttp.ClientSession() as session:
        async with session.post(smollm2_server.url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
            payloads = sse_payloads(await response.text())
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    # Sampled without a seed (the README's request verbatim): the text is not fixed, its shape is.
    assert text.strip() and len(chunks) > 2
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


async def test_container_readme_generate_curl_works_verbatim(smollm2_server):
    body = {"inputs": "What is Deep Learning?", "parameters": {"temperature": 0.2, "top_p": 0.95, "max_new_tokens": 256}}
    async with aiohttp.ClientSession() as session:
        status, payload = await post(session, smollm2_server.url + "/generate", body)
    # Sampled with a random seed: the text varies (it may even end at once), the contract does not.
    assert status == 200
    assert isinstance(payload["generated_text"], str)


async def test_chat_completion_answers_with_usage_and_logprobs(smollm2_server):
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 12,
            "temperature": 0, "logprobs": True, "top_logprobs": 2}
    async with aiohttp.ClientSession() as session:
        status, payload = await post(session, smollm2_server.url + "/v1/chat/completions", body)
    assert status == 200
    choice = payload["choices"][0]
    assert "Paris" in choice["message"]["content"]
    assert len(choice["logprobs"]["content"]) == payload["usage"]["completion_tokens"]
    assert all(len(entry["top_logprobs"]) == 2 for entry in choice["logprobs"]["content"])


async def test_completions_answer_every_prompt_of_a_list(smollm2_server):
    body = {"model": "any-name", "prompt": ["The capital of France is", "1, 2, 3,"], "max_tokens": 5, "temperature": 0}
    async with aiohttp.ClientSession() as session:
        status, payload = await post(session, smollm2_server.url + "/v1/completions", body)
        async with session.get(smollm2_server.url + "/v1/models") as response:
            models = await response.json()
    assert status == 200
    assert payload["model"] == "any-name"
    assert [c["index"] for c in payload["choices"]] == [0, 1]
    assert "Paris" in payload["choices"][0]["text"]
    assert models["data"][0]["id"] == "SmolLM2-135M-Instruct"

"""Speculative decoding changes nothing a client sees: proposals verified in the same forward, from
n-gram lookup (`--speculate 3`) or from a draft model (`--speculative-model`, here a perturbed copy of
the model, so its proposals are often but not always right). The same requests against a server
without speculation and one with it (a tiny random Llama, one shard and two) give the same tokens:
greedy, seeded sampling with penalties, stop sequences and max_new_tokens cut exactly, one stream event
per token; /metrics shows proposals made and accepted. (SmolLM2 with speculation against transformers,
proposals kept and rejected: test_other_models_match_transformers.py.)"""

from __future__ import annotations

import asyncio
import json
import re
import shutil

import aiohttp
import pytest
from server_helpers import PROMPTS, running_server, save_tiny_model, tiny_config

SPECULATE = ("--speculate", "3")
SMALL_CACHE = ("--max-batch-prefill-tokens", "256", "--max-batch-total-tokens", "8192")
# The tiny model's greedy answer to this falls into a 5-token cycle after ~24 tokens, where n-gram
# proposals are right: 40 tokens exercise accepted proposals as well as rejected ones.
REPEATING = "one two three four one two three four one two three four one two"
REQUESTS = [
    *({"inputs": prompt, "parameters": {"max_new_tokens": 16, "details": True}} for prompt in PROMPTS),
    {"inputs": REPEATING, "parameters": {"max_new_tokens": 40, "details": True}},
    {"inputs": REPEATING, "parameters": {"max_new_tokens": 24, "details": True, "do_sample": True, "seed": 11,
                                         "temperature": 1.3, "top_k": 40, "repetition_penalty": 1.2}},
    {"inputs": PROMPTS[3], "parameters": {"max_new_tokens": 24, "details": True, "do_sample": True, "seed": 5}},
    {"inputs": REPEATING, "parameters": {"max_new_tokens": 7, "details": True}},
]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smollm2_tokenizer_dir):
    return save_tiny_model(tiny_config("llama"), smollm2_tokenizer_dir, tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def tiny_draft(tiny_llama, tmp_path_factory):
    """The tiny Llama with noise on every weight: a draft model that agrees with it often, not always."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * parameter.std() * 0.5)
    path = tmp_path_factory.mktemp("tiny") / "draft"
    model.save_pretrained(path)
    for tokenizer_file in tiny_llama.glob("tokenizer*"):  # the same tokenizer, as a real draft model has
        shutil.copy(tokenizer_file, path)
    return path


async def _generate_all(url: str, requests: list[dict]) -> list[dict]:
    async with aiohttp.ClientSession() as session:

        async def one(body):
            async with session.post(url + "/generate", json=body) as response:
                assert response.status == 200, await response.text()
                return await response.json()

        return await asyncio.gather(*(one(body) for body in requests))  # a batch of them, as a server sees


async def _stream_tokens(url: str, body: dict) -> list[int]:
    async with aiohttp.ClientSession() as session, session.post(url + "/generate_stream", json=body) as response:
        text = await response.text()
    return [json.loads(line[5:])["token"]["id"] for line in text.splitlines() if line.startswith("data:")]


async def _metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        text = await response.text()
    return sum(float(value) for value in re.findall(rf"^{name}_total{{[^}}]*}} (\S+)$", text, re.M))


@pytest.fixture(scope="module")
def plain_answers(tiny_llama, hf_home):
    """The answers of a server without speculation (and its stream of the repeating prompt)."""

    async def ask(url):
        answers = await _generate_all(url, REQUESTS + _stop_requests(await _generate_all(url, REQUESTS)))
        return answers, await _stream_tokens(url, REQUESTS[len(PROMPTS)])

    with running_server(str(tiny_llama), hf_home, *SMALL_CACHE) as server:
        return asyncio.run(ask(server.url))


def _stop_requests(answers: list[dict]) -> list[dict]:
    """The greedy requests again, each stopped by a piece of its own answer's middle."""
    stops = []
    for body, answer in zip(REQUESTS[: len(PROMPTS) + 1], answers):
        text = answer["generated_text"]
        if len(text.strip()) > 6:
            middle = text[len(text) // 2 : len(text) // 2 + 3]
            stops.append({**body, "parameters": {**body["parameters"], "stop": [middle]}})
    return stops


@pytest.mark.parametrize("num_shard", [1, 2])
@pytest.mark.parametrize("proposer", ["ngram", "draft-model"])
async def test_speculation_changes_no_token_greedy_seeded_stopped_or_streamed(
        tiny_llama, tiny_draft, hf_home, plain_answers, proposer, num_shard):
    expected, expected_stream = plain_answers
    args = SPECULATE if proposer == "ngram" else ("--speculative-model", str(tiny_draft))
    with running_server(str(tiny_llama), hf_home, *SMALL_CACHE, *args, num_shard=num_shard) as server:
        first = await _generate_all(server.url, REQUESTS)
        answers = await _generate_all(server.url, REQUESTS + _stop_requests(first))
        streamed = await _stream_tokens(server.url, REQUESTS[len(PROMPTS)])
        proposed = await _metric(server.url, "tgi_speculative_proposed_tokens")
        accepted = await _metric(server.url, "tgi_speculative_accepted_tokens")
        async with aiohttp.ClientSession() as session, session.get(server.url + "/info") as response:
            info = await response.json()
    for body, ours, theirs in zip(REQUESTS + _stop_requests(first), answers, expected, strict=True):
        assert [t["id"] for t in ours["details"]["tokens"]] == [t["id"] for t in theirs["details"]["tokens"]], body
        assert (ours["generated_text"], ours["details"]["finish_reason"]) == (theirs["generated_text"], theirs["details"]["finish_reason"])
    assert streamed == expected_stream and len(streamed) == REQUESTS[len(PROMPTS)]["parameters"]["max_new_tokens"]
    assert info["speculate"] == 3
    assert info["speculative_model"] == (None if proposer == "ngram" else "LlamaForCausalLM")
    assert proposed >= accepted > 0  # (rejections through HTTP: SmolLM2's test; in the shard: test_model_runner.py)
    if proposer == "draft-model":
        assert accepted < proposed

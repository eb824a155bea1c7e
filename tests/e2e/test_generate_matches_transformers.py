"""Greedy generation through HTTP equals HF transformers `generate()` token for token (fp32, CPU)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from server_helpers import running_server, save_tiny_model, tiny_config

PROMPTS = [
    "Hello",
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away, there lived a dragon who",
    "1, 2, 3, 4, 5,",
    "Translate to French: I would like a cup of coffee, please. Also, where is the train station?",
]
MAX_NEW_TOKENS = 12


async def generate_all(url: str, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    async with aiohttp.ClientSession() as session:

        async def one(prompt):
            body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": True}}
            async with session.post(url + "/generate", json=body) as response:
                assert response.status == 200, await response.text()
                payload = await response.json()
                return [token["id"] for token in payload["details"]["tokens"]]

        return await asyncio.gather(*(one(p) for p in prompts))


def transformers_greedy(model, tokenizer_dir, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """HF's greedy continuation of each prompt, tokenized with the model's own tokenizer.json (HF may
    pick a tokenizer class by model type whose pre-processing differs from the file)."""
    import torch
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    outputs = []
    for prompt in prompts:
        input_ids = torch.tensor([tokenizer.encode(prompt).ids])
        with torch.no_grad():
            generated = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False)
        outputs.append(generated[0, input_ids.shape[1]:].tolist())
    return outputs


def assert_same_tokens(ours: list[list[int]], theirs: list[list[int]]) -> None:
    for prompt, a, b in zip(PROMPTS, ours, theirs):
        assert a == b, f"prompt {prompt!r}: ours {a} != transformers {b}"


# gemma3_multimodal: a Gemma3ForConditionalGeneration checkpoint, served text-only (its language model)
FAMILIES = ["llama", "qwen2", "qwen3", "phi3", "mixtral", "qwen3_moe", "gemma", "gemma2", "gemma3", "gemma3_multimodal"]
FALLBACKS = ["gpt_neox", "opt"]  # transformers' own classes over our paged KV cache


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, smollm2_tokenizer_dir):
    root = tmp_path_factory.mktemp("tiny")
    return {family: save_tiny_model(tiny_config(family), smollm2_tokenizer_dir, root / family)
            for family in FAMILIES + FALLBACKS}


@pytest.mark.parametrize("num_shard", [1, 2])
@pytest.mark.parametrize("architecture", FAMILIES)
async def test_tiny_model_greedy_output_equals_transformers(tiny_models, hf_home, architecture, num_shard):
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = tiny_models[architecture]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    expected = transformers_greedy(model, model_dir, PROMPTS, MAX_NEW_TOKENS)
    small_cache = ("--max-batch-prefill-tokens", "256", "--max-batch-total-tokens", "8192")
    with running_server(str(model_dir), hf_home, *small_cache, num_shard=num_shard) as server:
        ours = await generate_all(server.url, PROMPTS, MAX_NEW_TOKENS)
        async with aiohttp.ClientSession() as session, session.get(server.url + "/info") as response:
            info = await response.json()
    assert_same_tokens(ours, expected)
    assert info["model_implementation"] == "in-project"


@pytest.mark.parametrize("architecture, num_shard", [
    ("gpt_neox", 1),
    ("gpt_neox", 2),  # transformers' tensor-parallel plan for GPT-NeoX, over our process group
    ("opt", 1),  # no plan: --num-shard 2 is refused (tests/unit/test_prepare.py)
])
async def test_fallback_model_greedy_output_equals_transformers_and_info_names_the_fallback(
    tiny_models, hf_home, architecture, num_shard
):
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = tiny_models[architecture]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    expected = transformers_greedy(model, model_dir, PROMPTS, MAX_NEW_TOKENS)
    small_cache = ("--max-batch-prefill-tokens", "256", "--max-batch-total-tokens", "8192")
    with running_server(str(model_dir), hf_home, *small_cache, num_shard=num_shard) as server:
        ours = await generate_all(server.url, PROMPTS, MAX_NEW_TOKENS)
        async with aiohttp.ClientSession() as session, session.get(server.url + "/info") as response:
            info = await response.json()
    assert_same_tokens(ours, expected)
    assert info["model_implementation"] == "transformers"


async def test_a_multimodal_checkpoint_served_text_only_refuses_an_image_with_422(tiny_models, hf_home):
    body = {"model": "tgi", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]}]}
    with running_server(str(tiny_models["gemma3_multimodal"]), hf_home, "--max-batch-prefill-tokens", "256") as server:
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + "/v1/chat/completions", json=body) as response:
                status, error = response.status, await response.json()
    assert status == 422
    assert error["error_type"] == "validation" and "text content parts" in error["error"]


@pytest.fixture(scope="module")
def smollm2_expected(smollm2_transformers, smollm2_tokenizer_dir) -> list[list[int]]:
    return transformers_greedy(smollm2_transformers, smollm2_tokenizer_dir, PROMPTS, MAX_NEW_TOKENS)


@pytest.mark.slow
@pytest.mark.parametrize("num_shard", [1, 2])
async def test_smollm2_gguf_greedy_output_equals_transformers(smollm2_gguf, smollm2_expected, hf_home, num_shard):
    with running_server(str(smollm2_gguf), hf_home, "--max-batch-prefill-tokens", "512", num_shard=num_shard) as server:
        ours = await generate_all(server.url, PROMPTS, MAX_NEW_TOKENS)
    assert_same_tokens(ours, smollm2_expected)

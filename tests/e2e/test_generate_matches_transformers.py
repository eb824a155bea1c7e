"""Greedy generation through HTTP equals HF transformers `generate()` token for token (fp32, CPU)."""

from __future__ import annotations

import aiohttp
import pytest

from server_helpers import (
    MAX_NEW_TOKENS, PROMPTS, assert_same_tokens, generate_all, running_server, save_tiny_model, tiny_config,
    transformers_greedy,
)

FAMILIES = ["llama", "qwen2", "qwen3", "phi3", "mixtral", "qwen3_moe", "gemma", "gemma2", "gemma3"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, smollm2_tokenizer_dir):
    root = tmp_path_factory.mktemp("tiny")
    return {family: save_tiny_model(tiny_config(family), smollm2_tokenizer_dir, root / family)
            for family in FAMILIES}


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

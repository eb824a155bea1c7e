"""Greedy generation through HTTP equals HF transformers `generate()` token for token (fp32, CPU)."""

from __future__ import annotations

import pytest

from server_helpers import assert_greedy_equals_transformers, save_tiny_model, tiny_config

FAMILIES = ["llama", "qwen2", "qwen3", "phi3", "mixtral", "qwen3_moe", "gemma", "gemma2", "gemma3"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, smollm2_tokenizer_dir):
    root = tmp_path_factory.mktemp("tiny")
    return {family: save_tiny_model(tiny_config(family), smollm2_tokenizer_dir, root / family)
            for family in FAMILIES}


@pytest.mark.parametrize("num_shard", [1, 2])
@pytest.mark.parametrize("architecture", FAMILIES)
async def test_tiny_model_greedy_output_equals_transformers(tiny_models, hf_home, architecture, num_shard):
    info = await assert_greedy_equals_transformers(tiny_models[architecture], hf_home, num_shard)
    assert info["model_implementation"] == "in-project"

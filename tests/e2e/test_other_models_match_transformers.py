"""Greedy generation through HTTP equals HF transformers `generate()` token for token (fp32, CPU), for
the models beside the in-project families: the transformers fallback, a multimodal checkpoint served
text-only, and the real SmolLM2 GGUF. (A file of its own so that pytest-xdist runs it beside
test_generate_matches_transformers.py.)"""

from __future__ import annotations

import re

import aiohttp
import pytest

from server_helpers import (
    MAX_NEW_TOKENS, PREFIX_PROMPTS, PROMPTS, assert_greedy_equals_transformers,
    assert_greedy_equals_transformers_with_cached_prefixes, running_server, save_tiny_model, tiny_config,
    transformers_greedy,
)

FALLBACKS = ["gpt_neox", "opt"]  # transformers' own classes over our paged KV cache
# a Gemma3ForConditionalGeneration checkpoint, served text-only (its language model)
MULTIMODAL = "gemma3_multimodal"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, smollm2_tokenizer_dir):
    root = tmp_path_factory.mktemp("tiny")
    return {family: save_tiny_model(tiny_config(family), smollm2_tokenizer_dir, root / family)
            for family in [*FALLBACKS, MULTIMODAL]}


@pytest.mark.parametrize("architecture, num_shard", [
    ("gpt_neox", 1),
    ("gpt_neox", 2),  # transformers' tensor-parallel plan for GPT-NeoX, over our process group
    ("opt", 1),  # no plan: --num-shard 2 is refused (tests/unit/test_prepare.py)
])
async def test_fallback_model_greedy_output_equals_transformers_and_info_names_the_fallback(
    tiny_models, hf_home, architecture, num_shard
):
    info = await assert_greedy_equals_transformers(tiny_models[architecture], hf_home, num_shard)
    assert info["model_implementation"] == "transformers"


async def test_a_multimodal_checkpoint_served_text_only_equals_transformers(tiny_models, hf_home):
    info = await assert_greedy_equals_transformers(tiny_models[MULTIMODAL], hf_home, 1)
    assert info["model_implementation"] == "in-project"


async def test_a_multimodal_checkpoint_served_text_only_refuses_an_image_with_422(tiny_models, hf_home):
    body = {"model": "tgi", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]}]}
    with running_server(str(tiny_models[MULTIMODAL]), hf_home, "--max-batch-prefill-tokens", "256") as server:
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + "/v1/chat/completions", json=body) as response:
                status, error = response.status, await response.json()
    assert status == 422
    assert error["error_type"] == "validation" and "text content parts" in error["error"]


@pytest.fixture(scope="module")
def smollm2_expected(smollm2_transformers, smollm2_tokenizer_dir) -> list[list[int]]:
    return transformers_greedy(smollm2_transformers, smollm2_tokenizer_dir, PROMPTS + PREFIX_PROMPTS, MAX_NEW_TOKENS)


@pytest.mark.slow
@pytest.mark.parametrize("num_shard, speculation", [(2, "off"), (1, "ngram"), (1, "draft-model")])
async def test_smollm2_gguf_greedy_output_equals_transformers_also_from_cached_prefixes(
    smollm2_gguf, smollm2_expected, smollm2_tokenizer_dir, hf_home, num_shard, speculation
):
    """Also with speculative decoding: n-gram proposals (`--speculate 3`), kept and rejected, and the
    proposals of a draft model (`--speculative-model`: the GGUF itself, loaded twice) change no token.
    (The plain single-shard path runs in the n-gram case, between proposals, and everywhere else; a
    draft model over two shards runs in tests/e2e/test_speculative_decoding.py.)"""
    args = {"off": (), "ngram": ("--speculate", "3"), "draft-model": ("--speculative-model", str(smollm2_gguf))}[speculation]
    with running_server(str(smollm2_gguf), hf_home, "--max-batch-prefill-tokens", "512", *args, num_shard=num_shard) as server:
        await assert_greedy_equals_transformers_with_cached_prefixes(server.url, smollm2_tokenizer_dir, smollm2_expected)
        if speculation != "off":
            async with aiohttp.ClientSession() as session, session.get(server.url + "/metrics") as response:
                metrics = await response.text()
            proposed, accepted = (sum(float(v) for v in re.findall(rf"^tgi_speculative_{kind}_tokens_total{{.*}} (\S+)$", metrics, re.M))
                                  for kind in ("proposed", "accepted"))
            if speculation == "ngram":
                assert proposed > accepted > 0
            else:  # the model drafting for itself: its proposals are what the model picks
                assert proposed >= accepted > 0.9 * proposed

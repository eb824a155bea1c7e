"""`--data-parallel-size 2`: two replicas (each a shard with its own KV cache) behind one router serve
concurrent requests on both (their step counters in /metrics) and answer exactly as transformers does."""

from __future__ import annotations

import re

import aiohttp
import pytest

from server_helpers import (
    MAX_NEW_TOKENS, PROMPTS, generate_all, running_server, save_tiny_model, tiny_config, transformers_greedy,
)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smollm2_tokenizer_dir):
    return save_tiny_model(tiny_config("llama"), smollm2_tokenizer_dir, tmp_path_factory.mktemp("dp") / "llama")


async def test_two_replicas_share_concurrent_requests_and_answer_as_transformers(tiny_llama, hf_home):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    expected = transformers_greedy(model, tiny_llama, PROMPTS, MAX_NEW_TOKENS)
    with running_server(str(tiny_llama), hf_home, "--data-parallel-size", "2", "--max-batch-prefill-tokens", "256",
                        "--max-batch-total-tokens", "8192") as server:
        assert await generate_all(server.url, PROMPTS, MAX_NEW_TOKENS) == expected
        async with aiohttp.ClientSession() as session:
            async with session.get(server.url + "/metrics") as response:
                metrics = await response.text()
            async with session.get(server.url + "/info") as response:
                info = await response.json()
    steps = {replica: float(count) for replica, count in
             re.findall(r'^tgi_replica_inference_count_total\{replica="(\d)"\} (\S+)$', metrics, re.MULTILINE)}
    assert steps.keys() == {"0", "1"} and min(steps.values()) > 0, steps
    assert info["data_parallel_size"] == 2 and "Starting 2 shard(s): 2 replicas of 1" in server.log

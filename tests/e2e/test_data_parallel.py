"""`--data-parallel-size 2`: two replicas (each a shard with its own KV cache) behind one router serve
concurrent requests on both (their step counters in /metrics) and answer exactly as transformers does,
on one node and with one replica on each of two nodes."""

from __future__ import annotations

import re

import aiohttp
import pytest

from server_helpers import (
    MAX_NEW_TOKENS, PROMPTS, Server, free_port_pair, generate_all, running_server, save_tiny_model, tiny_config, transformers_greedy,
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
    assert info["data_parallel_size"] == 2 and "Starting 2 shard(s): replicas 0 to 1 of 2, 1 shard(s) each" in server.log


async def test_replicas_on_two_nodes_serve_behind_node_0s_router_and_answer_as_transformers(tiny_llama, hf_home):
    """Two launchers on this machine as node 0 and node 1, one replica (one shard) each: node 1's replica
    serves node 0's router over TCP with the shard secret."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    expected = transformers_greedy(model, tiny_llama, PROMPTS, MAX_NEW_TOKENS)
    master_port = free_port_pair()
    args = ("--nnodes", "2", "--data-parallel-size", "2", "--master-addr", "127.0.0.1", "--master-port", str(master_port),
            "--max-batch-prefill-tokens", "256", "--max-batch-total-tokens", "8192")
    nodes = [Server(str(tiny_llama), hf_home, *args, "--node-rank", str(rank), env={"SHARD_SECRET": "data-parallel secret"})
             for rank in (0, 1)]
    try:
        nodes[0].wait_ready(timeout=300)
        assert await generate_all(nodes[0].url, PROMPTS, MAX_NEW_TOKENS) == expected
        async with aiohttp.ClientSession() as session, session.get(nodes[0].url + "/metrics") as response:
            metrics = await response.text()
    finally:
        for node in nodes:
            node.stop()
    steps = {replica: float(count) for replica, count in
             re.findall(r'^tgi_replica_inference_count_total\{replica="(\d)"\} (\S+)$', metrics, re.MULTILINE)}
    assert steps.keys() == {"0", "1"} and min(steps.values()) > 0, steps
    assert "Starting 1 shard(s): replicas 1 to 1 of 2" in nodes[1].log and "Node 1's shards serve on 127.0.0.1:" in nodes[0].log

"""Pipeline parallel on CPU (gloo): the decoder layers split into stages that run one after the other,
hidden states sent from stage to stage and the sampled tokens broadcast back. Greedy output equals
transformers' (also from cached prefixes): two stages of one shard on one node (Gemma 2: tied embeddings,
soft-capping, the scaled embedding on the first stage), and two stages of two shards on two nodes."""

from __future__ import annotations

import pytest

from server_helpers import (
    MAX_NEW_TOKENS, PREFIX_PROMPTS, PROMPTS, Server, assert_greedy_equals_transformers_with_cached_prefixes,
    free_port_pair, running_server, save_tiny_model, tiny_config, transformers_greedy,
)

LIMITS = ("--max-batch-prefill-tokens", "256", "--max-batch-total-tokens", "8192")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, smollm2_tokenizer_dir):
    root = tmp_path_factory.mktemp("pipeline")
    return {family: save_tiny_model(tiny_config(family), smollm2_tokenizer_dir, root / family)
            for family in ("llama", "gemma2")}


def expected_tokens(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return transformers_greedy(model, model_dir, PROMPTS + PREFIX_PROMPTS, MAX_NEW_TOKENS)


async def test_two_stages_on_one_node_generate_what_transformers_does(tiny_models, hf_home):
    model_dir = tiny_models["gemma2"]
    with running_server(str(model_dir), hf_home, *LIMITS, "--pipeline-parallel-size", "2", num_shard=2) as server:
        await assert_greedy_equals_transformers_with_cached_prefixes(server.url, model_dir, expected_tokens(model_dir))
    assert "stage 1 of 2, layers 1 to 2" in server.log


async def test_two_stages_of_two_shards_on_two_nodes_generate_what_transformers_does(tiny_models, hf_home):
    model_dir, master_port = tiny_models["llama"], free_port_pair()
    args = (*LIMITS, "--pipeline-parallel-size", "2", "--nnodes", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(master_port))
    nodes = [Server(str(model_dir), hf_home, *args, "--node-rank", str(rank), num_shard=4,
                    env={"SHARD_SECRET": "pipeline secret", "CUDA_VISIBLE_DEVICES": ""}) for rank in (0, 1)]
    try:
        nodes[0].wait_ready(timeout=300)
        await assert_greedy_equals_transformers_with_cached_prefixes(nodes[0].url, model_dir, expected_tokens(model_dir))
    finally:
        for node in reversed(nodes):
            node.stop()
    assert "stage 1 of 2" in nodes[1].log and "stage 0 of 2" in nodes[0].log

"""Two gloo ranks on CPU, each holding half the model, must produce the single-rank logits."""

import socket

import pytest
import torch
import torch.multiprocessing as mp
from model_helpers import (
    PagedBatchDriver,
    mixed_schedule,
    run_schedule,
    save_tiny_model,
    tiny_config,
    tp_rank_worker,
)

from tgi_server.distributed import SINGLE, TPGroup
from tgi_server.models.llama import LlamaForCausalLM
from tgi_server.models.registry import load_model

# tied embeddings; biases on q/k/v, o_proj and the MLP (row-parallel bias added once); q/k/v bias only;
# 3 kv heads over 2 ranks (uneven split); 1 kv head on 2 ranks (replicated)
VARIANTS = ["llama", "llama3_biased", "qwen2", "mistral_windowed", "odd_heads", "one_kv_head", "qwen3", "phi3", "mixtral", "qwen3_moe", "gemma", "gemma2", "gemma3"]
WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _single_rank_logits(model_dir: str) -> dict[str, torch.Tensor]:
    model, config = load_model(model_dir, SINGLE, torch.float32, torch.device("cpu"))
    driver = PagedBatchDriver(model)
    return run_schedule(driver, mixed_schedule(config.vocab_size))[1]


def test_two_ranks_produce_the_single_rank_logits_for_every_sequence(tmp_path):
    model_dirs = {}
    for variant in VARIANTS:
        model_dirs[variant] = str(tmp_path / variant)
        save_tiny_model(tiny_config(variant), model_dirs[variant])
    args = (WORLD_SIZE, _free_port(), model_dirs, str(tmp_path))
    mp.spawn(tp_rank_worker, args=args, nprocs=WORLD_SIZE, join=True)
    for variant, model_dir in model_dirs.items():
        expected = _single_rank_logits(model_dir)
        for rank in range(WORLD_SIZE):
            got = torch.load(tmp_path / f"{variant}_rank{rank}.pt")
            assert got.keys() == expected.keys()
            for seq_id in expected:
                torch.testing.assert_close(got[seq_id], expected[seq_id], atol=1e-4, rtol=0)


def test_more_ranks_than_kv_heads_that_do_not_divide_them_is_rejected_with_a_clear_error():
    three_ranks = TPGroup(rank=0, world_size=3, group=None)
    message = r"num_key_value_heads \(2\) must be >= the tensor-parallel world size \(3\) or divide it"
    with pytest.raises(ValueError, match=message):
        LlamaForCausalLM(tiny_config("llama"), three_ranks, torch.float32, torch.device("cpu"))

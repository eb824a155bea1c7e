"""Quantized checkpoints as people publish them (AWQ, GPTQ with act-order, compressed-tensors fp8)
served through HTTP with no flag: greedy output equals transformers' on the same weights dequantized
(tests/quantized_checkpoints.py), with one shard and with 4-bit weights split over two; /info names
the quantization. Every other format is checked logit for logit in tests/unit/test_quantized_checkpoints.py."""

from __future__ import annotations

import pytest
from quantized_checkpoints import save_quantized
from server_helpers import assert_greedy_equals_transformers, tiny_config

# fp8 on two shards rounds each rank's slice of an input with its own scale, which moves logits a
# little off the one-scale reference (bounded in tests/unit/test_quantized_checkpoints.py).
CASES = [("awq", 2, "awq"), ("gptq-act-order", 1, "gptq"), ("ct-fp8-channel", 1, "compressed-tensors")]


@pytest.mark.parametrize("fmt, num_shard, reported", CASES)
async def test_a_quantized_checkpoint_serves_the_greedy_output_of_its_dequantized_weights(
    fmt, num_shard, reported, tmp_path, hf_home, smollm2_tokenizer_dir
):
    reference = save_quantized(tiny_config("llama"), smollm2_tokenizer_dir, tmp_path / fmt, fmt)
    info = await assert_greedy_equals_transformers(tmp_path / fmt, hf_home, num_shard, reference)
    assert info["quantize"] == reported

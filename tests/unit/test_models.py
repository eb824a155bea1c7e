"""Our paged models (Llama, Qwen, Mistral, Phi, Mixtral, Qwen3-MoE, Gemma families) against transformers' own implementations, on tiny random checkpoints."""

import json

import pytest
import torch
from model_helpers import (
    PagedBatchDriver,
    hf_logits,
    mixed_schedule,
    run_schedule,
    save_tiny_model,
    tiny_config,
)

from tgi_server.distributed import SINGLE
from tgi_server.models.registry import load_model

VARIANTS = ["llama", "llama3_biased", "qwen2", "mistral_windowed", "qwen3", "phi3", "mixtral", "qwen3_moe", "gemma", "gemma2", "gemma3",
            "gemma3_multimodal", "gpt_neox", "opt"]
ATOL = 1e-4


@pytest.fixture(scope="module", params=VARIANTS)
def checkpoint(request, tmp_path_factory):
    """(directory, HF reference model) of one tiny saved checkpoint."""
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = save_tiny_model(tiny_config(request.param), directory)
    return str(directory), hf_model


def _driver(model_dir: str) -> PagedBatchDriver:
    model, config = load_model(model_dir, SINGLE, torch.float32, torch.device("cpu"))
    return PagedBatchDriver(model)


def test_mixed_length_prefill_batch_matches_hf_last_token_logits(checkpoint):
    model_dir, hf_model = checkpoint
    driver = _driver(model_dir)
    prefill = mixed_schedule(hf_model.config.get_text_config().vocab_size)[0]
    seq_to_logits = driver.step(prefill)
    for seq_id, token_ids in prefill:
        expected = hf_logits(hf_model, token_ids)[-1]
        torch.testing.assert_close(seq_to_logits[seq_id][-1], expected, atol=ATOL, rtol=0)


def test_decode_mixed_with_new_prefill_and_chunked_prefill_matches_hf_at_every_position(checkpoint):
    model_dir, hf_model = checkpoint
    schedule = mixed_schedule(hf_model.config.get_text_config().vocab_size)
    seq_to_tokens, seq_to_logits = run_schedule(_driver(model_dir), schedule)
    for seq_id, token_ids in seq_to_tokens.items():
        expected = hf_logits(hf_model, token_ids)
        torch.testing.assert_close(seq_to_logits[seq_id], expected, atol=ATOL, rtol=0)


def test_unknown_architecture_is_rejected_naming_supported_ones(tmp_path):
    save_tiny_model(tiny_config("llama"), tmp_path)
    config_path = tmp_path / "config.json"
    config_json = json.loads(config_path.read_text())
    config_json["architectures"] = ["FancyNewForCausalLM"]
    config_path.write_text(json.dumps(config_json))
    with pytest.raises(ValueError, match="FancyNewForCausalLM.*LlamaForCausalLM"):
        load_model(str(tmp_path), SINGLE, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("backend, captured", [("portable", False), ("triton", True)])
def test_only_models_on_capture_safe_kernels_offer_cuda_graphs(tmp_path, backend, captured):
    """The portable attention reads the batch layout from host lists, which a CUDA graph freezes: a
    model built on it (--disable-custom-kernels on a GPU) must run eagerly, or its decode steps would
    replay attention over no sequence."""
    pytest.importorskip("triton")
    save_tiny_model(tiny_config("llama"), tmp_path)
    model, _ = load_model(str(tmp_path), SINGLE, torch.float32, torch.device("cpu"), backend=backend)
    assert model.supports_cuda_graphs is captured


@pytest.mark.parametrize("world_size, rank", [(1, 0), (2, 1)])
def test_kv_cache_specs_give_each_layer_its_window_and_this_ranks_kv_heads(world_size, rank):
    from transformers import Qwen2Config

    from tgi_server.distributed import TPGroup
    from tgi_server.models.llama import LlamaForCausalLM

    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    model = LlamaForCausalLM(config, TPGroup(rank, world_size, None), torch.float32, torch.device("cpu"))
    specs = model.kv_cache_specs
    assert [spec.sliding_window for spec in specs] == [None if kind == "full_attention" else 8 for kind in config.layer_types]
    assert {(spec.num_kv_heads, spec.head_dim, spec.scale) for spec in specs} == {(2 // world_size, 8, 8 ** -0.5)}
    assert specs[0].shape(num_blocks=5, block_size=4) == (2, 5, 4, 2 // world_size, 8)


@pytest.mark.parametrize("variant", ["llama", "gemma2"])
def test_dummy_weights_scale_every_norm_by_one(variant, tmp_path):
    """`--load-format dummy`: a Llama norm stores 1, a Gemma norm (1 + w) stores 0; both scale by 1."""
    from tgi_server.layers.norm import RMSNorm

    save_tiny_model(tiny_config(variant), tmp_path)
    model, _ = load_model(str(tmp_path), SINGLE, torch.float32, torch.device("cpu"), load_format="dummy")
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) >= 2 * model.config.num_hidden_layers
    for norm in norms:
        width = norm.weight.shape[0]
        x = torch.randn(3, width)
        torch.testing.assert_close(norm(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))


def test_longrope_rotates_with_the_long_factors_as_transformers_does_past_the_original_context(tmp_path):
    """A Phi-3 128k-style model uses LongRoPE's long factors for every token (its context exceeds the
    original one); transformers does too once a sequence is longer than the original context."""
    hf_model = save_tiny_model(tiny_config("phi3_longrope"), tmp_path)
    token_ids = torch.randint(hf_model.config.get_text_config().vocab_size, (90,), generator=torch.Generator().manual_seed(0)).tolist()
    driver = _driver(str(tmp_path))
    logits = torch.cat([driver.step([("long", token_ids[:50])])["long"], driver.step([("long", token_ids[50:])])["long"]])
    torch.testing.assert_close(logits, hf_logits(hf_model, token_ids), atol=ATOL, rtol=0)

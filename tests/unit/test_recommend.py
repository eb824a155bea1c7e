"""`text-generation-launcher recommend`: the arithmetic on known configs, and the CLI's JSON."""

import json

import pytest
from typer.testing import CliRunner

from tgi_launcher import cli
from tgi_launcher.recommend import GIB, ModelShape, recommend, weight_bytes

LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                   tie_word_embeddings=False)
GEMMA_7B = dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                num_attention_heads=16, num_key_value_heads=16, head_dim=256, max_position_embeddings=8192,
                tie_word_embeddings=True)
LLAMA_70B = {**LLAMA_31_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
             "num_attention_heads": 64}


def test_parameter_counts_match_the_published_ones():
    assert ModelShape.from_config(LLAMA_31_8B).num_parameters == 8_030_261_248
    assert ModelShape.from_config(GEMMA_7B).num_parameters == 8_537_680_896


def test_a_gemma_config_without_tie_word_embeddings_ties_as_transformers_does():
    silent = {key: value for key, value in GEMMA_7B.items() if key != "tie_word_embeddings"}
    assert ModelShape.from_config({**silent, "model_type": "gemma"}).num_parameters == 8_537_680_896


MIXTRAL_8X7B = dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                   num_experts_per_tok=2, max_position_embeddings=32768, tie_word_embeddings=False)
QWEN3_30B_A3B = dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                     moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                     head_dim=128, num_experts=128, num_experts_per_tok=8, max_position_embeddings=40960,
                     tie_word_embeddings=False)


@pytest.mark.parametrize("config", [MIXTRAL_8X7B, QWEN3_30B_A3B], ids=["mixtral-8x7b", "qwen3-30b-a3b"])
def test_mixture_of_experts_parameters_count_every_expert_as_transformers_does(config):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    expected = sum(p.numel() for p in model.parameters())
    assert ModelShape.from_config(config).num_parameters == pytest.approx(expected, rel=1e-5)


def test_kv_bytes_per_token():
    assert ModelShape.from_config(LLAMA_31_8B).kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # 128 KiB
    assert ModelShape.from_config(GEMMA_7B).kv_bytes_per_token == 2 * 28 * 16 * 256 * 2  # 448 KiB


def test_llama_8b_fits_one_80_gib_gpu_with_its_full_context():
    configuration = recommend("meta-llama/Llama-3.1-8B", LLAMA_31_8B, 80, 2)["configuration"]
    assert configuration["num_shard"] == 1
    assert configuration["max_total_tokens"] == 131072
    assert configuration["max_input_length"] == 131071
    # 16.1 GB of weights + 16 GiB of KV for one full context + prefill activations
    assert 31 < configuration["estimated_memory_in_gigabytes"] < 33


def test_context_shrinks_to_what_the_kv_cache_holds_on_a_small_gpu():
    configuration = recommend("gemma", GEMMA_7B, 21, 1)["configuration"]
    shape = ModelShape.from_config(GEMMA_7B)
    assert configuration["max_total_tokens"] < 8192
    assert configuration["estimated_memory_in_gigabytes"] * GIB <= 21 * GIB * 0.9 + shape.kv_bytes_per_token


def test_70b_needs_several_gpus_and_too_few_is_a_clear_error():
    assert recommend("llama-70b", LLAMA_70B, 80, 4)["configuration"]["num_shard"] == 2
    with pytest.raises(ValueError, match="GiB of GPU memory"):
        recommend("llama-70b", LLAMA_70B, 24, 2)


def test_a_model_that_fits_fewer_gpus_than_a_node_has_fills_it_with_data_parallel_replicas():
    answer = recommend("llama-70b", LLAMA_70B, 80, 8, num_nodes=3)
    configuration = answer["configuration"]
    assert (configuration["num_shard"], configuration["data_parallel_size"], configuration["nnodes"],
            configuration["deployments"]) == (2, 4, 1, 3)
    assert answer["instance"] == "4 replicas of 2x GPU with 80 GiB on each node; 3 such deployments"


def test_a_model_larger_than_a_node_spans_the_fewest_whole_nodes():
    llama_405b = {**LLAMA_70B, "hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
                  "num_attention_heads": 128}
    fp8 = {**llama_405b, "quantization_config": {"quant_method": "fbgemm_fp8"}}
    configuration = recommend("llama-405b-fp8", fp8, 80, 4, num_nodes=2)["configuration"]
    assert (configuration["num_shard"], configuration["nnodes"], configuration["pipeline_parallel_size"],
            configuration["data_parallel_size"]) == (8, 2, 2, 1)  # a stage of 4 on each node
    # bf16 (~760 GiB): 16 shards over two 8-GPU nodes, two stages of tensor parallel 8
    configuration = recommend("llama-405b", llama_405b, 80, 8, num_nodes=4)["configuration"]
    assert (configuration["num_shard"], configuration["nnodes"], configuration["deployments"]) == (16, 2, 2)
    with pytest.raises(ValueError, match="1 node"):
        recommend("llama-405b", llama_405b, 80, 8)


def test_shard_counts_attention_cannot_split_over_are_skipped():
    # 70B in bf16 on 24 GiB GPUs needs 8 shards: fine with 8 KV heads, impossible with 6 (8 is neither at
    # most 6 nor a multiple of it)
    assert recommend("llama-70b", LLAMA_70B, 24, 8)["configuration"]["num_shard"] == 8
    six_kv_heads = {**LLAMA_70B, "num_key_value_heads": 6, "num_attention_heads": 48, "hidden_size": 6144}
    with pytest.raises(ValueError, match="not enough"):
        recommend("m", six_kv_heads, 24, 8)


@pytest.mark.parametrize("quantization_config, bytes_per_weight, name", [
    ({"quant_method": "fbgemm_fp8"}, 1, "fbgemm_fp8"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128}, 0.5 + 4 / 128, "awq"),
    ({"quant_method": "compressed-tensors", "config_groups": {"group_0": {"weights": {"num_bits": 4, "group_size": 128}}}},
     0.5 + 4 / 128, "compressed-tensors"),
])
def test_a_quantized_checkpoint_counts_its_projections_at_their_stored_size(quantization_config, bytes_per_weight, name):
    shape = ModelShape.from_config(LLAMA_70B)
    quantized = {**LLAMA_70B, "quantization_config": quantization_config}
    # the embeddings and LM head stay 16-bit; 80 layers of projections shrink
    expected = (shape.num_parameters - shape.num_projection_parameters) * 2 + shape.num_projection_parameters * bytes_per_weight
    assert weight_bytes(quantized) == (int(expected), name)
    assert weight_bytes(LLAMA_70B) == (shape.num_parameters * 2, None)
    # 70B in bf16 (131 GiB) needs two 80 GiB GPUs; fp8 (~66 GiB) or 4-bit (~36 GiB) fits one
    assert recommend("llama-70b", LLAMA_70B, 80, 8)["configuration"]["num_shard"] == 2
    configuration = recommend("llama-70b", quantized, 80, 8)["configuration"]
    assert configuration["num_shard"] == 1 and configuration["quantize"] == name


def test_cli_prints_tgi_recommender_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_31_8B))
    result = CliRunner().invoke(cli.app, ["recommend", "--model-id", str(tmp_path), "--gpu-memory", "80",
                                          "--num-gpus", "2"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert set(answer) == {"model_id", "instance", "configuration"}
    assert set(answer["configuration"]) == {"max_batch_prefill_tokens", "max_input_length", "max_total_tokens",
                                            "num_shard", "pipeline_parallel_size", "data_parallel_size", "nnodes",
                                            "deployments", "quantize",
                                            "estimated_memory_in_gigabytes"}


def test_cli_defaults_to_the_launchers_model_and_reads_a_gguf_files_metadata(smollm2_gguf):
    result = CliRunner().invoke(cli.app, ["recommend", "--gpu-memory", "24"], env={"MODEL_ID": ""})
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["model_id"] == str(smollm2_gguf)
    assert answer["configuration"]["num_shard"] == 1 and answer["configuration"]["max_total_tokens"] == 8192
    from tgi_launcher.recommend import ModelShape, load_config

    assert 134e6 < ModelShape.from_config(load_config(str(smollm2_gguf))).num_parameters < 135e6  # SmolLM2-135M


def test_cli_names_a_local_path_that_does_not_exist(tmp_path):
    result = CliRunner().invoke(cli.app, ["recommend", "--model-id", str(tmp_path / "missing.gguf")])
    assert result.exit_code == 2 and "no such file or directory" in result.output

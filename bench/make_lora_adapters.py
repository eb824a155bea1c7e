"""Writes random PEFT LoRA adapters for a model directory's config (bench/make_model_dir.py), for the
LoRA benchmark (bench/lora.sh): N adapters of rank R on q/k/v/o and gate/up/down of every layer, each
a directory with adapter_config.json and adapter_model.safetensors in PEFT's layout, bf16 weights small
enough to leave the model's activations in range.

    python bench/make_lora_adapters.py /tmp/llama-3.1-8b /tmp/adapters --count 8 --rank 16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each target module of one decoder layer."""
    hidden, intermediate = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate), "down_proj": (intermediate, hidden)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    config = json.loads((Path(args.model_dir) / "config.json").read_text())
    shapes = module_shapes(config)
    for index in range(args.count):
        generator = torch.Generator().manual_seed(index)
        tensors = {}
        for layer in range(config["num_hidden_layers"]):
            for target in TARGETS:
                part = "self_attn" if target.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
                prefix = f"base_model.model.model.layers.{layer}.{part}.{target}"
                in_features, out_features = shapes[target]
                tensors[f"{prefix}.lora_A.weight"] = (torch.randn(args.rank, in_features, generator=generator) / in_features**0.5).to(torch.bfloat16)
                tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out_features, args.rank, generator=generator) * 0.01).to(torch.bfloat16)
        out = Path(args.out_dir) / f"adapter{index}"
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": args.rank, "lora_alpha": 2 * args.rank, "target_modules": list(TARGETS),
            "base_model_name_or_path": str(args.model_dir), "bias": "none", "task_type": "CAUSAL_LM"}, indent=1))
        print(out)


if __name__ == "__main__":
    main()

"""Architecture name -> model class, and building a loaded model from a checkpoint path."""

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from tgi_server.distributed import TPGroup
from tgi_server.models.llama import LlamaForCausalLM
from tgi_server.weights import load_config, open_weights

ARCHITECTURES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def model_architecture(config: PretrainedConfig) -> str:
    """`architectures[0]`; GGUF configs carry none, so fall back to the causal-LM class of model_type."""
    if config.architectures:
        return config.architectures[0]
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, config.model_type)


def load_model(
    model_path: str, tp: TPGroup, dtype: torch.dtype, device: torch.device
) -> tuple[nn.Module, PretrainedConfig]:
    """Build this rank's shard of the model at `model_path` and load its weights.

    `model_path` is a local directory with config.json and *.safetensors, or a `.gguf` file.
    Raises ValueError for an architecture not in `ARCHITECTURES`.
    """
    config = load_config(model_path)
    architecture = model_architecture(config)
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    model = ARCHITECTURES[architecture](config, tp, dtype, device)
    model.load_weights(open_weights(model_path, config, dtype))
    return model.eval(), config

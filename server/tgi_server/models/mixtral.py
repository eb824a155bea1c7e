"""Mixture-of-experts decoders: Mixtral and Qwen3-MoE.

Both are the Llama block (`models.llama`; Qwen3-MoE's attention norms each query and key head) with
the MLP replaced by a sparse block: a router scores every expert, each token runs through its top-k
experts' SwiGLU MLPs, and their outputs are summed with the router's softmax weights. Mixtral
renormalises the top-k weights to sum to 1; Qwen3-MoE does when `norm_topk_prob`, and keeps a dense
MLP on the layers listed in `mlp_only_layers` (or off its `decoder_sparse_step`).
"""

import torch
from torch import nn
from transformers import PretrainedConfig

from tgi_server.distributed import TPGroup
from tgi_server.layers.activation import config_activation
from tgi_server.layers.linear import ReplicatedLinear
from tgi_server.layers.moe import FusedMoE
from tgi_server.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from tgi_server.weights import WeightSource

# model_type -> (sparse block's checkpoint name, experts' gate / up / down names)
CHECKPOINT_NAMES = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}


def moe_settings(config: PretrainedConfig) -> tuple[int, int, bool]:
    """(num_experts, each expert's intermediate size, renormalize the top-k weights)."""
    if config.model_type == "mixtral":
        return config.num_local_experts, config.intermediate_size, True
    return config.num_experts, config.moe_intermediate_size, config.norm_topk_prob


def is_sparse_layer(config: PretrainedConfig, layer_idx: int) -> bool:
    """Qwen3-MoE keeps dense MLPs on `mlp_only_layers` and off every `decoder_sparse_step`-th layer."""
    if config.model_type == "mixtral":
        return True
    return layer_idx not in config.mlp_only_layers and (layer_idx + 1) % config.decoder_sparse_step == 0


class SparseMoeBlock(nn.Module):
    """Router (replicated) + fused experts (each expert's intermediate split across ranks)."""

    def __init__(self, config: PretrainedConfig, tp: TPGroup, dtype: torch.dtype, device: torch.device):
        super().__init__()
        num_experts, intermediate_size, renormalize = moe_settings(config)
        self.expert_names = CHECKPOINT_NAMES[config.model_type][1]
        self.gate = ReplicatedLinear(config.hidden_size, num_experts, dtype, device)
        self.experts = FusedMoE(
            num_experts, config.num_experts_per_tok, config.hidden_size, intermediate_size, renormalize,
            config_activation(config), tp, dtype, device,
        )

    def load(self, weights: WeightSource, prefix: str) -> None:
        self.gate.load(weights, f"{prefix}.gate.weight")
        self.experts.load(weights, f"{prefix}.experts", self.expert_names)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden, self.gate(hidden))


class MoeDecoderLayer(LlamaDecoderLayer):
    def build_mlp(
        self, config: PretrainedConfig, layer_idx: int, tp: TPGroup, dtype: torch.dtype, device: torch.device
    ) -> tuple[nn.Module, str]:
        if not is_sparse_layer(config, layer_idx):
            return LlamaMLP(config, tp, dtype, device), "mlp"
        return SparseMoeBlock(config, tp, dtype, device), CHECKPOINT_NAMES[config.model_type][0]


class MixtralForCausalLM(LlamaForCausalLM):
    """Mixtral and Qwen3-MoE; a `models.interface.CausalLM`."""

    layer_class = MoeDecoderLayer

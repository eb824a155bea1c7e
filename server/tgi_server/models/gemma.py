"""Gemma, Gemma 2 and Gemma 3 (text) decoders.

Gemma: a Llama-like pre-norm block with a GeGLU MLP (tanh GELU), RMSNorm scaling by (1 + w),
embeddings multiplied by sqrt(hidden_size), head_dim 256 and a tied LM head.
Gemma 2 adds: a norm after attention and around the MLP (four per block), tanh soft-capping of the
attention scores and of the final logits, sliding-window attention on alternating layers
(`layer_types`), and a softmax scale of query_pre_attn_scalar ** -0.5.
Gemma 3 adds: RMSNorm of every query and key head (QK-norm) and local (sliding) and global layers
that rotate with their own RoPE parameters.

Tensor parallelism lives in the layers; this file only wires them as the architecture does.
"""

import copy

import torch
from torch import nn
from transformers import PretrainedConfig

from tgi_server.distributed import TPGroup
from tgi_server.layers.activation import GatedActivation, config_activation
from tgi_server.layers.attention import attention_head_dim
from tgi_server.layers.linear import ColumnParallelLinear, RowParallelLinear
from tgi_server.layers.norm import RMSNorm
from tgi_server.layers.rotary import RotaryEmbedding
from tgi_server.layers.self_attention import SelfAttention
from tgi_server.models.llama import LlamaForCausalLM, LlamaModel
from tgi_server.weights import WeightSource

# Gemma 2 and 3 norm the attention and MLP outputs too ("sandwich" norms)
SANDWICH_NORM_TYPES = ("gemma2", "gemma3_text")


def gemma_norm(config: PretrainedConfig, width: int, dtype: torch.dtype, device: torch.device) -> RMSNorm:
    """Gemma's RMSNorm: checkpoints store w for a scale of 1 + w."""
    return RMSNorm(width, config.rms_norm_eps, dtype, device, weight_offset=1.0)


def layer_type(config: PretrainedConfig, layer_idx: int) -> str | None:
    """"sliding_attention" or "full_attention" where the config lists layer types (Gemma 2, 3)."""
    layer_types = getattr(config, "layer_types", None)
    return layer_types[layer_idx] if layer_types else None


def rotary_for(config: PretrainedConfig, head_dim: int, kind: str | None, device: torch.device) -> RotaryEmbedding:
    """Gemma 3 keys `rope_parameters` by layer type (local layers rotate with a smaller base)."""
    keyed_by_type = kind is not None and kind in config.rope_parameters
    return RotaryEmbedding(config, head_dim, device, kind if keyed_by_type else None)


def gemma_attention(
    config: PretrainedConfig, layer_idx: int, tp: TPGroup, dtype: torch.dtype, device: torch.device
) -> SelfAttention:
    """GQA self-attention; Gemma 2/3's softmax scale, soft-cap and windowed layers, Gemma 3's QK-norm
    (1 + w) and per-layer-type rotation."""
    head_dim = attention_head_dim(config)
    kind = layer_type(config, layer_idx)
    scalar = getattr(config, "query_pre_attn_scalar", None) or head_dim
    return SelfAttention(
        config.hidden_size, config.num_attention_heads, config.num_key_value_heads, head_dim, layer_idx,
        rotary_for(config, head_dim, kind, device), tp, dtype, device,
        qkv_bias=getattr(config, "attention_bias", False), o_bias=getattr(config, "attention_bias", False),
        sliding_window=config.sliding_window if kind == "sliding_attention" else None,
        scale=scalar**-0.5,
        logit_softcap=getattr(config, "attn_logit_softcapping", None),
        qk_norm_eps=config.rms_norm_eps if config.model_type == "gemma3_text" else None,
        qk_norm_offset=1.0,
    )


class GemmaMLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x)), the intermediate split across ranks."""

    def __init__(self, config: PretrainedConfig, tp: TPGroup, dtype: torch.dtype, device: torch.device):
        super().__init__()
        hidden_size, intermediate_size = config.hidden_size, config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], False, tp, dtype, device
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, False, tp, dtype, device)
        self.act = GatedActivation(config_activation(config), device)

    def load(self, weights: WeightSource, prefix: str) -> None:
        self.gate_up_proj.load(weights, [f"{prefix}.gate_proj", f"{prefix}.up_proj"])
        self.down_proj.load(weights, f"{prefix}.down_proj")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(hidden)))


class GemmaDecoderLayer(nn.Module):
    """Gemma: x + attn(norm(x)), then + mlp(norm(.)). Gemma 2/3: x + norm(attn(norm(x))), then
    + norm(mlp(norm(.))).

    As in Llama, the residual stream travels beside the block's output so that each pre-norm adds it
    in the same kernel: a layer takes (output of the previous block, stream before it) and returns
    the same.
    """

    def __init__(
        self, config: PretrainedConfig, layer_idx: int, tp: TPGroup, dtype: torch.dtype, device: torch.device
    ):
        super().__init__()
        hidden_size = config.hidden_size
        self.has_sandwich_norms = config.model_type in SANDWICH_NORM_TYPES
        self.input_layernorm = gemma_norm(config, hidden_size, dtype, device)
        self.self_attn = gemma_attention(config, layer_idx, tp, dtype, device)
        self.post_attention_layernorm = gemma_norm(config, hidden_size, dtype, device)
        if self.has_sandwich_norms:
            self.pre_feedforward_layernorm = gemma_norm(config, hidden_size, dtype, device)
            self.post_feedforward_layernorm = gemma_norm(config, hidden_size, dtype, device)
        self.mlp = GemmaMLP(config, tp, dtype, device)

    def load(self, weights: WeightSource, prefix: str) -> None:
        norms = ["input_layernorm", "post_attention_layernorm"]
        if self.has_sandwich_norms:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        for name in norms:
            getattr(self, name).load(weights, f"{prefix}.{name}.weight")
        self.self_attn.load(weights, f"{prefix}.self_attn")
        self.mlp.load(weights, f"{prefix}.mlp")

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: the previous block's output (or the scaled embeddings, with residual None)."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        if not self.has_sandwich_norms:
            hidden, residual = self.post_attention_layernorm.add_and_norm(hidden, residual)
            return self.mlp(hidden), residual
        hidden = self.post_attention_layernorm(hidden)
        hidden, residual = self.pre_feedforward_layernorm.add_and_norm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class GemmaModel(LlamaModel):
    """Token embedding scaled by sqrt(hidden_size), the decoder layers and the final norm (1 + w)."""

    def __init__(
        self, config: PretrainedConfig, tp: TPGroup, dtype: torch.dtype, device: torch.device, layer_class: type
    ):
        super().__init__(config, tp, dtype, device, layer_class)
        # rounded to the model dtype first, as the reference multiplies by a tensor of that dtype
        self.embed_scale = float(torch.tensor(config.hidden_size**0.5, dtype=dtype))

    def build_norm(self, config: PretrainedConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
        return gemma_norm(config, config.hidden_size, dtype, device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.embed_scale  # [num_tokens, hidden_size]


class GemmaForCausalLM(LlamaForCausalLM):
    """The decoder plus a vocab-parallel LM head (the embedding's, unless the checkpoint unties
    them), with Gemma 2's final logit soft-capping; a `models.interface.CausalLM`."""

    model_class = GemmaModel
    layer_class = GemmaDecoderLayer

    def __init__(self, config: PretrainedConfig, tp: TPGroup, dtype: torch.dtype, device: torch.device):
        super().__init__(config, tp, dtype, device)
        self.final_logit_softcap = getattr(config, "final_logit_softcapping", None)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)  # [n, vocab_size] float32
        if self.final_logit_softcap is not None:
            logits = self.final_logit_softcap * torch.tanh(logits / self.final_logit_softcap)
        return logits


class Gemma3TextOnlyForCausalLM(GemmaForCausalLM):
    """Gemma 3's multimodal checkpoints (`Gemma3ForConditionalGeneration`: 4B, 12B, 27B) served as
    the text-only language model inside them: its `text_config` and its `language_model.*` tensors;
    the vision tower is not loaded. Whether the LM head is the embedding is the wrapper's
    `tie_word_embeddings` (transformers ties by it), not the text config's."""

    def __init__(self, config: PretrainedConfig, tp: TPGroup, dtype: torch.dtype, device: torch.device):
        text_config = copy.deepcopy(config.text_config)
        text_config.tie_word_embeddings = config.tie_word_embeddings
        super().__init__(text_config, tp, dtype, device)

    def load_weights(self, weights: WeightSource) -> None:
        self.model.load(weights, "language_model.model")
        if not self.config.tie_word_embeddings:
            self.lm_head.load(weights, "language_model.lm_head.weight")

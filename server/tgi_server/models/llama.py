"""Llama decoder (also Mistral, Qwen2/2.5, Qwen3, Phi-3/Phi-4, SmolLM2): pre-norm blocks of GQA
attention and a SwiGLU MLP. Qwen3 norms each query and key head before the rotation (QK-norm);
Phi-3 checkpoints store q/k/v and gate/up as one tensor each, and may rotate part of each head.

Tensor parallelism lives in the layers; this file only wires them as the architecture does.
"""

import torch
from torch import nn
from transformers import PretrainedConfig

from tgi_server.attention_metadata import KVCacheSpec
from tgi_server.distributed import TPGroup
from tgi_server.layers.activation import GatedActivation
from tgi_server.layers.attention import attention_head_dim
from tgi_server.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tgi_server.layers.linear import ColumnParallelLinear, RowParallelLinear
from tgi_server.layers.norm import RMSNorm
from tgi_server.layers.rotary import RotaryEmbedding
from tgi_server.layers.self_attention import SelfAttention
from tgi_server.weights import WeightSource


# families that RMSNorm each query and key head over head_dim before rotating them
QK_NORM_TYPES = ("qwen3", "qwen3_moe")
# families whose checkpoints fuse q/k/v into `qkv_proj` and gate/up into `gate_up_proj`
FUSED_CHECKPOINT_TYPES = ("phi3",)


def attention_biases(config: PretrainedConfig) -> tuple[bool, bool]:
    """(q/k/v bias, o_proj bias): Llama's `attention_bias` sets both; Qwen2 has q/k/v bias, no o_proj bias."""
    if config.model_type == "qwen2":
        return True, False
    has_bias = getattr(config, "attention_bias", False)
    return has_bias, has_bias


def layer_sliding_window(config: PretrainedConfig, layer_idx: int) -> int | None:
    """The attention window of layer `layer_idx`, or None for full attention.

    Mistral windows every layer when `sliding_window` is set; Qwen2 marks windowed layers in
    `layer_types`.
    """
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[layer_idx] != "sliding_attention":
        return None
    return getattr(config, "sliding_window", None)


def llama_attention(
    config: PretrainedConfig, layer_idx: int, tp: TPGroup, dtype: torch.dtype, device: torch.device
) -> SelfAttention:
    """Rotary GQA self-attention with the family's biases, window, QK-norm and checkpoint layout."""
    head_dim = attention_head_dim(config)
    qkv_bias, o_bias = attention_biases(config)
    return SelfAttention(
        config.hidden_size, config.num_attention_heads, config.num_key_value_heads, head_dim, layer_idx,
        RotaryEmbedding(config, head_dim, device), tp, dtype, device,
        qkv_bias=qkv_bias, o_bias=o_bias, sliding_window=layer_sliding_window(config, layer_idx),
        qk_norm_eps=config.rms_norm_eps if config.model_type in QK_NORM_TYPES else None,
        fused_checkpoint=config.model_type in FUSED_CHECKPOINT_TYPES,
    )


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), the intermediate split across ranks."""

    def __init__(self, config: PretrainedConfig, tp: TPGroup, dtype: torch.dtype, device: torch.device):
        super().__init__()
        has_bias = getattr(config, "mlp_bias", False)
        hidden_size, intermediate_size = config.hidden_size, config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], has_bias, tp, dtype, device
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, has_bias, tp, dtype, device)
        self.act = GatedActivation("silu", device)
        self.is_fused_checkpoint = config.model_type in FUSED_CHECKPOINT_TYPES

    def load(self, weights: WeightSource, prefix: str) -> None:
        if self.is_fused_checkpoint:
            self.gate_up_proj.load_fused(weights, f"{prefix}.gate_up_proj")
        else:
            self.gate_up_proj.load(weights, [f"{prefix}.gate_proj", f"{prefix}.up_proj"])
        self.down_proj.load(weights, f"{prefix}.down_proj")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(hidden)  # [num_tokens, 2 * intermediate_per_rank]
        return self.down_proj(self.act(gate_up))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)).

    The residual stream travels beside the block's output, so each norm adds it in the same kernel
    (vLLM's layout): a layer takes (output of the previous block, stream before it) and returns the same.
    """

    def __init__(
        self, config: PretrainedConfig, layer_idx: int, tp: TPGroup, dtype: torch.dtype, device: torch.device
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.self_attn = llama_attention(config, layer_idx, tp, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.mlp, self.mlp_name = self.build_mlp(config, layer_idx, tp, dtype, device)

    def build_mlp(
        self, config: PretrainedConfig, layer_idx: int, tp: TPGroup, dtype: torch.dtype, device: torch.device
    ) -> tuple[nn.Module, str]:
        """(the block's feed-forward module, its checkpoint name); mixture-of-experts models override it."""
        return LlamaMLP(config, tp, dtype, device), "mlp"

    def load(self, weights: WeightSource, prefix: str) -> None:
        self.input_layernorm.load(weights, f"{prefix}.input_layernorm.weight")
        self.self_attn.load(weights, f"{prefix}.self_attn")
        self.post_attention_layernorm.load(weights, f"{prefix}.post_attention_layernorm.weight")
        self.mlp.load(weights, f"{prefix}.{self.mlp_name}")

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: the previous block's output (or the embeddings, with residual None)."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm.add_and_norm(hidden, residual)
        return self.mlp(hidden), residual


class SkippedLayer(nn.Module):
    """A decoder layer another pipeline stage runs: no weights, and a KV cache of no heads (the caches
    stay indexed by layer)."""

    kv_cache_spec = KVCacheSpec(0, 1, None, 1.0)
    runs_elsewhere = True  # what belongs to this layer (e.g. a LoRA adapter's weights) is another stage's


class LlamaModel(nn.Module):
    """Token embedding, the decoder layers and the final norm. With pipeline parallelism
    (`TPGroup.stage`) only this stage's run of layers is built; the first stage embeds, the others
    receive the previous stage's hidden states (its last block's output added to the residual stream),
    and every stage but the last sends them on instead of norming them."""

    def __init__(
        self, config: PretrainedConfig, tp: TPGroup, dtype: torch.dtype, device: torch.device, layer_class: type
    ):
        super().__init__()
        vocab_size, hidden_size = config.vocab_size, config.hidden_size
        self.stage, self.hidden_size, self.dtype = tp.stage, hidden_size, dtype
        num_layers = config.num_hidden_layers
        self.start, self.stop = self.stage.layer_range(num_layers) if self.stage is not None else (0, num_layers)
        self.embed_tokens = VocabParallelEmbedding(vocab_size, hidden_size, tp, dtype, device)
        self.layers = nn.ModuleList(layer_class(config, i, tp, dtype, device) if self.start <= i < self.stop
                                    else SkippedLayer() for i in range(num_layers))
        self.own_layers = tuple(self.layers[self.start : self.stop])  # the ones this stage runs
        self.norm = self.build_norm(config, dtype, device)

    def build_norm(self, config: PretrainedConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
        return RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # [num_tokens, hidden_size]

    def load(self, weights: WeightSource, prefix: str) -> None:
        self.embed_tokens.load(weights, f"{prefix}.embed_tokens.weight")
        for i in range(self.start, self.stop):
            self.layers[i].load(weights, f"{prefix}.layers.{i}")
        self.norm.load(weights, f"{prefix}.norm.weight")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.stage is None or self.stage.is_first:
            hidden = self.embed(input_ids)
        else:
            hidden = self.stage.receive((input_ids.shape[0], self.hidden_size), self.dtype, input_ids.device)
        residual = None
        for layer in self.own_layers:
            hidden, residual = layer(positions, hidden, residual)
        if self.stage is None or self.stage.is_last:
            return self.norm.add_and_norm(hidden, residual)[0] if residual is not None else self.norm(hidden)
        hidden = hidden + residual if residual is not None else hidden  # what the next block's norm adds first
        self.stage.send(hidden)
        return hidden


class LlamaForCausalLM(nn.Module):
    """The decoder plus a vocab-parallel LM head (sharing the embedding when `tie_word_embeddings`);
    a `models.interface.CausalLM`. Subclasses change the decoder block through `layer_class` and the
    decoder stack through `model_class`."""

    model_class: type = LlamaModel
    layer_class: type = LlamaDecoderLayer
    supports_cuda_graphs = True

    def __init__(self, config: PretrainedConfig, tp: TPGroup, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.config = config
        self.model = self.model_class(config, tp, dtype, device, self.layer_class)
        # Only the last pipeline stage computes logits.
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp, dtype, device) \
            if tp.stage is None or tp.stage.is_last else None
        if config.tie_word_embeddings and self.lm_head is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def kv_cache_specs(self) -> list[KVCacheSpec]:
        return [layer.kv_cache_spec if isinstance(layer, SkippedLayer) else layer.self_attn.attn.kv_cache_spec
                for layer in self.model.layers]

    def load_weights(self, weights: WeightSource) -> None:
        """Fill every parameter with this rank's part of the HF-named checkpoint tensors."""
        self.model.load(weights, "model")
        if not self.config.tie_word_embeddings and self.lm_head is not None:
            self.lm_head.load(weights, "lm_head.weight")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [num_tokens] int64, inside a `forward_context` -> hidden states
        [num_tokens, hidden_size]; writes this step's K/V into the context's caches."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, hidden_size] -> logits [n, vocab_size] float32, the full vocab on every rank."""
        return self.lm_head(hidden).float()

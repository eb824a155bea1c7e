"""Any other causal LM: transformers' own model class, its attention routed through our paged KV cache.

transformers lets a model's attention layers call a registered function instead of its eager or SDPA
code (`AttentionInterface`, for classes with `_supports_attention_backend`). We register
"tgi_paged": it takes the layer's queries, keys and values (already rotated by the model), writes the
keys and values into that layer's cache from the forward context and attends with the same backend
as the in-project models (the rotation the backend applies is the identity here). The whole flat
batch of a step runs as one sequence of length num_tokens; the positions come from the runner and
the attention metadata keeps sequences apart, so continuous batching and chunked prefill work as for
any model. No CUDA graphs (transformers' Python is not capture-safe).

Tensor parallelism is transformers' own, where the architecture has a plan for it (its config's
`base_model_tp_plan`, e.g. GPT-NeoX, OLMo, Granite, Starcoder2): transformers shards the checkpoint
over our process group as DTensors, each rank's attention layers see only its heads, and its KV cache
holds only those.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import AttentionInterface, AutoModelForCausalLM, DistributedConfig, PretrainedConfig
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from tgi_server import forward_context
from tgi_server.attention_metadata import KVCacheSpec
from tgi_server.distributed import TPGroup
from tgi_server.layers.attention import attention_head_dim
from tgi_server.models.llama import layer_sliding_window
from tgi_server.ops import select_ops

ATTENTION = "tgi_paged"


class IdentityRotary(nn.Module):
    """A rotation by angle 0 (inv_freq all zero): the backends' attention op rotates q and k, but
    transformers' model has rotated them already."""

    def __init__(self, head_dim: int, device: torch.device):
        super().__init__()
        self.attention_scaling = 1.0
        self.register_buffer("inv_freq", torch.zeros(head_dim // 2, device=device), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k


def fallback_class(architecture: str) -> type | None:
    """transformers' class for `architecture` when it is a causal LM that accepts a registered
    attention function; None otherwise."""
    if architecture not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return None
    import transformers

    model_class = getattr(transformers, architecture, None)
    return model_class if getattr(model_class, "_supports_attention_backend", False) else None


def has_tensor_parallel_plan(architecture: str) -> bool:
    """Whether transformers can shard `architecture` (a fallback class) over several ranks."""
    config_class = getattr(fallback_class(architecture), "config_class", None)
    return bool(getattr(config_class, "base_model_tp_plan", None))


def _paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     sliding_window=None, softcap=None, **kwargs):
    """transformers' attention-function contract: query [1, num_heads, num_tokens, head_dim], key and
    value [1, num_kv_heads, num_tokens, head_dim] -> ([1, num_tokens, num_heads, head_dim], None)."""
    context = forward_context.current()
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [num_tokens, heads, head_dim]
    head_dim = q.shape[-1]
    spec = KVCacheSpec(k.shape[1], head_dim, sliding_window, head_dim**-0.5 if scaling is None else scaling, softcap)
    # the positions only feed the identity rotation
    out = module.tgi_ops.attention(q, k, v, context.attn.slot_mapping, module.tgi_rotary,
                                   context.kv_caches[module.layer_idx], context.attn, spec)
    return out.unsqueeze(0), None


def _no_mask(*args, **kwargs) -> None:
    """The attention metadata, not a dense mask, says what each token sees."""
    return None


def register_attention() -> None:
    AttentionInterface.register(ATTENTION, _paged_attention)
    AttentionMaskInterface.register(ATTENTION, _no_mask)


class TransformersCausalLM(nn.Module):
    """A transformers causal LM over the paged KV cache; a `models.interface.CausalLM` whose weights
    transformers loads when it is built (it has no `load_weights`)."""

    supports_cuda_graphs = False

    def __init__(
        self, config: PretrainedConfig, tp: TPGroup, dtype: torch.dtype, device: torch.device, model_path: str | None = None
    ):
        """With `model_path` transformers loads the checkpoint itself (its own tensor renames and
        conversions apply), sharded over `tp` when it has several ranks (the registry checks the
        architecture has a plan); without, the weights are left for `fill_random_weights` (one rank)."""
        super().__init__()
        register_attention()
        self.config = config
        settings = dict(dtype=dtype, attn_implementation=ATTENTION)
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        if tp.world_size > 1:
            if model_path is None:
                raise ValueError("random (dummy) weights with the transformers fallback need --num-shard 1")
            if num_kv_heads % tp.world_size or config.num_attention_heads % tp.world_size:
                raise ValueError(f"transformers shards attention heads evenly: {config.num_attention_heads} query and "
                                 f"{num_kv_heads} key/value heads do not divide over {tp.world_size} shards")
            from torch.distributed.device_mesh import DeviceMesh

            settings.update(distributed_config=DistributedConfig(tp_plan="auto", tp_size=tp.world_size),
                            device_mesh=DeviceMesh.from_group(tp.group, device.type))
        if model_path is None:
            with torch.device(device):
                self.hf = AutoModelForCausalLM.from_config(config, **settings)
        else:
            directory, gguf = (os.path.dirname(model_path), os.path.basename(model_path)) if model_path.endswith(".gguf") else (model_path, None)
            self.hf = AutoModelForCausalLM.from_pretrained(directory, config=config, gguf_file=gguf, **settings).to(device)
        self.hf.eval()
        head_dim = attention_head_dim(config)
        num_kv_heads //= tp.world_size  # this rank's
        self._specs = [
            KVCacheSpec(num_kv_heads, head_dim, layer_sliding_window(config, i), head_dim**-0.5)
            for i in range(config.num_hidden_layers)
        ]
        ops, rotary = select_ops(device), IdentityRotary(head_dim, device)
        for module in self.hf.modules():
            if hasattr(module, "layer_idx"):  # attention layers (and some blocks) know their index
                module.tgi_ops, module.tgi_rotary = ops, rotary

    @property
    def kv_cache_specs(self) -> list[KVCacheSpec]:
        return self._specs

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        outputs = self.hf.base_model(input_ids=input_ids[None], position_ids=positions[None], use_cache=False)
        return outputs.last_hidden_state[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.hf.get_output_embeddings()(hidden).float()  # [n, vocab_size]
        softcap = getattr(self.config, "final_logit_softcapping", None)
        return logits if softcap is None else softcap * torch.tanh(logits / softcap)

"""What the runner, warmup and CUDA graphs rely on from a model: the `CausalLM` contract.

A model file builds its layers from the HF config, this rank's `TPGroup`, a dtype and a device, and
then offers exactly this. Everything a layer's KV cache needs (heads on this rank, head size, window,
softmax scale, logit soft-capping) is in its `KVCacheSpec`, so the runner sizes and allocates caches
for layers that differ from each other (Gemma's alternating windows) without reading the config.
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers import PretrainedConfig

from tgi_server.attention_metadata import KVCacheSpec
from tgi_server.weights import WeightSource


class CausalLM(Protocol):
    """A decoder-only language model over the paged KV cache, sharded over a tensor-parallel group."""

    config: PretrainedConfig
    # False where the forward is not capture-safe (the transformers fallback, any model on the portable
    # ops): the runner runs eagerly
    supports_cuda_graphs: bool

    @property
    def kv_cache_specs(self) -> list[KVCacheSpec]:
        """One per attention layer, indexed like the forward context's caches."""

    def load_weights(self, weights: WeightSource) -> None:
        """Fill every parameter with this rank's part of the HF-named checkpoint tensors (the
        transformers fallback has none: transformers loads its checkpoint when it is built)."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [num_tokens] int64, run inside `forward_context(attn, kv_caches)` with
        caches shaped by `kv_cache_specs`. Writes this step's K/V into the caches and returns hidden
        states [num_tokens, hidden_size]. No host syncs: it is captured in CUDA graphs. With pipeline
        stages (`TPGroup.stage`) a stage runs its own layers, receiving from and sending to its
        neighbours; only the last stage's hidden states are scored."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, hidden_size] -> logits [n, vocab_size] float32, the full vocab on every rank."""

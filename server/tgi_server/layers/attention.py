"""Paged attention: a per-layer KV cache of fixed-size blocks, addressed through block tables.

`PagedAttention` rotates q and k, writes k and v into its layer's cache, then attends, through the
backend chosen when it was built (`tgi_server.ops`). The step's metadata and caches come from the
forward context (`tgi_server.forward_context`), so model files pass only the tensors they compute.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from tgi_server import forward_context
from tgi_server.attention_metadata import KVCacheSpec
from tgi_server.layers.rotary import RotaryEmbedding
from tgi_server.ops import select_ops


def attention_head_dim(config: PretrainedConfig) -> int:
    """The config's `head_dim`, or hidden_size // num_attention_heads when it has none."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class PagedAttention(nn.Module):
    """Causal (optionally sliding-window, optionally soft-capped) attention of new tokens over their
    sequence's cached context.

    Head counts are per rank. Grouped-query attention: query head h reads kv head
    h // (num_heads // num_kv_heads). `layer_index` picks this layer's cache from the forward context.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        layer_index: int,
        device: torch.device,
        sliding_window: int | None = None,
        scale: float | None = None,
        logit_softcap: float | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.layer_index = layer_index
        self.kv_cache_spec = KVCacheSpec(
            num_kv_heads, head_dim, sliding_window, head_dim**-0.5 if scale is None else scale, logit_softcap
        )
        self.ops = select_ops(device)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: RotaryEmbedding,
        qk_norm: tuple[nn.Module, nn.Module] | None = None,
    ) -> torch.Tensor:
        """Norm q and k heads with `qk_norm` (two RMSNorm layers) if given, rotate them by
        `positions`, write k, v into this layer's cache at the step's slots, then attend.

        q [num_tokens, num_heads, head_dim]; k, v [num_tokens, num_kv_heads, head_dim] (q may be
        overwritten). Returns [num_tokens, num_heads, head_dim].
        """
        context = forward_context.current()
        kv_cache = context.kv_caches[self.layer_index]
        return self.ops.attention(q, k, v, positions, rotary, kv_cache, context.attn, self.kv_cache_spec, qk_norm)

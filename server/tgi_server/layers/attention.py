"""Paged attention: a per-layer KV cache of fixed-size blocks, addressed through block tables.

`PagedAttention.forward` rotates q and k, writes k and v into the cache, then attends. On CUDA it
runs two Triton kernels (`tgi_server.kernels`); elsewhere, the portable PyTorch path: a Python loop
over sequences with no device syncs, which is also the kernels' reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from tgi_server.attention_metadata import AttentionMetadata, KVCacheSpec
from tgi_server.kernels import use_kernels
from tgi_server.layers.rotary import RotaryEmbedding


def attention_head_dim(config: PretrainedConfig) -> int:
    """The config's `head_dim`, or hidden_size // num_attention_heads when it has none."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class PagedAttention(nn.Module):
    """Causal (optionally sliding-window) attention of new tokens over their sequence's cached context.

    Head counts are per rank. Grouped-query attention: query head h reads kv head
    h // (num_heads // num_kv_heads).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.sliding_window = sliding_window
        self.scale = head_dim**-0.5

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(self.num_kv_heads, self.head_dim, self.sliding_window, self.scale)

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        """Rotate q and k by `positions`, write k, v into `kv_cache` at `attn.slot_mapping`, then attend.

        q [num_tokens, num_heads, head_dim]; k, v [num_tokens, num_kv_heads, head_dim] (q may be
        overwritten); kv_cache shaped by `kv_cache_spec`. Returns [num_tokens, num_heads, head_dim].
        """
        if use_kernels(q):
            from tgi_server.kernels.attention import paged_attention
            from tgi_server.kernels.fused import rotary_and_write_cache

            rotary_and_write_cache(
                q, k, v, positions, rotary.inv_freq, rotary.attention_scaling, kv_cache, attn.slot_mapping
            )
            return paged_attention(q, kv_cache, attn, self.scale, self.sliding_window)
        q, k = rotary(positions, q, k)
        write_kv_cache(kv_cache, k, v, attn.slot_mapping)
        out = torch.empty_like(q)  # [num_tokens, num_heads, head_dim]
        starts = attn.query_start_loc_cpu
        for i, seq_len in enumerate(attn.seq_lens_cpu):
            context = gather_context(kv_cache, attn.block_tables[i], seq_len).to(q.dtype)
            out[starts[i] : starts[i + 1]] = self._attend(q[starts[i] : starts[i + 1]], context)
        return out

    def _attend(self, q: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """q [num_new, num_heads, head_dim] over context [2, seq_len, num_kv_heads, head_dim]."""
        mask = causal_mask(q.shape[0], context.shape[1], self.sliding_window, q.device)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            context[0].transpose(0, 1),
            context[1].transpose(0, 1),
            attn_mask=mask,
            scale=self.scale,
            enable_gqa=True,
        )  # [num_heads, num_new, head_dim]
        return out.transpose(0, 1)


def write_kv_cache(
    kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store each new token's k and v at its flat slot (block_id * block_size + offset), in the
    cache's dtype."""
    # [2, num_blocks * block_size, num_kv_heads, head_dim], a view: writes land in the cache
    slots = kv_cache.view(2, -1, *kv_cache.shape[3:])
    slots[0][slot_mapping] = k.to(kv_cache.dtype)  # (index_copy_ has no fp8 kernel on CPU)
    slots[1][slot_mapping] = v.to(kv_cache.dtype)


def gather_context(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first `seq_len` cached K/V of one sequence, in order: [2, seq_len, num_kv_heads, head_dim]."""
    num_blocks = -(-seq_len // kv_cache.shape[2])
    blocks = kv_cache[:, block_table[:num_blocks]]  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    return blocks.flatten(1, 2)[:, :seq_len]


def causal_mask(
    num_new: int, seq_len: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor:
    """[num_new, seq_len] bool: True where query row r (at position seq_len - num_new + r) may attend the key.

    A query at position p sees keys 0..p; with a sliding window only keys above p - window.
    """
    query_pos = torch.arange(seq_len - num_new, seq_len, device=device).unsqueeze(1)  # [num_new, 1]
    key_pos = torch.arange(seq_len, device=device).unsqueeze(0)  # [1, seq_len]
    mask = key_pos <= query_pos
    if sliding_window is not None:
        mask &= key_pos > query_pos - sliding_window
    return mask

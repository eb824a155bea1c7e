"""A decoder's self-attention block, as the in-project families share it: fused QKV projection,
optional per-head RMSNorm of queries and keys (QK-norm), rotary paged attention, output projection.

Model files map their config onto these arguments; tensor parallelism stays inside: each rank holds
whole KV heads and their groups of query heads, and the output projection all-reduces.
"""

from __future__ import annotations

import torch
from torch import nn

from tgi_server.distributed import TPGroup
from tgi_server.layers.attention import PagedAttention
from tgi_server.layers.linear import QKVParallelLinear, RowParallelLinear
from tgi_server.layers.norm import RMSNorm
from tgi_server.layers.rotary import RotaryEmbedding
from tgi_server.weights import WeightSource


class SelfAttention(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        layer_idx: int,
        rotary: RotaryEmbedding,
        tp: TPGroup,
        dtype: torch.dtype,
        device: torch.device,
        *,
        qkv_bias: bool = False,
        o_bias: bool = False,
        sliding_window: int | None = None,
        scale: float | None = None,
        logit_softcap: float | None = None,
        qk_norm_eps: float | None = None,
        qk_norm_offset: float = 0.0,
        fused_checkpoint: bool = False,
    ):
        """qk_norm_eps: RMSNorm each query and key head (with this eps, scaling by qk_norm_offset + w)
        before the rotation; None: no QK-norm. fused_checkpoint: q/k/v are one `qkv_proj` tensor."""
        super().__init__()
        self.head_dim = head_dim
        (q_start, q_stop), (kv_start, kv_stop) = tp.head_partition(num_heads, num_kv_heads)
        self.num_heads, self.num_kv_heads = q_stop - q_start, kv_stop - kv_start
        self.qkv_proj = QKVParallelLinear(hidden_size, head_dim, num_heads, num_kv_heads, qkv_bias, tp, dtype, device)
        o_inputs = (q_start * head_dim, q_stop * head_dim)  # this rank's heads
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden_size, o_bias, tp, dtype, device, input_range=o_inputs)
        self.is_fused_checkpoint = fused_checkpoint
        self.has_qk_norm = qk_norm_eps is not None
        if self.has_qk_norm:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps, dtype, device, weight_offset=qk_norm_offset)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps, dtype, device, weight_offset=qk_norm_offset)
        self.rotary = rotary
        self.attn = PagedAttention(
            self.num_heads, self.num_kv_heads, head_dim, layer_idx, device, sliding_window, scale, logit_softcap
        )

    def load(self, weights: WeightSource, prefix: str) -> None:
        if self.is_fused_checkpoint:
            self.qkv_proj.load_fused(weights, f"{prefix}.qkv_proj")
        else:
            self.qkv_proj.load(weights, [f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj"])
        self.o_proj.load(weights, f"{prefix}.o_proj")
        if self.has_qk_norm:
            self.q_norm.load(weights, f"{prefix}.q_norm.weight")
            self.k_norm.load(weights, f"{prefix}.k_norm.weight")

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """positions [num_tokens], hidden [num_tokens, hidden_size] -> [num_tokens, hidden_size]."""
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split(self.qkv_proj.output_sizes_per_rank, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        qk_norm = (self.q_norm, self.k_norm) if self.has_qk_norm else None
        out = self.attn(positions, q, k, v, self.rotary, qk_norm)  # [num_tokens, num_heads, head_dim]
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))

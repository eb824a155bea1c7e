"""Rotary position embedding at explicit positions (HF's non-interleaved rotate-half layout)."""

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def rope_frequencies(
    config: PretrainedConfig, head_dim: int, device: torch.device, layer_type: str | None = None
) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim // 2] float32, attention_scaling) for the config's `rope_parameters`, or
    for `rope_parameters[layer_type]` in configs whose layer types rotate differently (Gemma 3's
    local and global layers).

    Scaled variants (llama3, linear, yarn, ...) come from transformers' own table; the plain
    "default" type is not in that table and is computed here. Types that rescale with the running
    sequence length ("dynamic", "longrope") get their initial frequencies only.
    """
    rope_parameters = config.rope_parameters if layer_type is None else config.rope_parameters[layer_type]
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type not in ROPE_INIT_FUNCTIONS and rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
    if rope_type != "default":
        return ROPE_INIT_FUNCTIONS[rope_type](config, device, **({} if layer_type is None else {"layer_type": layer_type}))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim  # [head_dim // 2]
    return 1.0 / rope_parameters["rope_theta"] ** exponents, 1.0


class RotaryEmbedding(nn.Module):
    """Rotates q and k by their token positions; positions are explicit, so any batch layout works."""

    def __init__(self, config: PretrainedConfig, head_dim: int, device: torch.device, layer_type: str | None = None):
        super().__init__()
        inv_freq, self.attention_scaling = rope_frequencies(config, head_dim, device, layer_type)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [head_dim // 2]

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [num_tokens] int64; q [num_tokens, num_heads, head_dim];
        k [num_tokens, num_kv_heads, head_dim]. Returns the rotated (q, k), same shapes and dtypes."""
        angles = positions.unsqueeze(-1).float() * self.inv_freq  # [num_tokens, head_dim // 2]
        cos = (angles.cos() * self.attention_scaling).unsqueeze(1)  # [num_tokens, 1, head_dim // 2]
        sin = (angles.sin() * self.attention_scaling).unsqueeze(1)  # [num_tokens, 1, head_dim // 2]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with the first and second halves of head_dim as the pairs."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # [num_tokens, heads, head_dim]
    return rotated.to(x.dtype)

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
    "default" type is not in that table and is computed here. With a `partial_rotary_factor` below 1
    only the first head_dim * factor dims rotate (inv_freq is that long / 2). "dynamic" gets its
    initial frequencies only. "longrope" (Phi-3) takes its long factors whenever the model's context
    exceeds the original one, as vLLM does: every token of a sequence rotates the same way whatever
    the sequence's length (transformers switches factors at the original length and recomputes the
    cache).
    """
    rope_parameters = config.rope_parameters if layer_type is None else config.rope_parameters[layer_type]
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type not in ROPE_INIT_FUNCTIONS and rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
    kwargs = {} if layer_type is None else {"layer_type": layer_type}
    if rope_type == "longrope":
        kwargs["seq_len"] = config.max_position_embeddings
    if rope_type != "default":
        return ROPE_INIT_FUNCTIONS[rope_type](config, device, **kwargs)
    rotary_dim = int(head_dim * rope_parameters.get("partial_rotary_factor", 1.0))
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim  # [rotary_dim // 2]
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
        angles = positions.unsqueeze(-1).float() * self.inv_freq  # [num_tokens, rotary_dim // 2]
        cos = (angles.cos() * self.attention_scaling).unsqueeze(1)  # [num_tokens, 1, rotary_dim // 2]
        sin = (angles.sin() * self.attention_scaling).unsqueeze(1)  # [num_tokens, 1, rotary_dim // 2]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin over the first rotary_dim dims of each head (the first and
    second halves of those as the pairs); the rest pass through."""
    rotary_dim = 2 * cos.shape[-1]
    x1, x2 = x[..., :rotary_dim].float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)  # [num_tokens, heads, rotary_dim]
    return rotated if rotary_dim == x.shape[-1] else torch.cat((rotated, x[..., rotary_dim:]), dim=-1)

"""Activations of gated MLPs, with the backend chosen here rather than in each model file."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tgi_server.kernels import use_kernels


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's silu(gate) * up of [num_tokens, 2 * width] (gate first) -> [num_tokens, width]; one
    Triton kernel on CUDA."""
    if use_kernels(gate_up):
        from tgi_server.kernels.fused import silu_and_mul as fused_silu_and_mul

        return fused_silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up

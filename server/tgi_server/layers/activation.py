"""The gated activation of an MLP (SwiGLU, GeGLU), with its backend chosen when the model is built."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from tgi_server.ops import select_ops

# HF `hidden_act` / `hidden_activation` names -> the backends' activation
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


def config_activation(config: PretrainedConfig) -> str:
    """The backends' name for the config's MLP activation; ValueError naming the field otherwise."""
    name = getattr(config, "hidden_activation", None) or config.hidden_act
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported; supported: {', '.join(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


class GatedActivation:
    """act(gate) * up of the fused [gate | up] projection: [num_tokens, 2 * width] -> [num_tokens, width].

    A plain callable, not an nn.Module: it holds no weights, and a module call costs microseconds per
    layer in every eager step.
    """

    def __init__(self, activation: str, device: torch.device):
        self.activation = activation
        self.ops = select_ops(device)

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.ops.gated_activation(gate_up, self.activation)

"""RMSNorm, computed in float32 like the reference implementations."""

import torch
from torch import nn

from tgi_server.ops import select_ops
from tgi_server.weights import WeightSource


class RMSNorm(nn.Module):
    """x / rms(x) * (weight_offset + weight) over the last dim; the weight is replicated on every rank.

    weight_offset is 0 for Llama-style norms and 1 for Gemma's, whose checkpoints store w for a
    scale of 1 + w.
    """

    def __init__(
        self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device, weight_offset: float = 0.0
    ):
        super().__init__()
        self.eps = eps
        self.weight_offset = weight_offset
        self.ops = select_ops(device)
        # [hidden_size]
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)

    @torch.no_grad()
    def load(self, weights: WeightSource, name: str) -> None:
        """Read the whole scale vector `name`."""
        self.weight.copy_(weights.get(name, tuple(self.weight.shape)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden_size] -> same shape and dtype."""
        return self.ops.rms_norm(x, self.weight, self.eps, None, self.weight_offset)[0]

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual stream of a pre-norm block, in one kernel on GPU."""
        return self.ops.rms_norm(x, self.weight, self.eps, residual, self.weight_offset)

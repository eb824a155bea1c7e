"""RMSNorm, computed in float32 like the reference implementation."""

import torch
from torch import nn

from tgi_server.kernels import use_kernels
from tgi_server.weights import WeightSource


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim; the weight is replicated on every rank."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.eps = eps
        # [hidden_size]
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)

    @torch.no_grad()
    def load(self, weights: WeightSource, name: str) -> None:
        """Read the whole scale vector `name`."""
        self.weight.copy_(weights.get(name, tuple(self.weight.shape)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden_size] -> same shape and dtype."""
        if use_kernels(x):
            from tgi_server.kernels.fused import rms_norm

            return rms_norm(x, self.weight, self.eps)[0]
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual stream of a pre-norm block, in one kernel on GPU."""
        if use_kernels(x):
            from tgi_server.kernels.fused import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        total = x + residual
        return self(total), total

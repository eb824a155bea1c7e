"""Mixture-of-experts MLP: a replicated router and every expert's gated MLP in one fused op.

Tensor parallelism splits each expert's intermediate dimension across ranks (every rank holds a
slice of every expert), so each rank's fused op returns a partial sum of the down projections and
one all-reduce completes it, as for a dense MLP.
"""

from __future__ import annotations

import torch
from torch import nn

from tgi_server.distributed import TPGroup
from tgi_server.ops import select_ops
from tgi_server.weights import WeightSource


class FusedMoE(nn.Module):
    """All experts of one layer: w13 [num_experts, 2 * width_per_rank, hidden] ([gate | up] rows) and
    w2 [num_experts, hidden, width_per_rank]."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        renormalize: bool,
        activation: str,
        tp: TPGroup,
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__()
        self.tp = tp
        self.top_k, self.renormalize, self.activation = top_k, renormalize, activation
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.width_range = tp.partition(intermediate_size)
        width = self.width_range[1] - self.width_range[0]
        self.ops = select_ops(device)
        # [num_experts, 2 * width, hidden_size]
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * width, hidden_size, dtype=dtype, device=device), requires_grad=False)
        # [num_experts, hidden_size, width]
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, width, dtype=dtype, device=device), requires_grad=False)

    @torch.no_grad()
    def load(self, weights: WeightSource, prefix: str, names: tuple[str, str, str]) -> None:
        """Read expert e's `{prefix}.{e}.{gate|up|down}.weight` (names in that order): this rank's
        rows of gate and up, its columns of down."""
        gate, up, down = names
        start, stop = self.width_range
        square = (self.intermediate_size, self.hidden_size)
        for e in range(self.w13.shape[0]):
            expert = f"{prefix}.{e}"
            self.w13[e].copy_(torch.cat([
                weights.get_range(f"{expert}.{gate}.weight", 0, start, stop, square),
                weights.get_range(f"{expert}.{up}.weight", 0, start, stop, square),
            ]))
            self.w2[e].copy_(weights.get_range(f"{expert}.{down}.weight", 1, start, stop, square[::-1]))

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """hidden [num_tokens, hidden_size], router_logits [num_tokens, num_experts] -> the weighted sum
        of the chosen experts' outputs, [num_tokens, hidden_size], the same on every rank."""
        topk_weights, topk_ids = self.ops.route_experts(router_logits, self.top_k, self.renormalize)
        out = self.ops.fused_moe(hidden, self.w13, self.w2, topk_weights, topk_ids, self.activation)
        return self.tp.all_reduce(out)

"""Vocab-parallel token embedding and LM head.

Both split the vocabulary in ranges of ceil(vocab_size / world_size) rows; the last rank's
range is padded with zero rows, so every rank holds a weight of the same shape and a tied
LM head can share the embedding's parameter.
"""

import torch
import torch.nn.functional as F
from torch import nn

from tgi_server.distributed import TPGroup, shard_range
from tgi_server.ops import select_ops
from tgi_server.weights import WeightSource


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocab split across ranks; ids outside a rank's range embed to zero."""

    def __init__(
        self, vocab_size: int, hidden_size: int, tp: TPGroup, dtype: torch.dtype, device: torch.device
    ):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.vocab_start, self.vocab_stop = shard_range(vocab_size, tp.rank, tp.world_size)
        num_rows = -(-vocab_size // tp.world_size)
        # [num_rows, hidden_size]: this rank's vocab range, zero-padded on the last rank
        self.weight = nn.Parameter(
            torch.zeros(num_rows, hidden_size, dtype=dtype, device=device), requires_grad=False
        )

    @torch.no_grad()
    def load(self, weights: WeightSource, name: str) -> None:
        """Read this rank's vocab rows of tensor `name`; padding rows stay zero."""
        shard = weights.get_range(name, 0, self.vocab_start, self.vocab_stop, (self.vocab_size, self.weight.shape[1]))
        self.weight[: shard.shape[0]].copy_(shard)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[num_tokens] int64 -> [num_tokens, hidden_size], identical on all ranks."""
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)
        is_local = (input_ids >= self.vocab_start) & (input_ids < self.vocab_stop)  # [num_tokens]
        local_ids = torch.where(is_local, input_ids - self.vocab_start, 0)  # [num_tokens]
        embeddings = F.embedding(local_ids, self.weight) * is_local.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(embeddings)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to the vocab: each rank scores its vocab range, then the ranges are gathered."""

    def __init__(
        self, vocab_size: int, hidden_size: int, tp: TPGroup, dtype: torch.dtype, device: torch.device
    ):
        super().__init__(vocab_size, hidden_size, tp, dtype, device)
        self.ops = select_ops(device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden_size] -> [num_tokens, vocab_size] logits, the full vocab on every rank."""
        local_logits = self.ops.linear(hidden, self.weight)  # [num_tokens, num_rows]
        return self.tp.all_gather_last_dim(local_logits)[:, : self.vocab_size]

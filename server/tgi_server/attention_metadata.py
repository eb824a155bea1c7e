"""The paged KV cache's layout per layer (`KVCacheSpec`) and the per-step description of where new
tokens go in it (`AttentionMetadata`), shared by the portable layers, the Triton kernels, CUDA graphs
and the runner (their own module, so kernels stay leaves)."""

from __future__ import annotations

import math

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the paged KV cache and what each sequence attends to.

    The new tokens of a sequence are always its last ones: sequence i's queries sit at positions
    seq_lens[i] - num_new .. seq_lens[i] - 1, so prefill, chunked-prefill continuation and decode
    are one case.
    """

    # [num_tokens] int64: flat KV slot = block_id * block_size + offset, for each new token
    slot_mapping: torch.Tensor
    # [num_seqs + 1] int32: tokens of sequence i are rows [q[i], q[i+1]) of the flat batch
    query_start_loc: torch.Tensor
    # [num_seqs] int32: context length of each sequence after this step (cached + new)
    seq_lens: torch.Tensor
    # [num_seqs, max_blocks_per_seq] int32, padded with 0
    block_tables: torch.Tensor
    # same values as python lists, so the portable path needs no device syncs
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # the most new tokens of any one sequence (1 when every sequence decodes)
    max_query_len: int
    # what kernels derive from the above once per step and share across layers
    derived: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_host(cls, slot_mapping, query_start_loc: list[int], seq_lens: list[int], block_tables, device) -> AttentionMetadata:
        """A step's metadata on `device` from host values: slot_mapping [num_tokens] and
        block_tables [num_seqs, max_blocks] as lists, numpy arrays or CPU tensors."""
        return cls(
            slot_mapping=torch.as_tensor(slot_mapping, dtype=torch.int64).to(device),
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.as_tensor(block_tables, dtype=torch.int32).to(device),
            query_start_loc_cpu=list(query_start_loc),
            seq_lens_cpu=list(seq_lens),
            max_query_len=max(b - a for a, b in zip(query_start_loc, query_start_loc[1:])),
        )


@dataclass(frozen=True)
class KVCacheSpec:
    """One attention layer's cache on this rank, and how its queries attend to it."""

    num_kv_heads: int  # on this rank
    head_dim: int
    sliding_window: int | None  # keys further back than this are not attended; None: all of them
    scale: float  # softmax scale of q·k
    logit_softcap: float | None = None  # tanh soft-capping of attention scores (Gemma 2); None: off

    def shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """(2, num_blocks, block_size, num_kv_heads, head_dim): index 0 of the first dim holds K, 1 holds V."""
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)


def allocate_kv_caches(specs: list[KVCacheSpec], num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device) -> list[torch.Tensor]:
    """A zeroed cache per attention layer, each [2, num_blocks, block_size, num_kv_heads, head_dim]."""
    return [torch.zeros(spec.shape(num_blocks, block_size), dtype=dtype, device=device) for spec in specs]


def kv_cache_bytes_per_block(specs: list[KVCacheSpec], block_size: int, dtype: torch.dtype) -> int:
    """What one block costs across every layer's cache."""
    return sum(math.prod(spec.shape(1, block_size)) for spec in specs) * dtype.itemsize

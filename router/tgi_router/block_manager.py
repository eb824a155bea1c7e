"""Paged KV cache bookkeeping: which fixed-size blocks are free.

The shards hold the memory; the router decides which block ids each request owns. Block 0 is never
handed out: shards use it as padding (e.g. for CUDA-graph batch slots).
"""

from __future__ import annotations


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.block_size = block_size
        self.num_usable_blocks = num_blocks - 1
        # Popped from the end, so low ids go first.
        self._free = list(range(num_blocks - 1, 0, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_usable_blocks * self.block_size

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Takes `num_blocks` blocks, or none at all (returns None) if that many are not free."""
        if num_blocks > len(self._free):
            return None
        taken = self._free[len(self._free) - num_blocks :]
        del self._free[len(self._free) - num_blocks :]
        return taken[::-1]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(reversed(block_ids))

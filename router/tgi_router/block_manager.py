"""Paged KV cache bookkeeping: which fixed-size blocks are free, which are shared, which hold a known
prefix.

The shards hold the memory; the router decides which block ids each request owns. Block 0 is never
handed out: shards use it as padding (e.g. for CUDA-graph batch slots).

Prefix caching: a full block whose KV is computed is identified by `block_hash`, a SHA-256 chained
over every token id from the start of the sequence up to the block's end (so equal hashes mean equal
token prefixes, not merely equal blocks; a collision would need a SHA-256 collision). Requests that
start with the same tokens share those blocks by reference count. A block nobody references is free,
but keeps its KV and stays findable until it is handed out again: free blocks are reused in LRU
order, blocks without cached KV first, and a sequence's tail blocks before its head (heads are the
most shared prefixes).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

# The parent of a sequence's first block.
ROOT_HASH = b""


def root_hash(adapter_id: int) -> bytes:
    """The parent of the first block of a sequence computed through LoRA adapter `adapter_id` (its KV
    differs from the base model's; 0: the base model, ROOT_HASH). Adapter ids are never reused, so
    an adapter unloaded and loaded again finds none of its old blocks."""
    return ROOT_HASH if not adapter_id else hashlib.sha256(b"lora-adapter:%d" % adapter_id).digest()


def block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The hash of a block holding `token_ids` after the blocks whose chained hash is `parent`."""
    return hashlib.sha256(parent + array("I", token_ids).tobytes()).digest()


def extend_block_hashes(hashes: list[bytes], token_ids: Sequence[int], num_blocks: int, block_size: int,
                        adapter_id: int) -> list[bytes]:
    """Appends to `hashes` (the chained hashes of the first blocks of `token_ids`, through adapter
    `adapter_id`) until it holds the first `num_blocks`; returns it."""
    while len(hashes) < num_blocks:
        start = len(hashes) * block_size
        hashes.append(block_hash(hashes[-1] if hashes else root_hash(adapter_id), token_ids[start : start + block_size]))
    return hashes


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.block_size = block_size
        self.num_usable_blocks = num_blocks - 1
        # Blocks no request references, in the order they are handed out (the first first).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self._num_refs = [0] * num_blocks
        # Cached KV: hash -> block, and back.
        self._block_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self.num_cached_free_blocks = 0  # free blocks that still hold cached KV

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out, cached ones (evicted on the way) included."""
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_usable_blocks * self.block_size

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Takes `num_blocks` blocks, or none at all (returns None) if that many are not free. Cached
        KV in the blocks taken is forgotten."""
        if num_blocks > len(self._free):
            return None
        taken = [self._free.popitem(last=False)[0] for _ in range(num_blocks)]
        for block in taken:
            self._num_refs[block] = 1
            cached = self._hash_of.pop(block, None)
            if cached is not None:
                del self._block_of[cached]
                self.num_cached_free_blocks -= 1
        return taken

    def free(self, block_ids: list[int]) -> None:
        """Drops one reference to each block (a request's table, in order). Unreferenced blocks become
        free: those without cached KV are reused first, cached ones last, a table's tail before its head."""
        for block in reversed(block_ids):
            self._num_refs[block] -= 1
            if self._num_refs[block] > 0:
                continue
            self._free[block] = None
            if block in self._hash_of:
                self.num_cached_free_blocks += 1
            else:
                self._free.move_to_end(block, last=False)

    def cached_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """The blocks holding the longest cached prefix of the chained `hashes` (not taken)."""
        blocks = []
        for value in hashes:
            block = self._block_of.get(value)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def num_free_among(self, block_ids: list[int]) -> int:
        """How many of these cached blocks are free: taking them leaves that many fewer free blocks."""
        return sum(1 for block in block_ids if self._num_refs[block] == 0)

    def take(self, block_ids: list[int]) -> None:
        """Adds a reference to each of these cached blocks (a request starting with their prefix)."""
        for block in block_ids:
            if self._num_refs[block] == 0:
                del self._free[block]
                self.num_cached_free_blocks -= 1
            self._num_refs[block] += 1

    def cache(self, block: int, value: bytes) -> None:
        """Records that `block` (full, its KV computed) is the one of hash `value`. A prefix already
        cached in another block keeps that block (this one stays private to its request)."""
        if value not in self._block_of and block not in self._hash_of:
            self._block_of[value] = block
            self._hash_of[block] = value

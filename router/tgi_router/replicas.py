"""Data-parallel replicas behind one HTTP front (`--data-parallel-size`).

Each replica is a whole engine: its own shards (a tensor-parallel group of GPUs), KV cache, scheduler
and step loop; they share the tokenizer, the validation and the metrics. `Replicas` stands where the
router keeps its engine and sends each request to one replica: the least loaded (requests waiting or
running), unless another replica already caches a longer prefix of the prompt (a conversation's
earlier turns, a shared system prompt) and is not much busier: `BALANCE_SLACK` requests more at most,
so a hot prefix cannot pile every request onto one replica.
"""

from __future__ import annotations

import asyncio

from tgi_router.block_manager import extend_block_hashes
from tgi_router.engine import Engine, GenerationInput, RequestStream
from tgi_router.errors import InferError

# How many more requests than the least loaded replica a replica holding the longest cached prefix may
# have and still get the request.
BALANCE_SLACK = 8


class Replicas:
    def __init__(self, engines: list[Engine]):
        self.engines = engines
        self.metrics = engines[0].metrics  # shared
        self.shards = _AllShards([engine.shards for engine in engines])

    def submit(self, generation: GenerationInput) -> RequestStream:
        return self.choose(generation).submit(generation)

    def choose(self, generation: GenerationInput) -> Engine:
        loads = [engine.scheduler.num_requests for engine in self.engines]
        block_size = self.engines[0].scheduler.blocks.block_size
        ids = generation.input_ids
        # the whole blocks a prompt can reuse (its last token is always computed)
        hashes = extend_block_hashes([], ids, (len(ids) - 1) // block_size, block_size, generation.adapter_id)
        candidates = [index for index, load in enumerate(loads) if load <= min(loads) + BALANCE_SLACK]
        best = max(candidates, key=lambda index: (self.engines[index].scheduler.num_cached_blocks(hashes), -loads[index]))
        return self.engines[best]

    def fail_all(self, error: InferError) -> None:
        for engine in self.engines:
            engine.fail_all(error)

    async def run(self) -> None:
        await asyncio.gather(*(engine.run() for engine in self.engines))

    async def wait_for_sent_steps(self) -> None:
        await asyncio.gather(*(engine.wait_for_sent_steps() for engine in self.engines))


class _AllShards:
    """The shard calls the HTTP routes make, sent to every replica's shards."""

    def __init__(self, clients: list):
        self.clients = clients

    async def health(self) -> None:
        await asyncio.gather(*(client.health() for client in self.clients))

    async def load_adapter(self, adapter_id: int, name: str, path: str) -> int:
        ranks = await asyncio.gather(*(client.load_adapter(adapter_id, name, path) for client in self.clients))
        return ranks[0]

    async def unload_adapter(self, adapter_id: int) -> None:
        await asyncio.gather(*(client.unload_adapter(adapter_id) for client in self.clients))

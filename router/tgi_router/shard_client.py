"""gRPC client for the shards: every call goes to all ranks with the same payload.

Ranks run collectives inside a step, so they must all get every call, in the same order. Rank 0's
answer is the batch's answer (the proto says only rank 0 fills samples); a failure on any rank fails
the call.
"""

from __future__ import annotations

import asyncio

import grpc

from tgi_proto.generate.v1 import generate_pb2 as pb
from tgi_proto.generate.v1 import generate_pb2_grpc as pb_grpc
from tgi_router import convert
from tgi_router.request import StepPlan, StepResult

# Large prompts and vocabularies make big messages.
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]


class ShardError(Exception):
    """A shard call failed; the message names the call and the shard's reason."""


class ShardClient:
    def __init__(self, uds_path: str, num_shards: int):
        self.socket_paths = [f"{uds_path}-{rank}" for rank in range(num_shards)]
        self._channels = [grpc.aio.insecure_channel(f"unix://{p}", options=_CHANNEL_OPTIONS) for p in self.socket_paths]
        self._stubs = [pb_grpc.TextGenerationServiceStub(c) for c in self._channels]

    async def info(self) -> pb.InfoResponse:
        return (await self._all("Info", pb.InfoRequest()))[0]

    async def health(self) -> None:
        await self._all("Health", pb.HealthRequest())

    async def clear_cache(self) -> None:
        await self._all("ClearCache", pb.ClearCacheRequest())

    async def warmup(self, request: pb.WarmupRequest) -> pb.WarmupResponse:
        responses = await self._all("Warmup", request)
        # Ranks may size their caches differently; every rank can hold the smallest.
        return min(responses, key=lambda r: r.num_blocks)

    async def step(self, plan: StepPlan) -> StepResult:
        responses = await self._all("Step", convert.step_request(plan))
        return convert.step_result(responses[0])

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))

    async def _all(self, method: str, request):
        calls = [getattr(stub, method)(request) for stub in self._stubs]
        results = await asyncio.gather(*calls, return_exceptions=True)
        for rank, result in enumerate(results):
            if isinstance(result, grpc.aio.AioRpcError):
                raise ShardError(f"{method} failed on shard {rank}: {result.details()}") from result
            if isinstance(result, BaseException):
                raise result
        return results

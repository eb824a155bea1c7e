"""gRPC client for the shards: every call goes to all ranks with the same payload.

Ranks run collectives inside a step, so they must all get every call, in the same order. Rank 0's
answer is the batch's answer (the proto says only rank 0 fills samples; with pipeline stages, the last
stage's first rank); a failure on any rank fails
the call at once: the other ranks may be blocked in a collective waiting for the failed one, and
their calls are cancelled rather than awaited.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import grpc

from tgi_proto.generate.v1 import generate_pb2 as pb
from tgi_proto.generate.v1 import generate_pb2_grpc as pb_grpc
from tgi_router import convert
from tgi_router.request import StepPlan, StepResult

# After one shard's call fails, how long the others' calls may take to fail too (see `ShardClient._gather`).
CULPRIT_GRACE_SECONDS = 1.0
# Large prompts and vocabularies make big messages.
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]


class ShardError(Exception):
    """A shard call failed; the message names the call and the shard's reason."""


class ShardClient:
    def __init__(self, targets: list[str], secret: str | None = None, answering_rank: int = 0):
        """`targets`: each shard's gRPC address in rank order (`unix:PATH`, `HOST:PORT`); `secret`: sent
        as `authorization: Bearer <secret>` on every call (shards serving on TCP refuse calls without it);
        `answering_rank`: the shard whose step responses carry the samples (the last pipeline stage's first)."""
        self.targets = targets
        self.answering_rank = answering_rank
        self._channels = [grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS) for target in targets]
        self._stubs = [pb_grpc.TextGenerationServiceStub(c) for c in self._channels]
        self._metadata = (("authorization", f"Bearer {secret}"),) if secret else ()

    async def info(self) -> pb.InfoResponse:
        return (await self._all("Info", pb.InfoRequest()))[0]

    async def health(self) -> None:
        await self._all("Health", pb.HealthRequest())

    async def clear_cache(self) -> None:
        await self._all("ClearCache", pb.ClearCacheRequest())

    async def load_adapter(self, adapter_id: int, name: str, path: str) -> int:
        """Every shard reads the LoRA adapter at `path` as `adapter_id`; returns its rank. ShardError
        with the shard's reason (e.g. an adapter that does not fit), after which no shard keeps it."""
        request = pb.LoadAdapterRequest(adapter_id=adapter_id, name=name, path=path)
        # Not _all: every shard finishes reading (none is cancelled half-way) before the clean-up.
        results = await asyncio.gather(*(stub.LoadAdapter(request, metadata=self._metadata) for stub in self._stubs),
                                       return_exceptions=True)
        errors = [error for error in results if isinstance(error, BaseException)]
        if errors:
            await self.unload_adapter(adapter_id)
            error = errors[0]
            raise ShardError(error.details() if isinstance(error, grpc.aio.AioRpcError) else repr(error)) from error
        return results[0].rank

    async def unload_adapter(self, adapter_id: int) -> None:
        await self._all("UnloadAdapter", pb.UnloadAdapterRequest(adapter_id=adapter_id))

    async def warmup(self, request: pb.WarmupRequest) -> pb.WarmupResponse:
        responses = await self._all("Warmup", request)
        # Ranks may size their caches differently; every rank can hold the smallest.
        return min(responses, key=lambda r: r.num_blocks)

    def step(self, plan: StepPlan, metadata: list[tuple[str, str]] | None = None) -> Awaitable[StepResult]:
        """Sends the step to every shard before returning (the engine does Python work for the last
        step while this one runs); the awaitable gives rank 0's result. `metadata`: the gRPC call's
        (a trace context, with tracing)."""
        return self._step_result(self._start("Step", convert.step_request(plan), metadata))

    async def step_masks(self, step_id: int, masks: dict[int, bytes]) -> None:
        """The grammar masks of a step sent with `masked_ids`, to every shard."""
        await self._all("StepMasks", convert.step_masks(step_id, masks))

    async def _step_result(self, calls: list) -> StepResult:
        responses = await self._gather("Step", calls)
        return convert.step_result(responses[self.answering_rank])

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))

    async def _all(self, method: str, request):
        return await self._gather(method, self._start(method, request))

    def _start(self, method: str, request, metadata: list[tuple[str, str]] | None = None) -> list:
        """Starts the call on every rank (grpc.aio sends it on the event loop's next turn)."""
        metadata = (*self._metadata, *(metadata or ()))
        return [asyncio.ensure_future(getattr(stub, method)(request, metadata=metadata)) for stub in self._stubs]

    async def _gather(self, method: str, calls: list):
        """The calls' results in rank order; on a failure, ShardError naming the shard to blame. When a
        shard dies, the others' calls fail too (their collective lost a peer), at about the same time:
        after the first failure the rest get `CULPRIT_GRACE_SECONDS` to fail, and a shard that cannot be
        reached (UNAVAILABLE: its process is gone) is named before one whose call raised."""
        try:
            done, pending = await asyncio.wait(calls, return_when=asyncio.FIRST_EXCEPTION)
            if pending and any(not call.cancelled() and call.exception() is not None for call in done):
                await asyncio.wait(pending, timeout=CULPRIT_GRACE_SECONDS)
        finally:
            for call in calls:
                call.cancel()
        errors = [(rank, call.exception()) for rank, call in enumerate(calls)
                  if call.done() and not call.cancelled() and call.exception() is not None]
        if errors:
            rank, error = min(errors, key=lambda item: not _is_unreachable(item[1]))  # the first such rank
            if isinstance(error, grpc.aio.AioRpcError):
                raise ShardError(f"{method} failed on shard {rank}: {error.details()}") from error
            raise error
        return [call.result() for call in calls]


def _is_unreachable(error: BaseException) -> bool:
    return isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.UNAVAILABLE

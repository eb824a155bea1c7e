"""The engine turns a step's tokens into one event each, and a step that returns several tokens for
a request (as one that verified proposed tokens does) is cut exactly where the request ends: by
length, end of sequence or a stop sequence, never a token past it. Fake shards, a real tokenizer."""

from __future__ import annotations

import asyncio

import pytest
from tokenizer_fixtures import byte_level_dir  # noqa: F401 (fixture)

from tgi_router.block_manager import BlockManager
from tgi_router.engine import Engine, GenerationInput
from tgi_router.metrics import Metrics
from tgi_router.request import FinishReason, Sample, SampledToken, StepResult
from tgi_router.scheduler import Scheduler, SchedulerConfig
from tgi_router.tokenizer import Tokenizer

BLOCK_SIZE = 4


class ChunkedShards:
    """Answers each step with the next `per_step` tokens of `script` for every request that samples."""

    def __init__(self, script: list[int], per_step: int):
        self.script, self.per_step = script, per_step
        self.position: dict[int, int] = {}

    async def step(self, plan) -> StepResult:
        samples = []
        for chunk in plan.scheduled:
            request = chunk.request
            if request.num_computed_tokens + chunk.num_tokens == request.num_tokens:
                start = self.position.get(request.id, 0)
                self.position[request.id] = start + self.per_step
                tokens = self.script[start:start + self.per_step]
                samples.append(Sample(request.id, tuple(SampledToken(t, -0.25) for t in tokens)))
        return StepResult(samples)


@pytest.fixture(scope="module")
def tokenizer(byte_level_dir):  # noqa: F811
    return Tokenizer.from_dir(byte_level_dir)


async def events_of(tokenizer, script: list[int], generation: GenerationInput, per_step: int = 3):
    blocks = BlockManager(64, BLOCK_SIZE)
    scheduler = Scheduler(SchedulerConfig(max_batch_prefill_tokens=64, max_batch_size=8), blocks)
    engine = Engine(scheduler, ChunkedShards(script, per_step), tokenizer, Metrics(32, 64, blocks.capacity_tokens))
    task = asyncio.create_task(engine.run())
    try:
        stream = engine.submit(generation)
        events = await asyncio.wait_for(_collect(stream), 5)
    finally:
        task.cancel()
    assert blocks.num_free_blocks == blocks.num_usable_blocks and not scheduler.has_work
    return events, stream.request


async def _collect(stream):
    return [event async for event in stream]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


async def test_every_token_of_a_multi_token_step_is_its_own_event(tokenizer):
    script = _ids(tokenizer, "abcdefg")  # 6 tokens: 2 steps of 3
    events, request = await events_of(tokenizer, script, GenerationInput([1, 2, 3], max_new_tokens=6, ignore_eos=True))
    assert [e.token.id for e in events] == script == request.output_token_ids
    assert [e.finish_reason for e in events] == [None] * 5 + [FinishReason.LENGTH]
    assert events[-1].generated_text == "abcdefg"


async def test_a_stop_sequence_inside_a_multi_token_step_ends_the_request_at_its_token(tokenizer):
    script = _ids(tokenizer, "ab STOP cdefgh")
    generation = GenerationInput([1, 2, 3], max_new_tokens=20, ignore_eos=True, stop_sequences=("STOP",))
    events, request = await events_of(tokenizer, script, generation, per_step=4)
    stop_index = len(_ids(tokenizer, "ab STOP")) - 1
    assert [e.token.id for e in events] == script[: stop_index + 1] == request.output_token_ids
    assert events[-1].finish_reason == FinishReason.STOP_SEQUENCE and events[-1].generated_text == "ab STOP"  # TGI keeps the stop sequence


async def test_an_end_of_sequence_token_inside_a_multi_token_step_is_the_last_event(tokenizer):
    (eos,) = tokenizer.eos_token_ids
    script = [*_ids(tokenizer, "ab"), eos, *_ids(tokenizer, "cd")]
    events, request = await events_of(tokenizer, script, GenerationInput([1, 2, 3], max_new_tokens=20), per_step=5)
    assert [e.token.id for e in events] == script[:3] == request.output_token_ids
    assert events[-1].finish_reason == FinishReason.EOS_TOKEN

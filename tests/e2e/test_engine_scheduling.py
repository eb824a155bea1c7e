"""Continuous batching with a real shard process (tiny random Llama) driven by the router's engine
in-process, so tests can read the step count and the block allocator."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import time

import pytest
from server_helpers import save_tiny_model, tiny_config

from tgi_proto.generate.v1 import generate_pb2 as pb
from tgi_router.block_manager import BlockManager
from tgi_router.engine import Engine, GenerationInput
from tgi_router.metrics import Metrics
from tgi_router.request import SamplingParams
from tgi_router.scheduler import Scheduler, SchedulerConfig
from tgi_router.shard_client import ShardClient
from tgi_router.tokenizer import Tokenizer

PREFILL_TOKENS = 64


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smollm2_tokenizer_dir):
    return save_tiny_model(tiny_config("llama"), smollm2_tokenizer_dir, tmp_path_factory.mktemp("engine") / "llama")


@pytest.fixture(scope="module")
def shard(tiny_llama, tmp_path_factory):
    """One shard process serving the tiny model; yields its socket prefix."""
    uds = str(tmp_path_factory.mktemp("sock") / "shard")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tgi_server", "serve", str(tiny_llama), "--shard-uds-path", uds], env=env
    )
    deadline = time.monotonic() + 120
    while not os.path.exists(uds + "-0"):
        assert process.poll() is None, "shard exited during startup"
        assert time.monotonic() < deadline, "shard not ready"
        time.sleep(0.2)
    yield uds
    process.terminate()
    process.wait(timeout=30)


@contextlib.asynccontextmanager
async def running_engine(uds: str, tokenizer_dir, max_batch_total_tokens: int = 4096, max_batch_size: int = 16,
                         prefix_caching: bool = True):
    shards = ShardClient([f"unix:{uds}-0"])
    await shards.clear_cache()
    warmed = await shards.warmup(
        pb.WarmupRequest(
            max_batch_prefill_tokens=PREFILL_TOKENS,
            max_total_tokens=PREFILL_TOKENS,
            max_batch_size=max_batch_size,
            max_batch_total_tokens=max_batch_total_tokens,
        )
    )
    scheduler = Scheduler(SchedulerConfig(PREFILL_TOKENS, max_batch_size, prefix_caching),
                          BlockManager(warmed.num_blocks, warmed.block_size))
    metrics = Metrics(PREFILL_TOKENS, PREFILL_TOKENS, scheduler.blocks.capacity_tokens)
    engine = Engine(scheduler, shards, Tokenizer.from_dir(str(tokenizer_dir)), metrics)
    task = asyncio.create_task(engine.run())
    try:
        yield engine
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await shards.close()


def fixed_length(input_ids, num_tokens, sampling=SamplingParams()):
    return GenerationInput(input_ids=input_ids, max_new_tokens=num_tokens, sampling=sampling, ignore_eos=True)


async def token_ids(stream) -> list[int]:
    return [event.token.id async for event in stream]


PROMPTS = [[1, 100, 200, 300], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [1, 42], [1] + list(range(500, 530))]


async def test_concurrent_requests_take_max_not_sum_of_lengths_steps(shard, tiny_llama):
    lengths = [3, 7, 12, 5]
    async with running_engine(shard, tiny_llama) as engine:
        streams = [engine.submit(fixed_length(p, n)) for p, n in zip(PROMPTS, lengths)]
        outputs = await asyncio.gather(*(token_ids(s) for s in streams))
    assert [len(o) for o in outputs] == lengths
    assert engine.num_steps == max(lengths)


async def test_request_sent_mid_generation_gets_first_token_before_earlier_one_finishes(shard, tiny_llama):
    order = []
    async with running_engine(shard, tiny_llama) as engine:

        async def consume(name, stream):
            async for event in stream:
                order.append((name, event.finish_reason is not None))

        first = asyncio.create_task(consume("a", engine.submit(fixed_length(PROMPTS[0], 40))))
        async with asyncio.timeout(30):
            while len(order) < 5:
                await asyncio.sleep(0.001)
        await asyncio.gather(first, consume("b", engine.submit(fixed_length(PROMPTS[1], 3))))
    first_b = order.index(("b", False))
    last_a = order.index(("a", True))
    assert first_b < last_a


async def test_full_kv_cache_preempts_and_every_request_still_gets_its_greedy_output(shard, tiny_llama):
    async with running_engine(shard, tiny_llama) as engine:
        alone = [await token_ids(engine.submit(fixed_length(p, 30))) for p in PROMPTS]
    # 6 blocks of 16 tokens cannot hold four sequences of up to 61 tokens at once.
    async with running_engine(shard, tiny_llama, max_batch_total_tokens=96) as engine:
        streams = [engine.submit(fixed_length(p, 30)) for p in PROMPTS]
        together = await asyncio.gather(*(token_ids(s) for s in streams))
        assert engine.scheduler.blocks.num_free_blocks == engine.scheduler.blocks.num_usable_blocks
        assert engine.scheduler.num_preemptions >= 1
    assert together == alone


async def test_cancel_frees_the_blocks_before_the_next_step_and_the_shard_forgets_the_request(shard, tiny_llama):
    async with running_engine(shard, tiny_llama) as engine:
        blocks = engine.scheduler.blocks
        stream = engine.submit(fixed_length(PROMPTS[0], 100))
        num_events = 0
        async for _ in stream:
            num_events += 1
            if num_events == 3:
                break
        assert blocks.num_free_blocks < blocks.num_usable_blocks
        stream.cancel()
        assert blocks.num_free_blocks == blocks.num_usable_blocks and not engine.scheduler.has_work
        # The next step tells the shard to forget it; the shard then serves a new request as usual.
        assert len(await token_ids(engine.submit(fixed_length(PROMPTS[1], 5)))) == 5
        assert blocks.num_free_blocks == blocks.num_usable_blocks


async def test_kv_allocator_is_fully_free_after_mixed_workload_with_cancellations(shard, tiny_llama):
    async with running_engine(shard, tiny_llama, max_batch_total_tokens=256, max_batch_size=4) as engine:

        async def cancel_after(stream, num_events):
            async for _ in stream:
                num_events -= 1
                if num_events == 0:
                    stream.cancel()

        streams = [engine.submit(fixed_length(PROMPTS[i % 4], 5 + 3 * i)) for i in range(10)]
        await asyncio.gather(*(cancel_after(s, 2 + i) for i, s in enumerate(streams)))
        sampled = engine.submit(fixed_length(PROMPTS[3], 8, SamplingParams(do_sample=True, top_k=5, seed=3)))
        await token_ids(sampled)
        blocks = engine.scheduler.blocks
        assert not engine.scheduler.has_work
        assert blocks.num_free_blocks == blocks.num_usable_blocks


async def test_same_seed_gives_same_tokens_alone_and_in_a_busy_batch(shard, tiny_llama):
    sampling = SamplingParams(do_sample=True, temperature=1.3, top_p=0.95, seed=1234)
    async with running_engine(shard, tiny_llama) as engine:
        alone = await token_ids(engine.submit(fixed_length(PROMPTS[1], 16, sampling)))
        others = [
            engine.submit(fixed_length(p, 20, SamplingParams(do_sample=True, seed=i)))
            for i, p in enumerate(PROMPTS)
        ]
        busy = engine.submit(fixed_length(PROMPTS[1], 16, sampling))
        results = await asyncio.gather(token_ids(busy), *(token_ids(s) for s in others))
        other_seed = SamplingParams(do_sample=True, temperature=1.3, top_p=0.95, seed=1235)
        different = await token_ids(engine.submit(fixed_length(PROMPTS[1], 16, other_seed)))
    assert results[0] == alone
    assert different != alone  # the seed, not the model, decides the sampled tokens


async def test_random_shared_prefixes_under_a_small_kv_cache_each_get_their_greedy_output_alone(shard, tiny_llama):
    rng = random.Random(7)
    roots = [[1] + [rng.randrange(2, 30000) for _ in range(95)] for _ in range(3)]
    cases = []
    for _ in range(20):
        prompt = rng.choice(roots)[: rng.choice([3, 16, 17, 40, 70, 96])]  # some longer than a step's budget
        cases.append((prompt + [rng.randrange(2, 30000) for _ in range(rng.randint(0, 5))], rng.randint(16, 40)))
    async with running_engine(shard, tiny_llama, prefix_caching=False) as engine:
        alone = [await token_ids(engine.submit(fixed_length(prompt, n))) for prompt, n in cases]
    # 10 blocks of 16 tokens for 20 requests of up to 141 tokens: cached blocks are evicted and
    # requests preempted all along.
    async with running_engine(shard, tiny_llama, max_batch_total_tokens=160, max_batch_size=8) as engine:
        streams = [engine.submit(fixed_length(prompt, n)) for prompt, n in cases]
        together = await asyncio.gather(*(token_ids(s) for s in streams))
        scheduler, blocks = engine.scheduler, engine.scheduler.blocks
        assert scheduler.num_cached_tokens > 0 and any(s.request.num_cached_prompt_tokens for s in streams)
        assert scheduler.num_preemptions > 0
        assert blocks.num_free_blocks == blocks.num_usable_blocks  # every block free or cached, none referenced
    assert together == alone

"""Scheduler and block allocator, driven by hand-built step results (no model, no shards)."""

import dataclasses
import math
import random

import pytest

from tgi_router.adapters import LoraAdapters
from tgi_router.block_manager import BlockManager
from tgi_router.errors import ValidationError
from tgi_router.request import FinishReason, Request, Sample, SampledToken, StepResult
from tgi_router.scheduler import Scheduler, SchedulerConfig

BLOCK_SIZE = 4


def make_scheduler(num_blocks=64, prefill_tokens=32, batch_size=8):
    config = SchedulerConfig(max_batch_prefill_tokens=prefill_tokens, max_batch_size=batch_size)
    return Scheduler(config, BlockManager(num_blocks, BLOCK_SIZE))


def make_request(request_id, prompt_len, max_new_tokens=4):
    return Request(id=request_id, prompt_token_ids=list(range(prompt_len)), max_new_tokens=max_new_tokens)


def run_step(scheduler, token_id=7):
    """Schedules one step and feeds back a sampled token for every request that caught up."""
    plan = scheduler.schedule()
    samples = []
    for chunk in plan.scheduled:
        request = chunk.request
        if request.num_computed_tokens + chunk.num_tokens == request.num_tokens:
            samples.append(sample(request.id, token_id, logprob=-0.5))
    return plan, scheduler.update(plan, StepResult(samples))


def sample(request_id, *token_ids, logprob=0.0):
    """A step's sample of `token_ids` (one, or several as a step that verified proposals returns)."""
    return Sample(request_id, tuple(SampledToken(token_id, logprob) for token_id in token_ids))


def test_new_requests_are_sent_in_full_once():
    scheduler = make_scheduler()
    scheduler.add(make_request(1, 5))
    plan, sampled = run_step(scheduler)
    assert [r.id for r in plan.new_requests] == [1]
    assert [c.num_tokens for c in plan.scheduled] == [5]
    assert [new.request.id for new in sampled] == [1]
    plan, _ = run_step(scheduler)
    assert plan.new_requests == []
    assert [c.num_tokens for c in plan.scheduled] == [1]


def test_long_prompt_is_prefilled_in_chunks_within_the_token_budget():
    scheduler = make_scheduler(prefill_tokens=8)
    scheduler.add(make_request(1, 20))
    chunk_sizes = []
    for _ in range(3):
        plan, sampled = run_step(scheduler)
        chunk_sizes.append(plan.num_batched_tokens)
    assert chunk_sizes == [8, 8, 4]
    assert len(sampled) == 1  # only the last chunk samples


def test_request_arriving_mid_decode_joins_running_batch():
    scheduler = make_scheduler()
    scheduler.add(make_request(1, 3, max_new_tokens=10))
    run_step(scheduler)
    run_step(scheduler)
    scheduler.add(make_request(2, 6))
    plan, sampled = run_step(scheduler)
    assert [(c.request.id, c.num_tokens) for c in plan.scheduled] == [(1, 1), (2, 6)]
    assert {new.request.id for new in sampled} == {1, 2}


def test_step_token_budget_covers_decodes_before_new_prefills():
    scheduler = make_scheduler(prefill_tokens=6)
    for request_id in range(3):
        scheduler.add(make_request(request_id, 2, max_new_tokens=10))
    run_step(scheduler)
    scheduler.add(make_request(9, 10))
    plan, _ = run_step(scheduler)
    # three decodes take 3 tokens; the new prompt gets the remaining 3 as its first chunk
    assert [(c.request.id, c.num_tokens) for c in plan.scheduled] == [(0, 1), (1, 1), (2, 1), (9, 3)]


def test_batch_size_limit_keeps_extra_requests_waiting():
    scheduler = make_scheduler(batch_size=2)
    for request_id in range(3):
        scheduler.add(make_request(request_id, 2))
    plan, _ = run_step(scheduler)
    assert [c.request.id for c in plan.scheduled] == [0, 1]
    assert [r.id for r in scheduler.waiting] == [2]


def test_concurrent_requests_take_max_not_sum_of_lengths_in_steps():
    scheduler = make_scheduler()
    lengths = [3, 5, 8, 2]
    for request_id, n in enumerate(lengths):
        scheduler.add(make_request(request_id, 4, max_new_tokens=n))
    num_steps = 0
    while scheduler.has_work:
        run_step(scheduler)
        num_steps += 1
    assert num_steps == max(lengths)


def test_full_cache_preempts_newest_request_and_recomputes_it_later():
    # 4 usable blocks of 4 tokens = 16 KV slots for two requests that together want 24.
    scheduler = make_scheduler(num_blocks=5, prefill_tokens=32)
    scheduler.add(make_request(1, 4, max_new_tokens=8))
    scheduler.add(make_request(2, 4, max_new_tokens=8))
    seen_finished = []
    outputs = {}
    for _ in range(60):
        if not scheduler.has_work:
            break
        plan, sampled = run_step(scheduler)
        seen_finished += plan.finished_ids
        for new in sampled:
            outputs[new.request.id] = len(new.request.output_token_ids)
    assert not scheduler.has_work
    assert outputs == {1: 8, 2: 8}
    assert 2 in seen_finished  # the preempted request was dropped from the shards before recompute
    assert scheduler.blocks.num_free_blocks == scheduler.blocks.num_usable_blocks


def test_preempted_request_is_resent_with_its_generated_tokens():
    scheduler = make_scheduler(num_blocks=5)
    scheduler.add(make_request(1, 4, max_new_tokens=8))
    scheduler.add(make_request(2, 4, max_new_tokens=8))
    resent = []
    for _ in range(40):
        if not scheduler.has_work:
            break
        plan, sampled = run_step(scheduler)
        resent += [(r.id, r.num_tokens) for r in plan.new_requests if r.num_preemptions]
    assert resent and all(num_tokens > 4 for _, num_tokens in resent)


def test_cancelled_request_frees_blocks_and_is_forgotten_by_shards():
    scheduler = make_scheduler()
    scheduler.add(make_request(1, 9, max_new_tokens=50))
    run_step(scheduler)
    scheduler.finish(1)
    assert scheduler.blocks.num_free_blocks == scheduler.blocks.num_usable_blocks
    plan = scheduler.schedule()
    assert plan.finished_ids == [1] and plan.scheduled == []


def test_request_finished_during_a_step_is_skipped_by_update():
    scheduler = make_scheduler()
    scheduler.add(make_request(1, 3))
    plan = scheduler.schedule()
    scheduler.finish(1)
    assert scheduler.update(plan, StepResult([sample(1, 5)])) == []


def test_allocator_returns_to_fully_free_after_mixed_workload():
    rng = random.Random(0)
    scheduler = make_scheduler(num_blocks=24, prefill_tokens=16, batch_size=6)
    next_id = 0
    for step in range(400):
        if step < 300 and rng.random() < 0.3:
            scheduler.add(make_request(next_id, rng.randint(1, 20), max_new_tokens=rng.randint(1, 12)))
            next_id += 1
        if step % 17 == 0 and scheduler.running:
            scheduler.finish(rng.choice(scheduler.running).id)  # a client went away
        if scheduler.has_work:
            _, sampled = run_step(scheduler)
    assert not scheduler.has_work
    assert scheduler.blocks.num_free_blocks == scheduler.blocks.num_usable_blocks


def test_block_manager_allocates_all_or_nothing():
    blocks = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    assert blocks.num_free_blocks == 3
    taken = blocks.allocate(2)
    assert len(taken) == 2 and 0 not in taken
    assert blocks.allocate(2) is None
    assert blocks.num_free_blocks == 1
    blocks.free(taken)
    assert blocks.num_free_blocks == 3


def test_a_request_that_samples_also_gets_the_block_of_its_next_token():
    scheduler = make_scheduler(prefill_tokens=8)
    scheduler.add(make_request(1, 8, max_new_tokens=10))  # 8 tokens fill two blocks exactly
    plan, _ = run_step(scheduler)
    (chunk,) = plan.scheduled
    assert len(chunk.new_block_ids) == 3  # the sampled token (position 8) goes to a third block
    for _ in range(3):  # positions 9..11 stay in that block
        plan, _ = run_step(scheduler)
        assert plan.scheduled[0].new_block_ids == []
    plan, _ = run_step(scheduler)  # decodes position 11, samples the token for position 12
    assert len(plan.scheduled[0].new_block_ids) == 1


def test_the_last_sample_of_a_request_is_marked_and_gets_no_extra_block():
    scheduler = make_scheduler(prefill_tokens=8)
    scheduler.add(make_request(1, 8, max_new_tokens=2))
    plan, _ = run_step(scheduler)
    (chunk,) = plan.scheduled
    assert not chunk.last_token and len(chunk.new_block_ids) == 3
    plan, _ = run_step(scheduler)
    assert plan.scheduled[0].last_token


def test_a_one_token_request_is_marked_last_at_its_prefill():
    scheduler = make_scheduler(prefill_tokens=8)
    scheduler.add(make_request(1, 8, max_new_tokens=1))
    plan, _ = run_step(scheduler)
    (chunk,) = plan.scheduled
    assert chunk.last_token and len(chunk.new_block_ids) == 2


def test_prompt_chunks_get_no_extra_block():
    scheduler = make_scheduler(prefill_tokens=4)
    scheduler.add(make_request(1, 12))
    plan, _ = run_step(scheduler)
    assert len(plan.scheduled[0].new_block_ids) == 1


def test_steps_allow_lookahead_only_while_nothing_waits():
    scheduler = make_scheduler(batch_size=1)
    scheduler.add(make_request(1, 3))
    scheduler.add(make_request(2, 3))
    plan, _ = run_step(scheduler)
    assert not plan.lookahead  # request 2 waits for a batch slot
    scheduler.finish(1)
    plan, _ = run_step(scheduler)
    assert plan.lookahead


# Prefix caching. Blocks hold BLOCK_SIZE (4) tokens; prompts are token lists.


def make_prompt_request(request_id, prompt, max_new_tokens=4, **fields):
    return Request(id=request_id, prompt_token_ids=list(prompt), max_new_tokens=max_new_tokens, **fields)


def run_to_end(scheduler):
    while scheduler.has_work:
        _, sampled = run_step(scheduler)


def test_a_request_starts_after_the_cached_blocks_of_a_prefix_computed_before():
    scheduler = make_scheduler()
    scheduler.add(make_prompt_request(1, range(10)))
    first_plan = scheduler.schedule()
    first_blocks = list(first_plan.scheduled[0].new_block_ids)
    scheduler.update(first_plan, StepResult([sample(1, 7)]))
    run_to_end(scheduler)
    scheduler.add(make_prompt_request(2, [*range(9), 99, 98]))  # shares 9 tokens: two whole blocks
    plan = scheduler.schedule()
    (chunk,) = plan.scheduled
    assert chunk.request.num_computed_tokens == 8 and chunk.num_tokens == 3
    assert chunk.new_block_ids[:2] == first_blocks[:2]  # the cached blocks lead the new block table
    assert chunk.request.num_cached_prompt_tokens == 8
    assert (scheduler.num_cached_tokens, scheduler.num_computed_tokens) == (8, 10 + 3)


def test_a_prompt_shorter_than_a_block_shares_nothing():
    scheduler = make_scheduler()
    scheduler.add(make_prompt_request(1, range(10)))
    run_to_end(scheduler)
    scheduler.add(make_prompt_request(2, [0, 1, 2, 50, 51]))
    (chunk,) = scheduler.schedule().scheduled
    assert chunk.request.num_computed_tokens == 0 and chunk.num_tokens == 5


@pytest.mark.parametrize("prompt_len, num_cached", [(8, 4), (9, 8), (12, 8)])
def test_a_whole_cached_prompt_still_computes_its_last_token(prompt_len, num_cached):
    scheduler = make_scheduler()
    scheduler.add(make_prompt_request(1, range(prompt_len)))
    run_to_end(scheduler)
    scheduler.add(make_prompt_request(2, range(prompt_len)))
    plan, sampled = run_step(scheduler)
    (chunk,) = plan.scheduled
    assert chunk.num_tokens == prompt_len - num_cached  # whole blocks, ending before the last token
    assert [new.request.id for new in sampled] == [2]  # so it samples at once


def test_blocks_shared_by_running_requests_are_freed_only_by_the_last_one():
    scheduler = make_scheduler(num_blocks=9)  # 8 usable
    scheduler.add(make_prompt_request(1, range(9), max_new_tokens=8))
    run_step(scheduler)
    scheduler.add(make_prompt_request(2, range(9), max_new_tokens=8))
    run_step(scheduler)
    first, second = scheduler.running
    assert first.block_ids[:2] == second.block_ids[:2] and first.block_ids[2:] != second.block_ids[2:]
    scheduler.finish(1)
    # The shared blocks are still in use; request 1's own (its last) block is free again.
    assert scheduler.blocks.num_free_blocks == 8 - len(second.block_ids)
    scheduler.finish(2)
    assert scheduler.blocks.num_free_blocks == 8


def test_free_blocks_are_reused_uncached_first_then_least_recently_freed_tails_first():
    blocks = BlockManager(num_blocks=9, block_size=BLOCK_SIZE)
    older, newer, plain = blocks.allocate(3), blocks.allocate(3), blocks.allocate(2)
    for table, tag in ((older, b"o"), (newer, b"n")):
        for index, block in enumerate(table):
            blocks.cache(block, tag + bytes([index]))
    blocks.free(older)
    blocks.free(newer)
    blocks.free(plain)
    assert blocks.num_cached_free_blocks == 6
    order = blocks.allocate(8)
    assert order == [*plain, *reversed(older), *reversed(newer)]
    assert blocks.num_cached_free_blocks == 0 and blocks.cached_prefix([b"o\x00"]) == []


def test_a_cached_block_taken_again_leaves_the_free_list_and_is_not_evicted():
    blocks = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    (block,) = blocks.allocate(1)
    blocks.cache(block, b"h")
    blocks.free([block])
    assert blocks.cached_prefix([b"h", b"x"]) == [block] and blocks.num_free_among([block]) == 1
    blocks.take([block])
    assert blocks.num_free_blocks == 2 and blocks.num_cached_free_blocks == 0
    assert block not in blocks.allocate(2)
    assert blocks.allocate(1) is None


def test_cached_blocks_are_evicted_before_a_running_request_is_preempted():
    scheduler = make_scheduler(num_blocks=7, prefill_tokens=32)  # 6 usable blocks
    scheduler.add(make_prompt_request(1, range(100, 116), max_new_tokens=1))  # 4 blocks, then cached
    run_to_end(scheduler)
    assert scheduler.blocks.num_cached_free_blocks == 4
    scheduler.add(make_prompt_request(2, range(8), max_new_tokens=14))  # grows to 6 blocks
    run_to_end(scheduler)
    assert scheduler.num_preemptions == 0
    assert scheduler.blocks.num_free_blocks == 6


def test_a_request_cancelled_mid_step_leaves_no_block_cached():
    scheduler = make_scheduler()
    scheduler.add(make_prompt_request(1, range(12)))
    plan = scheduler.schedule()
    scheduler.finish(1)  # while the step runs
    scheduler.update(plan, StepResult([sample(1, 7)]))
    assert scheduler.blocks.num_cached_free_blocks == 0
    scheduler.add(make_prompt_request(2, range(12)))
    (chunk,) = scheduler.schedule().scheduled
    assert chunk.request.num_computed_tokens == 0


def test_only_the_blocks_a_finished_step_filled_are_cached():
    scheduler = make_scheduler(prefill_tokens=6)
    scheduler.add(make_prompt_request(1, range(8)))
    run_step(scheduler)  # tokens 0..5: the first block is full, the second half computed
    scheduler.add(make_prompt_request(2, [*range(8), 50, 51, 52, 53]))
    plan, _ = run_step(scheduler)
    # Request 1 computes tokens 6 and 7; request 2, although there is budget left, waits for them.
    assert [(chunk.request.id, chunk.num_tokens) for chunk in plan.scheduled] == [(1, 2)]
    plan = scheduler.schedule()
    (chunk,) = [chunk for chunk in plan.scheduled if chunk.request.id == 2]
    assert chunk.request.num_computed_tokens == 8 and chunk.num_tokens == 4


def test_siblings_of_one_prompt_compute_it_once():
    scheduler = make_scheduler(prefill_tokens=64)
    for request_id in (1, 2, 3):
        scheduler.add(make_prompt_request(request_id, range(20), max_new_tokens=3))
    plan, _ = run_step(scheduler)
    assert [(chunk.request.id, chunk.num_tokens) for chunk in plan.scheduled] == [(1, 20)]
    plan, _ = run_step(scheduler)
    assert [(chunk.request.id, chunk.num_tokens) for chunk in plan.scheduled] == [(1, 1), (2, 4), (3, 4)]
    assert scheduler.num_cached_tokens == 32


def test_requests_that_want_prompt_logprobs_compute_their_whole_prompt_but_leave_it_cached():
    scheduler = make_scheduler()
    scheduler.add(make_prompt_request(1, range(10)))
    run_to_end(scheduler)
    scheduler.add(make_prompt_request(2, range(10), prompt_logprobs=[math.nan] * 10))
    (chunk,) = scheduler.schedule().scheduled
    assert chunk.request.num_computed_tokens == 0 and chunk.num_tokens == 10


def test_a_preempted_request_resumes_from_its_own_cached_blocks():
    scheduler = make_scheduler(num_blocks=5, prefill_tokens=32)  # 4 usable
    scheduler.add(make_prompt_request(1, range(4), max_new_tokens=8))
    scheduler.add(make_prompt_request(2, range(50, 54), max_new_tokens=8))
    cached_on_return = []
    for _ in range(40):
        if not scheduler.has_work:
            break
        plan, sampled = run_step(scheduler)
        cached_on_return += [r.num_computed_tokens for r in plan.new_requests if r.num_preemptions]
    assert scheduler.num_preemptions >= 1 and any(cached_on_return)


def test_prefix_caching_off_computes_every_prompt_in_full():
    config = SchedulerConfig(max_batch_prefill_tokens=32, max_batch_size=8, prefix_caching=False)
    scheduler = Scheduler(config, BlockManager(64, BLOCK_SIZE))
    scheduler.add(make_prompt_request(1, range(10)))
    run_to_end(scheduler)
    scheduler.add(make_prompt_request(2, range(10)))
    (chunk,) = scheduler.schedule().scheduled
    assert chunk.num_tokens == 10 and scheduler.blocks.num_cached_free_blocks == 0


def test_random_shared_prefixes_leave_every_block_free_or_cached_and_unreferenced():
    rng = random.Random(1)
    scheduler = make_scheduler(num_blocks=20, prefill_tokens=12, batch_size=6)
    roots = [[rng.randrange(1000) for _ in range(24)] for _ in range(3)]
    for step in range(500):
        if step < 400 and rng.random() < 0.3:
            prompt = rng.choice(roots)[: rng.randint(1, 24)] + [rng.randrange(1000) for _ in range(rng.randint(0, 6))]
            scheduler.add(make_prompt_request(step, prompt, max_new_tokens=rng.randint(1, 10)))
        if step % 23 == 0 and scheduler.running:
            scheduler.finish(rng.choice(scheduler.running).id)
        if scheduler.has_work:
            _, sampled = run_step(scheduler)
    assert not scheduler.has_work and scheduler.num_cached_tokens > 0
    blocks = scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_usable_blocks
    assert blocks.allocate(blocks.num_usable_blocks) is not None  # nothing still referenced


def test_a_sample_of_several_tokens_is_kept_whole_when_nothing_ends_the_request():
    scheduler = make_scheduler()
    scheduler.add(make_request(1, 5, max_new_tokens=8))
    plan = scheduler.schedule()
    (new,) = scheduler.update(plan, StepResult([sample(1, 7, 8, 9)]))
    assert [t.token_id for t in new.tokens] == [7, 8, 9] and new.finish is None
    assert new.request.output_token_ids == [7, 8, 9] and scheduler.running == [new.request]


@pytest.mark.parametrize("token_ids, max_new_tokens, stop_token_ids, kept, finish", [
    ((7, 8, 9, 10), 2, frozenset(), [7, 8], FinishReason.LENGTH),  # never a token past max_new_tokens
    ((7, 2, 9), 8, frozenset({2}), [7, 2], FinishReason.EOS_TOKEN),  # the end-of-sequence token is the last
    ((7, 2, 9), 8, frozenset(), [7, 2, 9], None),  # ignore_eos: no stop ids
])
def test_a_sample_is_cut_at_the_first_token_that_ends_its_request_and_the_blocks_are_freed_at_once(
    token_ids, max_new_tokens, stop_token_ids, kept, finish
):
    scheduler = make_scheduler()
    request = Request(id=1, prompt_token_ids=list(range(5)), max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids)
    scheduler.add(request)
    plan = scheduler.schedule()
    (new,) = scheduler.update(plan, StepResult([sample(1, *token_ids)]))
    assert [t.token_id for t in new.tokens] == kept == request.output_token_ids and new.finish == finish
    assert (scheduler.blocks.num_free_blocks == scheduler.blocks.num_usable_blocks) == (finish is not None)
    assert scheduler.has_work == (finish is None)


def speculating_scheduler(speculate=3, **kwargs):
    config = SchedulerConfig(max_batch_prefill_tokens=32, max_batch_size=8, speculate=speculate, **kwargs)
    return Scheduler(config, BlockManager(64, BLOCK_SIZE))


def decode_ready(scheduler, request, first_token):
    """Admits `request`, runs its prompt and samples `first_token`: it decodes from the next plan."""
    scheduler.add(request)
    scheduler.update(scheduler.schedule(), StepResult([sample(request.id, first_token)]))


def test_a_decoding_request_verifies_the_ngram_continuation_of_its_tokens_and_keeps_what_the_shards_accept():
    scheduler = speculating_scheduler()
    request = Request(id=1, prompt_token_ids=[5, 6, 7, 8, 9, 5, 6], max_new_tokens=10)
    decode_ready(scheduler, request, 7)  # ... 5 6 7: proposes 8 9 5
    plan = scheduler.schedule()
    (chunk,) = plan.scheduled
    assert chunk.draft_token_ids == (8, 9, 5) and chunk.num_tokens == 4 and chunk.samples and not plan.lookahead
    assert len(request.block_ids) * BLOCK_SIZE >= request.num_tokens + 3  # slots for every proposal
    blocks = list(request.block_ids)
    (new,) = scheduler.update(plan, StepResult([sample(1, 8, 9, 4)]))  # two kept, then 4 sampled
    assert [t.token_id for t in new.tokens] == [8, 9, 4] and request.output_token_ids == [7, 8, 9, 4]
    assert request.num_computed_tokens == request.num_tokens - 1  # the last kept proposal's KV is the last computed
    assert request.block_ids == blocks  # the shards' table keeps the rejected proposal's slot
    (chunk,) = scheduler.schedule().scheduled
    assert chunk.num_tokens == 1 + len(chunk.draft_token_ids)


@pytest.mark.parametrize("kwargs, max_new_tokens, expected", [
    ({}, 3, (8,)),  # one token left after the sampled one: one proposal at most
    ({}, 2, ()),  # the next token is the last
    ({"max_speculative_batch": 0}, 10, ()),  # a batch above the limit: no proposals
    ({"speculate": 0}, 10, ()),
])
def test_proposals_never_reach_past_max_new_tokens_nor_run_in_large_batches(kwargs, max_new_tokens, expected):
    scheduler = speculating_scheduler(**{"speculate": 3, **kwargs})
    request = Request(id=1, prompt_token_ids=[5, 6, 7, 8, 9, 5, 6], max_new_tokens=max_new_tokens)
    decode_ready(scheduler, request, 7)
    (chunk,) = scheduler.schedule().scheduled
    assert chunk.draft_token_ids == expected and chunk.num_tokens == 1 + len(expected)


def test_a_request_under_a_grammar_gets_no_proposals():
    scheduler = speculating_scheduler()
    request = Request(id=1, prompt_token_ids=[5, 6, 7, 8, 9, 5, 6], max_new_tokens=10, is_constrained=True)
    decode_ready(scheduler, request, 7)
    (chunk,) = scheduler.schedule().scheduled
    assert chunk.draft_token_ids == ()


@pytest.mark.parametrize("max_new_tokens, is_constrained, expected", [(10, False, 3), (3, False, 1), (10, True, 0)])
def test_with_a_draft_model_a_decoding_request_asks_the_shards_for_proposals_and_keeps_what_they_accept(
        max_new_tokens, is_constrained, expected):
    scheduler = speculating_scheduler(draft_model=True)
    request = Request(id=1, prompt_token_ids=[5, 6, 7], max_new_tokens=max_new_tokens, is_constrained=is_constrained)
    decode_ready(scheduler, request, 40)
    plan = scheduler.schedule()
    (chunk,) = plan.scheduled
    assert (chunk.num_model_drafts, chunk.draft_token_ids, chunk.num_tokens) == (expected, (), 1 + expected)
    assert chunk.samples and not (expected and plan.lookahead)  # nothing starts before a verify step is done
    assert len(request.block_ids) * BLOCK_SIZE >= request.num_tokens + expected  # slots for every proposal
    kept = [41, 42][:expected]
    (new,) = scheduler.update(plan, StepResult([sample(1, *kept, 43)]))
    assert [t.token_id for t in new.tokens] == [*kept, 43] and request.output_token_ids == [40, *kept, 43]
    assert request.num_computed_tokens == request.num_tokens - 1


def test_adapters_take_the_least_recently_used_free_slot_and_one_finding_none_waits_while_others_go_ahead():
    adapters = LoraAdapters(("a", "b", "c"), num_slots=2)
    scheduler = Scheduler(SchedulerConfig(max_batch_prefill_tokens=64, max_batch_size=8),
                          BlockManager(64, BLOCK_SIZE), adapters)
    for request_id, adapter_id in enumerate([1, 2, 3, 0, 1], 1):  # prompts of their own: nothing shared
        scheduler.add(Request(id=request_id, prompt_token_ids=[100 * request_id + i for i in range(5)], max_new_tokens=2,
                              adapter_id=adapter_id))
    plan, _ = run_step(scheduler)
    # adapter 3 finds both slots held: it waits; the base-model request and adapter 1's second go ahead
    assert [(c.request.id, c.request.adapter_slot) for c in plan.scheduled] == [(1, 1), (2, 2), (4, 0), (5, 1)]
    assert plan.adapter_placements == [(1, 1), (2, 2)]
    assert [r.id for r in scheduler.waiting] == [3]
    plan, _ = run_step(scheduler)  # the last tokens: every request but 3 ends, freeing both slots
    assert [c.request.id for c in plan.scheduled] == [1, 2, 4, 5] and plan.adapter_placements == []
    plan, _ = run_step(scheduler)
    # slot 1 was used last by request 5: adapter 3 evicts adapter 2 from slot 2, the least recently used
    assert [(c.request.id, c.request.adapter_slot) for c in plan.scheduled] == [(3, 2)]
    assert plan.adapter_placements == [(2, 3)]
    again = dataclasses.replace(make_request(6, 5), adapter_id=1)
    scheduler.add(again)
    plan, _ = run_step(scheduler)
    assert again.adapter_slot == 1 and plan.adapter_placements == []  # still in its slot


def test_an_adapters_blocks_hash_from_its_own_root():
    scheduler = Scheduler(SchedulerConfig(max_batch_prefill_tokens=32, max_batch_size=8), BlockManager(64, BLOCK_SIZE),
                          LoraAdapters(("a",), num_slots=1))
    computed = []
    for request_id, adapter_id in enumerate([0, 1, 0, 1], 1):  # one prompt of 9 tokens, two whole blocks
        scheduler.add(dataclasses.replace(make_request(request_id, 9, max_new_tokens=1), adapter_id=adapter_id))
        plan, _ = run_step(scheduler)
        computed.append(plan.scheduled[0].num_tokens)
    # the base model's blocks serve neither the adapter's first request nor the other way round
    assert computed == [9, 9, 1, 1]


def test_a_request_whose_adapter_was_unloaded_after_its_validation_is_refused_and_not_queued():
    adapters = LoraAdapters(("a",), num_slots=1)
    scheduler = Scheduler(SchedulerConfig(max_batch_prefill_tokens=32, max_batch_size=8), BlockManager(64, BLOCK_SIZE),
                          adapters)
    adapter_id = adapters.remove("a")  # between the request's validation and its submission
    with pytest.raises(ValidationError, match="unloaded"):
        scheduler.add(dataclasses.replace(make_request(1, 5), adapter_id=adapter_id))
    assert not scheduler.has_work
    scheduler.finish(1)  # unknown to it: nothing happens


async def test_replicas_share_the_adapters_names_and_users_but_place_them_in_slots_of_their_own():
    first = LoraAdapters(("a", "b"), num_slots=1)
    second = first.for_replica()
    schedulers = [Scheduler(SchedulerConfig(max_batch_prefill_tokens=64, max_batch_size=8), BlockManager(64, BLOCK_SIZE),
                            adapters) for adapters in (first, second)]
    for scheduler, (request_id, adapter_id) in zip(schedulers, [(1, 1), (2, 2)]):
        scheduler.add(Request(id=request_id, prompt_token_ids=[100 * request_id + i for i in range(5)],
                              max_new_tokens=4, adapter_id=adapter_id))
    plans = [run_step(scheduler)[0] for scheduler in schedulers]
    # one slot each: adapter a in the first replica's, b in the second's, both running at once
    assert [plan.adapter_placements for plan in plans] == [[(1, 1)], [(1, 2)]]
    new_id = first.new_id()
    first.add("c", new_id)
    assert second.ids["c"] == new_id  # loaded on every replica's shards, known to every replica
    unloaded = first.remove("b")
    with pytest.raises(ValidationError, match="unloaded"):
        second.hold(unloaded)
    for scheduler, request_id in zip(schedulers, (1, 2)):
        scheduler.finish(request_id)
    await first.wait_unused(unloaded)  # no request names b any more: it leaves the second replica's slot
    assert unloaded not in second._slot_of
    third = Request(id=3, prompt_token_ids=[7, 8, 9, 10, 11], max_new_tokens=2, adapter_id=new_id)
    schedulers[1].add(third)
    plan, _ = run_step(schedulers[1])
    assert plan.adapter_placements == [(1, new_id)] and third.adapter_slot == 1

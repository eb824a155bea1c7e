"""Continuous batching: which requests compute how many tokens in the next step.

Plain, step-driven Python. Every request has `num_computed_tokens` catching up with `num_tokens`; a
step gives running requests their share first (one token when decoding, the rest of their prompt
when prefilling in chunks), then admits waiting requests FIFO while the step's token budget, the batch
size and the KV cache allow. KV blocks are allocated lazily as sequences grow; when the cache runs out,
the newest running request is preempted (its blocks freed) and recomputed later from its tokens.

Prefix caching (`SchedulerConfig.prefix_caching`): a request joins with the longest prefix of its
tokens whose KV blocks are cached (`BlockManager`), as if those tokens were computed; the shards compute
the rest. The cached prefix is whole blocks and stops short of the last known token, so every request
computes at least one token and gets logits to sample from. Every block a step fills is cached once
the step is done (never earlier: a request cancelled mid-step leaves nothing half-written behind). A
request whose next uncached block another running request is computing right now (a sibling of `n`,
or the same system prompt arriving twice) waits for it instead of computing it again. Requests that
want prompt logprobs compute their whole prompt (the logprobs come from the forward), but leave their
blocks cached for others.

A request that samples this step also gets the block its next token goes to, when one is free without
preempting: with nothing waiting, the shards start the next decode step before its plan arrives
(`StepPlan.lookahead`) and need a KV slot for every request. A request whose sample is its last
(`ScheduledChunk.last_token`) needs none, and the shards leave it out of that step.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass

from tgi_router.adapters import LoraAdapters
from tgi_router.block_manager import BlockManager, extend_block_hashes
from tgi_router.speculation import propose_ngram
from tgi_router.request import FinishReason, NewTokens, Request, ScheduledChunk, StepPlan, StepResult


@dataclass(frozen=True)
class SchedulerConfig:
    # Tokens computed in one step at most: prompt chunks plus one per decoding request.
    max_batch_prefill_tokens: int
    # Requests in the running batch at most.
    max_batch_size: int
    # Reuse the KV of cached prefixes (see the module's docstring).
    prefix_caching: bool = True
    # Speculative decoding: tokens proposed per decoding request and step (n-gram lookup, or the
    # shards' draft model with `draft_model`), 0 = off.
    speculate: int = 0
    draft_model: bool = False
    # ... only while the running batch is at most this large (beyond, a step is compute-bound and
    # verifying proposals costs more than it saves).
    max_speculative_batch: int = 32


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, adapters: LoraAdapters | None = None):
        self.config = config
        self.blocks = block_manager
        self.adapters = adapters if adapters is not None else LoraAdapters()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._live: dict[int, Request] = {}
        self._finished_ids: list[int] = []
        self._next_step_id = 0
        # Hash of a full block -> the running request computing it now (not yet cached).
        self._computing: dict[bytes, int] = {}
        self.num_preemptions = 0  # since the start (a statistic)
        # Known tokens of the requests admitted (again, after a preemption) since the start, by where
        # their KV came from: the prefix cache, or the shards (statistics).
        self.num_cached_tokens = 0
        self.num_computed_tokens = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_requests(self) -> int:
        """Requests waiting or running: the load a data-parallel front balances."""
        return len(self._live)

    def num_cached_blocks(self, block_hashes: list[bytes]) -> int:
        """How many of a prompt's blocks (their chained hashes) the prefix cache holds now, from the first."""
        return len(self.blocks.cached_prefix(block_hashes)) if self.config.prefix_caching else 0

    def add(self, request: Request) -> None:
        self.adapters.hold(request.adapter_id)  # first: it refuses an adapter unloaded meanwhile
        self._live[request.id] = request
        self.waiting.append(request)

    def finish(self, request_id: int) -> None:
        """Removes a finished or cancelled request and frees its blocks; unknown ids are ignored."""
        request = self._live.pop(request_id, None)
        if request is None:
            return
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._release(request)
        self.adapters.drop(request.adapter_id)

    def schedule(self) -> StepPlan:
        budget = self.config.max_batch_prefill_tokens
        scheduled: list[ScheduledChunk] = []
        budget, did_preempt = self._schedule_running(scheduled, budget)
        if not did_preempt:
            self._schedule_waiting(scheduled, budget)
        scheduled = [self._prepare_next_token(chunk) for chunk in scheduled]
        new_requests = [chunk.request for chunk in scheduled if not chunk.request.is_on_shards]
        for request in new_requests:
            request.is_on_shards = True
        # A constrained request's next mask needs this step's token, and how many tokens a verifying
        # request keeps is known only after the step: nothing may start before its plan then.
        lookahead = (not self.waiting and not any(request.is_constrained for request in self.running)
                     and not any(chunk.num_proposed for chunk in scheduled))
        plan = StepPlan(self._next_step_id, self._finished_ids, new_requests, scheduled, lookahead=lookahead,
                        adapter_placements=self.adapters.take_placements())
        self._next_step_id += 1
        self._finished_ids = []
        return plan

    def update(self, plan: StepPlan, result: StepResult) -> list[NewTokens]:
        """Advances the requests of `plan` and appends the tokens sampled for them, up to the first
        that ends its request by length or end of sequence; such a request is finished here, its
        blocks free for the next plan. (A stop sequence needs the text: the engine ends those.)

        Requests finished while the step was running are skipped (their ids reach the shards with the
        next plan).
        """
        self._store_prompt_logprobs(result)
        samples = {sample.request_id: sample for sample in result.samples}
        advanced: list[NewTokens] = []
        for chunk in plan.scheduled:
            request = chunk.request
            if self._live.get(request.id) is not request:
                continue
            request.num_computed_tokens += chunk.num_tokens - chunk.num_proposed
            self._cache_computed_blocks(request)
            if request.num_computed_tokens == request.num_tokens:
                new = self._append(request, samples[request.id].tokens)
                # The kept proposals' KV is computed; the rejected ones' is stale, and their blocks stay
                # with the request (the shards' block table has them), to be filled as it grows.
                request.num_computed_tokens += len(new.tokens) - 1
                advanced.append(new)
        return advanced

    def _append(self, request: Request, tokens) -> NewTokens:
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        finish = None
        for kept, token in enumerate(tokens, 1):
            request.output_token_ids.append(token.token_id)
            if len(request.output_token_ids) >= request.max_new_tokens:
                finish = FinishReason.LENGTH
            elif token.token_id in request.stop_token_ids:
                finish = FinishReason.EOS_TOKEN
            if finish is not None:
                self.finish(request.id)
                return NewTokens(request, tuple(tokens[:kept]), finish)
        return NewTokens(request, tuple(tokens))

    def _store_prompt_logprobs(self, result: StepResult) -> None:
        for chunk in result.prompt_logprobs:
            request = self._live.get(chunk.request_id)
            if request is not None and request.prompt_logprobs is not None:
                stop = min(chunk.start + len(chunk.logprobs), len(request.prompt_logprobs))
                request.prompt_logprobs[chunk.start : stop] = chunk.logprobs[: stop - chunk.start]

    def _schedule_running(self, scheduled: list[ScheduledChunk], budget: int) -> tuple[int, bool]:
        did_preempt = False
        speculating = self.config.speculate and len(self.running) <= self.config.max_speculative_batch
        for request in list(self.running):
            if budget == 0:
                break
            if did_preempt and request not in self.running:  # preempted by a request before it
                continue
            num_tokens = min(request.num_uncomputed_tokens, budget)
            room = self._proposal_room(request, budget - 1) if speculating and num_tokens == request.num_uncomputed_tokens == 1 else 0
            drafts = tuple(propose_ngram(request.all_token_ids, room)) if room and not self.config.draft_model else ()
            num_model_drafts = room if self.config.draft_model else 0
            num_tokens += len(drafts) + num_model_drafts
            new_blocks, preempted = self._grow(request, num_tokens)
            did_preempt |= preempted
            if new_blocks is not None:
                scheduled.append(ScheduledChunk(request, num_tokens, new_blocks, draft_token_ids=drafts,
                                                num_model_drafts=num_model_drafts))
                budget -= num_tokens
        return budget, did_preempt

    def _proposal_room(self, request: Request, budget: int) -> int:
        """How many tokens may be proposed after a decoding request's last one: no more than would reach
        max_new_tokens (the token sampled after them counts too); none under a grammar (its masks need
        each token before the next)."""
        if request.is_constrained:
            return 0
        return max(min(self.config.speculate, request.max_new_tokens - len(request.output_token_ids) - 1, budget), 0)

    def _grow(self, request: Request, num_tokens: int) -> tuple[list[int] | None, bool]:
        """Allocates the blocks `request` needs for `num_tokens` more tokens, preempting the newest
        running requests while the cache is full. Returns (new blocks or None if `request` itself was
        preempted, whether anything was preempted)."""
        total_tokens = request.num_computed_tokens + num_tokens
        num_needed = self.blocks.num_blocks_for(total_tokens) - len(request.block_ids)
        if num_needed <= 0:  # a decoding request's blocks mostly have room
            return [], False
        preempted = False
        while (new_blocks := self.blocks.allocate(num_needed)) is None:
            victim = self.running[-1]
            self._preempt(victim)
            preempted = True
            if victim is request:
                return None, True
        request.block_ids.extend(new_blocks)
        return new_blocks, preempted

    def _prepare_next_token(self, chunk: ScheduledChunk) -> ScheduledChunk:
        """Marks a chunk whose sample is the request's last; otherwise, when the request samples this
        step, gives it the block of its next token if one is free."""
        request = chunk.request
        if not chunk.samples:
            return chunk  # a prompt chunk: nothing is sampled
        if len(request.output_token_ids) + 1 >= request.max_new_tokens:
            return dataclasses.replace(chunk, last_token=True)
        if chunk.num_proposed:
            return chunk  # no lookahead step follows a verifying one
        if self.blocks.num_blocks_for(request.num_tokens + 1) > len(request.block_ids):
            new_blocks = self.blocks.allocate(1)
            if new_blocks is not None:
                request.block_ids.extend(new_blocks)
                chunk.new_block_ids.extend(new_blocks)
        return chunk

    def _schedule_waiting(self, scheduled: list[ScheduledChunk], budget: int) -> None:
        deferred = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_batch_size:
            request = self.waiting[0]
            cached = self._cached_prefix(request)
            if cached is None:  # its next block is being computed: join once it is cached
                deferred.append(self.waiting.popleft())
                continue
            slot = self.adapters.acquire(request.adapter_id) if request.adapter_id else 0
            if slot is None:  # every adapter slot is held by running requests of other adapters
                deferred.append(self.waiting.popleft())
                continue
            # Admit only when the whole remaining prompt fits, keeping one spare block per running
            # request so admissions do not immediately force preemptions.
            num_reserved = (self.blocks.num_blocks_for(request.num_tokens) - len(cached)
                            + self.blocks.num_free_among(cached) + len(self.running))
            if num_reserved > self.blocks.num_free_blocks:
                if slot:
                    self.adapters.release(slot)
                break
            self.waiting.popleft()
            request.adapter_slot = slot
            scheduled.append(self._admit(request, cached, budget))
            budget -= scheduled[-1].num_tokens
        self.waiting.extendleft(reversed(deferred))

    def _admit(self, request: Request, cached: list[int], budget: int) -> ScheduledChunk:
        """Moves `request` to the running batch, starting after its `cached` blocks, with the blocks
        of its first chunk."""
        self.blocks.take(cached)
        request.num_cached_blocks = len(cached)
        request.num_computed_tokens = len(cached) * self.blocks.block_size
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
            request.num_cached_prompt_tokens = request.num_computed_tokens
        self.num_cached_tokens += request.num_computed_tokens
        self.num_computed_tokens += request.num_uncomputed_tokens
        num_tokens = min(request.num_uncomputed_tokens, budget)
        new_blocks = self.blocks.allocate(self.blocks.num_blocks_for(request.num_computed_tokens + num_tokens) - len(cached))
        request.block_ids = cached + new_blocks
        self.running.append(request)
        if self.config.prefix_caching:
            for value in self._block_hashes(request, request.num_tokens // self.blocks.block_size)[len(cached):]:
                self._computing.setdefault(value, request.id)
        return ScheduledChunk(request, num_tokens, list(request.block_ids))

    def _cached_prefix(self, request: Request) -> list[int] | None:
        """The cached blocks `request` can start from (whole blocks before its last known token), or
        None when its next block is being computed by another request."""
        if not self.config.prefix_caching or request.prompt_logprobs is not None:
            return []
        hashes = self._block_hashes(request, (request.num_tokens - 1) // self.blocks.block_size)
        cached = self.blocks.cached_prefix(hashes)
        if len(cached) < len(hashes) and self._computing.get(hashes[len(cached)], request.id) != request.id:
            return None
        return cached

    def _cache_computed_blocks(self, request: Request) -> None:
        """Caches the blocks of `request` that the step just done filled."""
        num_full = request.num_computed_tokens // self.blocks.block_size
        if not self.config.prefix_caching or num_full <= request.num_cached_blocks:
            return
        hashes = self._block_hashes(request, num_full)
        for index in range(request.num_cached_blocks, num_full):
            self.blocks.cache(request.block_ids[index], hashes[index])
            if self._computing.get(hashes[index]) == request.id:
                del self._computing[hashes[index]]
        request.num_cached_blocks = num_full

    def _block_hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        """The chained hashes of the first `num_blocks` blocks of `request`'s known tokens."""
        if len(request.block_hashes) < num_blocks:
            extend_block_hashes(request.block_hashes, request.all_token_ids, num_blocks, self.blocks.block_size,
                                request.adapter_id)
        return request.block_hashes[:num_blocks]

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _release(self, request: Request) -> None:
        self.blocks.free(request.block_ids)
        for value in request.block_hashes[request.num_cached_blocks :]:
            if self._computing.get(value) == request.id:
                del self._computing[value]
        request.block_ids = []
        request.num_cached_blocks = 0
        if request.adapter_slot:
            self.adapters.release(request.adapter_slot)
            request.adapter_slot = 0
        if request.is_on_shards:
            self._finished_ids.append(request.id)
            request.is_on_shards = False

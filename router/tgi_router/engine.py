"""The step loop: schedule, run the step on every shard, turn sampled ids into text and events.

One asyncio task owns the scheduler, the allocator and every request's state, so nothing needs a lock.
HTTP handlers `submit` a request and read its events; a handler that goes away `cancel`s, which frees
the request's blocks before the next step. A step that fails (a shard died, or a bug) fails every
request in flight with an error event, so no client is left waiting; the loop itself keeps running.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import logging
import time
from dataclasses import dataclass, field

from tgi_router.detokenizer import IncrementalDetokenizer, StopSequenceMatcher
from tgi_router.errors import GenerationError, InferError
from tgi_router.grammar import Constraint, compute_masks
from tgi_router.metrics import Metrics
from tgi_router.request import FinishReason, NewTokens, Request, SamplingParams, StepPlan, StepResult
from tgi_router.scheduler import Scheduler
from tgi_router.shard_client import ShardClient, ShardError
from tgi_router.tokenizer import Tokenizer
from tgi_router.tracing import start_step

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationInput:
    """A validated request, ready to schedule."""

    input_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_sequences: tuple[str, ...] = ()
    top_n_tokens: int = 0
    # Generate exactly max_new_tokens (benchmarks); end-of-sequence tokens do not stop the request.
    ignore_eos: bool = False
    # Compute the logprob of every prompt token (TGI's decoder_input_details).
    prompt_logprobs: bool = False
    # The grammar this request's tokens must follow (a fresh matcher of its own), or None.
    constraint: Constraint | None = None
    # The LoRA adapter its tokens go through (`LoraAdapters` id; 0: the base model).
    adapter_id: int = 0


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    logprob: float
    special: bool


@dataclass(frozen=True)
class TokenEvent:
    token: Token
    top_tokens: list[Token]
    # Set on the last event of a request.
    finish_reason: FinishReason | None = None
    generated_text: str | None = None


@dataclass
class _InFlight:
    """A step sent to the shards, not yet answered."""

    plan: StepPlan
    call: asyncio.Future
    method: str  # "prefill" or "decode", the metrics' label
    started: float  # time.perf_counter() when sent
    span: object | None = None  # the step's span, with tracing


@dataclass
class _Stream:
    input: GenerationInput
    detokenizer: IncrementalDetokenizer
    stops: StopSequenceMatcher
    events: asyncio.Queue = field(default_factory=asyncio.Queue)


class RequestStream:
    """Events of one request: `TokenEvent`s, ending with one that has a finish reason, or an error."""

    def __init__(self, engine: Engine, request: Request, queue: asyncio.Queue):
        self.id = request.id
        # Read-only for callers: timings (arrival, first scheduled) and token counts.
        self.request = request
        self._engine = engine
        self._queue = queue
        self.is_done = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenEvent:
        if self.is_done:
            raise StopAsyncIteration
        event = await self._queue.get()
        if isinstance(event, InferError):
            self.is_done = True
            raise event
        self.is_done = event.finish_reason is not None
        return event

    def cancel(self) -> None:
        if not self.is_done:
            self._engine.cancel(self.id)
            self.is_done = True


# After a lookahead step that sampled at most this many requests, their events are made before the
# next plan is sent (see `Engine.run`); more events could take longer than the started step runs.
EVENTS_FIRST_MAX_REQUESTS = 16


class Engine:
    def __init__(self, scheduler: Scheduler, shards: ShardClient, tokenizer: Tokenizer, metrics: Metrics,
                 replica: int = 0):
        self.scheduler = scheduler
        self.shards = shards
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.replica = replica  # which data-parallel replica this engine runs (`replicas`)
        self._num_preemptions_seen = 0
        self._num_cached_seen = self._num_computed_seen = 0
        self._streams: dict[int, _Stream] = {}
        self._ids = itertools.count()
        self._wakeup = asyncio.Event()
        self._last_call: asyncio.Future | None = None
        self.tracer = None  # an OpenTelemetry tracer: steps get spans (`tracing`)
        self.num_steps = 0

    def submit(self, generation: GenerationInput) -> RequestStream:
        request_id = next(self._ids)
        stream = _Stream(
            generation,
            IncrementalDetokenizer(self.tokenizer, generation.input_ids),
            StopSequenceMatcher(list(generation.stop_sequences)),
        )
        request = Request(
            id=request_id,
            prompt_token_ids=list(generation.input_ids),
            max_new_tokens=generation.max_new_tokens,
            sampling=generation.sampling,
            top_n_tokens=generation.top_n_tokens,
            prompt_logprobs=[math.nan] * len(generation.input_ids) if generation.prompt_logprobs else None,
            is_constrained=generation.constraint is not None,
            stop_token_ids=frozenset() if generation.ignore_eos else self.tokenizer.eos_token_ids,
            adapter_id=generation.adapter_id,
        )
        self.scheduler.add(request)  # first: it may refuse the request (an adapter unloaded meanwhile)
        self._streams[request_id] = stream
        self._wakeup.set()
        return RequestStream(self, request, stream.events)

    def cancel(self, request_id: int) -> None:
        """Drops a request whose client went away; its KV blocks are free when this returns."""
        if self._streams.pop(request_id, None) is not None:
            self.scheduler.finish(request_id)
            self.metrics.request_failure.labels("dropped").inc()
            self._observe_batch()

    def fail_all(self, error: InferError) -> None:
        """Ends every request in flight (streaming or only scheduled) with `error`."""
        scheduled = [request.id for request in (*self.scheduler.waiting, *self.scheduler.running)]
        for request_id in {*self._streams, *scheduled}:
            self._fail(request_id, error)
        self._observe_batch()

    async def run(self) -> None:
        """Steps until cancelled. The next step is sent as soon as the finished one's tokens are known
        (before their text and events are made), so that Python work overlaps the shards' forward.
        Except after a lookahead step of a few requests: the shards are already running the next
        decode step then, and the requests' events (a first token among them) go out first."""
        in_flight: _InFlight | None = None
        while True:
            try:
                if in_flight is None:
                    if not self.scheduler.has_work:
                        self._wakeup.clear()
                        await self._wakeup.wait()
                        continue
                    in_flight = self._launch()
                    continue
                step, in_flight = in_flight, None
                sampled = await self._finish(step)
                events_first = step.plan.lookahead and len(sampled) <= EVENTS_FIRST_MAX_REQUESTS
                if events_first:
                    for new in sampled:
                        self._on_tokens(new)
                in_flight = self._launch() if self.scheduler.has_work else None
                await asyncio.sleep(0)  # grpc.aio sends the call on the loop's next turn: before the events
                if not events_first:
                    for new in sampled:
                        self._on_tokens(new)
                self._observe_batch()
            except ShardError as error:
                log.error("%s", error)
                self.fail_all(GenerationError(str(error)))
            except Exception as error:  # a bug must cost the batch in flight, not the server
                log.exception("step failed")
                self.fail_all(GenerationError(f"{type(error).__name__}: {error}"))

    def _launch(self) -> _InFlight | None:
        """Schedules the next step and sends it to the shards; None when there is nothing to run."""
        plan = self.scheduler.schedule()
        if not plan.scheduled and not self.scheduler.running:
            # Only possible for a request larger than the whole cache, which validation prevents.
            head = self.scheduler.waiting[0]
            self._fail(head.id, GenerationError("request does not fit in the KV cache"))
        if not plan.scheduled and not plan.finished_ids:
            return None
        constraints = self._masked(plan)
        decode_tokens = len(plan.scheduled) + plan.num_draft_tokens  # a token each, and the proposals verified
        method = "prefill" if plan.new_requests or plan.num_batched_tokens > decode_tokens else "decode"
        span = metadata = None
        if self.tracer is not None:
            span, metadata = start_step(self.tracer, plan.step_id, method, len(plan.scheduled), plan.num_batched_tokens)
        call = asyncio.ensure_future(self.shards.step(plan) if metadata is None else self.shards.step(plan, metadata))
        if constraints:
            masks = asyncio.ensure_future(self._send_masks(plan.step_id, constraints))
            call = asyncio.ensure_future(_after_masks(call, masks))
        self._last_call = call
        return _InFlight(plan, call, method, time.perf_counter(), span)

    async def wait_for_sent_steps(self) -> None:
        """Returns once every step sent so far is done, well or not (one is in flight at most)."""
        if self._last_call is not None and not self._last_call.done():
            await asyncio.wait([self._last_call])

    def _masked(self, plan: StepPlan) -> dict[int, Constraint]:
        """The constraint of every constrained request that samples in `plan`, by request id; they
        go in `plan.masked_ids`: their masks follow the step."""
        constraints = {
            chunk.request.id: self._streams[chunk.request.id].input.constraint for chunk in plan.scheduled
            if chunk.request.is_constrained and chunk.samples
        }
        plan.masked_ids.update(constraints)
        return constraints

    async def _send_masks(self, step_id: int, constraints: dict[int, Constraint]) -> None:
        """Computes the masks while the shards run the step's forward (llguidance's threads, off the
        event loop), then sends them: the shards need them only to sample."""
        masks = await asyncio.to_thread(compute_masks, list(constraints.values()))
        await self.shards.step_masks(step_id, dict(zip(constraints, masks)))

    async def _finish(self, step: _InFlight) -> list[NewTokens]:
        """Waits for `step` and advances its requests (the scheduler ends those that stop by length or
        end of sequence at once: their blocks are free for the next plan), and their grammars. Stop
        sequences need the text, which is made after the next step is sent: such a request leaves one
        step later, and the token computed for it meanwhile is dropped."""
        try:
            result = await step.call
        except Exception:
            self.metrics.step_failure.labels(step.method).inc()
            raise
        finally:
            if step.span is not None:
                step.span.end()
        self.num_steps += 1
        self._observe_step(step.plan, step.method, time.perf_counter() - step.started, result.forward_ns)
        if step.plan.num_draft_tokens:
            self._observe_speculation(step.plan, result)
        advanced = []
        for new in self.scheduler.update(step.plan, result):
            constraint = self._streams[new.request.id].input.constraint
            if constraint is not None:
                try:
                    new = self._advance_grammar(new, constraint)
                except RuntimeError as error:
                    log.error("request %d: %s", new.request.id, error)
                    self._fail(new.request.id, GenerationError(str(error)))
                    continue
            advanced.append(new)
        return advanced

    def _advance_grammar(self, new: NewTokens, constraint: Constraint) -> NewTokens:
        """Feeds the tokens to the request's grammar (before the next plan asks it for a mask); a
        grammar that allows nothing more ends the request (with ignore_eos, EOS tokens follow it)."""
        for kept, token in enumerate(new.tokens, 1):
            constraint.advance(token.token_id)
            if new.finish is None and constraint.is_finished and not self._streams[new.request.id].input.ignore_eos:
                self.scheduler.finish(new.request.id)
                del new.request.output_token_ids[len(new.request.output_token_ids) - len(new.tokens) + kept:]
                return NewTokens(new.request, new.tokens[:kept], FinishReason.EOS_TOKEN)
        return new

    def _observe_step(self, plan: StepPlan, method: str, seconds: float, forward_ns: int) -> None:
        metrics = self.metrics
        metrics.step_count.labels(method).inc()
        metrics.step_success.labels(method).inc()
        metrics.step_duration.labels(method).observe(seconds)
        metrics.forward_duration.labels(method).observe(forward_ns / 1e9)
        metrics.replica_steps.labels(str(self.replica)).inc()
        if plan.new_requests:
            metrics.batch_next_size.observe(len(plan.new_requests))

    def _observe_speculation(self, plan: StepPlan, result: StepResult) -> None:
        """Proposed and accepted tokens by position (the sample holds the accepted ones and one more)."""
        num_tokens = {sample.request_id: len(sample.tokens) for sample in result.samples}
        for chunk in plan.scheduled:
            num_accepted = num_tokens.get(chunk.request.id, 1) - 1
            for position in range(1, chunk.num_proposed + 1):
                self.metrics.speculative_proposed.labels(str(position)).inc()
                if position <= num_accepted:
                    self.metrics.speculative_accepted.labels(str(position)).inc()

    def _observe_batch(self) -> None:
        """The queue, batch and KV cache gauges, as they are now."""
        metrics, scheduler, blocks = self.metrics, self.scheduler, self.scheduler.blocks
        metrics.observe_batch(self.replica, len(scheduler.waiting), len(scheduler.running),
                              (blocks.num_usable_blocks - blocks.num_free_blocks) * blocks.block_size,
                              blocks.num_cached_free_blocks)
        metrics.preemptions.inc(scheduler.num_preemptions - self._num_preemptions_seen)
        self._num_preemptions_seen = scheduler.num_preemptions
        metrics.count_prompt_tokens(scheduler.num_cached_tokens - self._num_cached_seen,
                                    scheduler.num_computed_tokens - self._num_computed_seen)
        self._num_cached_seen, self._num_computed_seen = scheduler.num_cached_tokens, scheduler.num_computed_tokens

    def _on_tokens(self, new: NewTokens) -> None:
        """Emits an event per token. `new.finish` is the length or end-of-sequence stop found from the
        ids (on the last token); before it, a stop sequence in the text may end the request (TGI's
        order: length, end of sequence, stop sequences), and the tokens after it are dropped."""
        request = new.request
        stream = self._streams.get(request.id)
        if stream is None:  # cancelled meanwhile
            return
        first = len(request.output_token_ids) - len(new.tokens)
        for index, sample in enumerate(new.tokens):
            text = stream.detokenizer.push(sample.token_id)
            finish, keep = (new.finish if index == len(new.tokens) - 1 else None), None
            if finish is None and (keep := stream.stops.feed(text)) is not None:
                finish = FinishReason.STOP_SEQUENCE
                del request.output_token_ids[first + index + 1:]
            stream.events.put_nowait(TokenEvent(
                token=self._token(sample.token_id, sample.logprob, text),
                top_tokens=[self._token(t, lp) for t, lp in sample.top_tokens] if sample.top_tokens else [],
                finish_reason=finish,
                generated_text=None if finish is None else self._final_text(request, stream, keep),
            ))
            if finish is not None:
                del self._streams[request.id]
                self.scheduler.finish(request.id)
                return

    def _final_text(self, request: Request, stream: _Stream, keep: int | None) -> str:
        if keep is not None:
            return stream.detokenizer.text[:keep]
        return self.tokenizer.decode(request.output_token_ids, skip_special_tokens=True)

    def _token(self, token_id: int, logprob: float, text: str | None = None) -> Token:
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return Token(token_id, text, logprob, token_id in self.tokenizer.special_ids)

    def _fail(self, request_id: int, error: InferError) -> None:
        stream = self._streams.pop(request_id, None)
        self.scheduler.finish(request_id)
        if stream is not None:
            stream.events.put_nowait(error)


async def _after_masks(step: asyncio.Future, masks: asyncio.Future) -> StepResult:
    """The step's result once its masks went out too; a failure of either fails the step (and the
    other is cancelled rather than left waiting)."""
    try:
        await asyncio.wait([step, masks], return_when=asyncio.FIRST_EXCEPTION)
        if masks.done() and masks.exception() is not None:
            raise masks.exception()
        return await step
    finally:
        for future in (step, masks):
            future.cancel()

"""The gRPC servicer: converts protobuf to the runner's plain types and back, nothing more.

Calls that touch the model are serialised with a lock (the router sends one step at a time anyway);
Health, Info and StepMasks answer without waiting for a running step: a step whose grammar masks
follow runs its forward, then waits for its StepMasks call (which may also come first).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import grpc

from tgi_proto.generate.v1 import generate_pb2 as pb
from tgi_proto.generate.v1 import generate_pb2_grpc as pb_grpc
from tgi_proto.settings import split_revision
from tgi_proto.tracing import extract
from tgi_server.lora import AdapterStore, LoraAdapterError, read_adapter
from tgi_server.model_runner import ModelRunner, NewSequence, ScheduledSequence
from tgi_server.sampler import SamplingParams
from tgi_server.warmup import warmup

# A step whose grammar masks follow fails if they do not come within this long (the router sends
# them a few milliseconds after the step).
MASKS_TIMEOUT_SECONDS = 60.0


class TextGenerationService(pb_grpc.TextGenerationServiceServicer):
    def __init__(self, runner: ModelRunner, info: pb.InfoResponse, rank: int, memory_fraction: float = 1.0,
                 adapters: AdapterStore | None = None, answers: bool | None = None):
        """`answers`: whether this shard's step responses carry the samples (default: rank 0's; with
        pipeline stages, the last stage's first shard's)."""
        self.runner = runner
        self.answers = rank == 0 if answers is None else answers
        self.adapters = adapters
        self.tracer = None  # an OpenTelemetry tracer (--otlp-endpoint): each step gets a span under the router's
        self.memory_fraction = memory_fraction
        self.info = info
        self.rank = rank
        self._lock = threading.Lock()
        self._masks_lock = threading.Lock()
        self._masks: dict[int, _Masks] = {}  # step id -> the masks that follow it
        self.masks_timeout = MASKS_TIMEOUT_SECONDS

    def Info(self, request, context):
        return self.info

    def Health(self, request, context):
        return pb.HealthResponse()

    def Warmup(self, request: pb.WarmupRequest, context):
        with self._lock:
            try:
                num_blocks = warmup(
                    self.runner,
                    request.max_batch_prefill_tokens,
                    request.max_total_tokens,
                    request.max_batch_size,
                    request.max_batch_total_tokens,
                    self.memory_fraction,
                )
            except RuntimeError as error:  # out of memory, mostly
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"warmup failed: {error}")
        return pb.WarmupResponse(num_blocks=num_blocks, block_size=self.runner.block_size)

    def StepMasks(self, request: pb.StepMasksRequest, context):
        masks = self._step_masks(request.step_id)
        masks.allowed_tokens = dict(request.allowed_tokens)
        masks.arrived.set()
        return pb.StepMasksResponse()

    def _step_masks(self, step_id: int) -> _Masks:
        with self._masks_lock:
            return self._masks.setdefault(step_id, _Masks())

    def _wait_for_masks(self, step_id: int) -> dict[int, bytes]:
        masks = self._step_masks(step_id)
        if not masks.arrived.wait(self.masks_timeout):
            raise ValueError(f"the grammar masks of step {step_id} did not come within {self.masks_timeout:.0f} s")
        return masks.allowed_tokens

    def Step(self, request: pb.StepRequest, context):
        new = [
            NewSequence(r.id, list(r.token_ids), _sampling_from_pb(r.sampling), r.top_n_tokens, r.prompt_logprobs,
                        r.num_cached_tokens, r.adapter_slot)
            for r in request.new_requests
        ]
        scheduled = [
            ScheduledSequence(s.id, s.num_tokens, list(s.new_block_ids), s.last_token, s.allowed_tokens, s.mask_follows,
                              list(s.draft_token_ids), s.num_model_drafts)
            for s in request.scheduled
        ]
        masks = (lambda: self._wait_for_masks(request.step_id)) if request.masks_follow else None
        if self.tracer is None:
            return self._step(request, new, scheduled, masks, context)
        parent = extract(context.invocation_metadata())
        attributes = {"step_id": request.step_id, "rank": self.rank, "batch_size": len(scheduled),
                      "new_requests": len(new), "batch_tokens": sum(s.num_tokens for s in scheduled)}
        with self.tracer.start_as_current_span("step", context=parent, attributes=attributes) as span:
            response = self._step(request, new, scheduled, masks, context)
            span.set_attribute("forward_ms", response.forward_ns / 1e6)
            return response

    def _step(self, request: pb.StepRequest, new, scheduled, masks, context) -> pb.StepResponse:
        with self._lock:
            try:
                for placement in request.adapter_placements:
                    if self.adapters is None:
                        raise ValueError("LoRA is off on this shard (max_loras 0)")
                    self.adapters.place(placement.slot, placement.adapter_id)
                output = self.runner.step(list(request.finished_ids), new, scheduled, request.lookahead, masks)
            except (KeyError, ValueError) as error:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"step {request.step_id}: {error!r}")
            finally:
                with self._masks_lock:
                    self._masks.pop(request.step_id, None)
        if not self.answers:
            return pb.StepResponse(forward_ns=output.forward_ns)
        return pb.StepResponse(
            prompt_logprobs=[
                pb.PromptLogprobs(request_id=p.request_id, start=p.start, logprobs=p.logprobs)
                for p in output.prompt_logprobs
            ],
            samples=[
                pb.Sample(request_id=s.request_id, tokens=[pb.SampledToken(
                    token_id=t.token_id, logprob=t.logprob,
                    top_tokens=[pb.TopToken(token_id=i, logprob=lp) for i, lp in t.top_tokens],
                ) for t in s.tokens])
                for s in output.samples
            ],
            forward_ns=output.forward_ns,
        )

    def ClearCache(self, request, context):
        with self._lock:
            self.runner.clear()
        return pb.ClearCacheResponse()

    def LoadAdapter(self, request: pb.LoadAdapterRequest, context):
        """Reads and checks the adapter beside any running step (the step lock is not taken)."""
        from tgi_server.prepare import PrepareError, prepare_adapter

        if self.adapters is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "LoRA is off: start with --max-loras N (or --lora-adapters)")
        try:
            directory = prepare_adapter(*split_revision(request.path), os.environ.get("HUGGINGFACE_HUB_CACHE"))
            adapter = read_adapter(request.name, directory)
            self.adapters.add(request.adapter_id, adapter)
        except (PrepareError, LoraAdapterError) as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return pb.LoadAdapterResponse(rank=adapter.rank)

    def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context):
        if self.adapters is not None:
            self.adapters.remove(request.adapter_id)
        return pb.UnloadAdapterResponse()


@dataclass
class _Masks:
    arrived: threading.Event = field(default_factory=threading.Event)
    allowed_tokens: dict[int, bytes] = field(default_factory=dict)


def _sampling_from_pb(p: pb.SamplingParameters) -> SamplingParams:
    return SamplingParams(
        do_sample=p.do_sample,
        temperature=p.temperature or 1.0,
        top_k=p.top_k,
        top_p=p.top_p or 1.0,
        typical_p=p.typical_p or 1.0,
        repetition_penalty=p.repetition_penalty or 1.0,
        frequency_penalty=p.frequency_penalty,
        seed=p.seed,
        watermark=p.watermark,
        min_p=p.min_p,
        logit_bias=tuple(sorted(p.logit_bias.items())),
    )

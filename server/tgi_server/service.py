"""The gRPC servicer: converts protobuf to the runner's plain types and back, nothing more.

Calls that touch the model are serialised with a lock (the router sends one step at a time anyway);
Health and Info answer without waiting for a running step.
"""

from __future__ import annotations

import threading

import grpc

from tgi_proto.generate.v1 import generate_pb2 as pb
from tgi_proto.generate.v1 import generate_pb2_grpc as pb_grpc
from tgi_server.model_runner import ModelRunner, NewSequence, ScheduledSequence
from tgi_server.sampler import SamplingParams
from tgi_server.warmup import warmup


class TextGenerationService(pb_grpc.TextGenerationServiceServicer):
    def __init__(self, runner: ModelRunner, info: pb.InfoResponse, rank: int, memory_fraction: float = 1.0):
        self.runner = runner
        self.memory_fraction = memory_fraction
        self.info = info
        self.rank = rank
        self._lock = threading.Lock()

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

    def Step(self, request: pb.StepRequest, context):
        new = [
            NewSequence(r.id, list(r.token_ids), _sampling_from_pb(r.sampling), r.top_n_tokens, r.prompt_logprobs)
            for r in request.new_requests
        ]
        scheduled = [
            ScheduledSequence(s.id, s.num_tokens, list(s.new_block_ids), s.last_token, s.allowed_tokens)
            for s in request.scheduled
        ]
        with self._lock:
            try:
                output = self.runner.step(list(request.finished_ids), new, scheduled, request.lookahead)
            except (KeyError, ValueError) as error:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"step {request.step_id}: {error!r}")
        if self.rank != 0:
            return pb.StepResponse(forward_ns=output.forward_ns)
        return pb.StepResponse(
            prompt_logprobs=[
                pb.PromptLogprobs(request_id=p.request_id, start=p.start, logprobs=p.logprobs)
                for p in output.prompt_logprobs
            ],
            samples=[
                pb.Sample(
                    request_id=s.request_id,
                    token_id=s.token_id,
                    logprob=s.logprob,
                    top_tokens=[pb.TopToken(token_id=t, logprob=lp) for t, lp in s.top_tokens],
                )
                for s in output.samples
            ],
            forward_ns=output.forward_ns,
        )

    def ClearCache(self, request, context):
        with self._lock:
            self.runner.clear()
        return pb.ClearCacheResponse()


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

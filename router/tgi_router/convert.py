"""The only boundary between protobuf messages and the router's dataclasses."""

from __future__ import annotations

import dataclasses

from tgi_proto.generate.v1 import generate_pb2 as pb
from tgi_router.request import PromptLogprobs, Request, Sample, SampledToken, SamplingParams, StepPlan, StepResult


def step_request(plan: StepPlan) -> pb.StepRequest:
    return pb.StepRequest(
        step_id=plan.step_id,
        finished_ids=plan.finished_ids,
        new_requests=[_new_request(r) for r in plan.new_requests],
        scheduled=[
            pb.ScheduledRequest(
                id=c.request.id, num_tokens=c.num_tokens, new_block_ids=c.new_block_ids, last_token=c.last_token,
                mask_follows=c.request.id in plan.masked_ids, draft_token_ids=c.draft_token_ids,
                num_model_drafts=c.num_model_drafts,
            )
            for c in plan.scheduled
        ],
        lookahead=plan.lookahead,
        masks_follow=bool(plan.masked_ids),
        adapter_placements=[pb.AdapterPlacement(slot=slot, adapter_id=adapter_id)
                            for slot, adapter_id in plan.adapter_placements],
    )


def step_masks(step_id: int, masks: dict[int, bytes]) -> pb.StepMasksRequest:
    return pb.StepMasksRequest(step_id=step_id, allowed_tokens=masks)


def step_result(response: pb.StepResponse) -> StepResult:
    samples = [
        Sample(s.request_id, tuple(
            SampledToken(t.token_id, t.logprob, tuple((top.token_id, top.logprob) for top in t.top_tokens)) for t in s.tokens
        ))
        for s in response.samples
    ]
    prompt_logprobs = [
        PromptLogprobs(p.request_id, p.start, tuple(p.logprobs)) for p in response.prompt_logprobs
    ]
    return StepResult(samples, response.forward_ns, prompt_logprobs)


def _new_request(request: Request) -> pb.NewRequest:
    return pb.NewRequest(
        id=request.id,
        token_ids=request.all_token_ids,
        sampling=_sampling(request.sampling),
        top_n_tokens=request.top_n_tokens,
        prompt_logprobs=request.prompt_logprobs is not None,
        # A joining request's computed tokens are its cached prefix (plans are converted when sent).
        num_cached_tokens=request.num_computed_tokens,
        adapter_slot=request.adapter_slot,
    )


def _sampling(params: SamplingParams) -> pb.SamplingParameters:
    # Field names are the proto's.
    fields = dataclasses.asdict(params)
    fields["logit_bias"] = dict(params.logit_bias)
    return pb.SamplingParameters(**fields)

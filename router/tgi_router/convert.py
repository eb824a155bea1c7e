"""The only boundary between protobuf messages and the router's dataclasses."""

from __future__ import annotations

import dataclasses

from tgi_proto.generate.v1 import generate_pb2 as pb
from tgi_router.request import PromptLogprobs, Request, Sample, SampledToken, SamplingParams, StepPlan, StepResult


def step_request(plan: StepPlan) -> pb.StepRequest:
    # Built in place, default fields left unset: at 128 requests a step, this is a hot loop.
    request = pb.StepRequest(
        step_id=plan.step_id,
        finished_ids=plan.finished_ids,
        new_requests=[_new_request(r) for r in plan.new_requests],
        lookahead=plan.lookahead,
        masks_follow=bool(plan.masked_ids),
        adapter_placements=[pb.AdapterPlacement(slot=slot, adapter_id=adapter_id)
                            for slot, adapter_id in plan.adapter_placements],
    )
    add, masked_ids = request.scheduled.add, plan.masked_ids
    for chunk in plan.scheduled:
        item = add(id=chunk.request.id, num_tokens=chunk.num_tokens)
        if chunk.new_block_ids:
            item.new_block_ids.extend(chunk.new_block_ids)
        if chunk.last_token:
            item.last_token = True
        if masked_ids and chunk.request.id in masked_ids:
            item.mask_follows = True
        if chunk.draft_token_ids:
            item.draft_token_ids.extend(chunk.draft_token_ids)
        if chunk.num_model_drafts:
            item.num_model_drafts = chunk.num_model_drafts
    return request


def step_masks(step_id: int, masks: dict[int, bytes]) -> pb.StepMasksRequest:
    return pb.StepMasksRequest(step_id=step_id, allowed_tokens=masks)


def step_result(response: pb.StepResponse) -> StepResult:
    samples = [Sample(s.request_id, tuple(map(_sampled_token, s.tokens))) for s in response.samples]
    prompt_logprobs = [
        PromptLogprobs(p.request_id, p.start, tuple(p.logprobs)) for p in response.prompt_logprobs
    ]
    return StepResult(samples, response.forward_ns, prompt_logprobs)


def _sampled_token(token: pb.SampledToken) -> SampledToken:
    top = token.top_tokens
    return SampledToken(token.token_id, token.logprob, tuple([(t.token_id, t.logprob) for t in top]) if top else ())


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

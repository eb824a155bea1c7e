"""What a shard's runner keeps per request and exchanges with the router each step: a sequence's
tokens and block table (`Sequence`), the step's plan (`NewSequence`, `ScheduledSequence`), a row of
the batch being run (`BatchRow`), and what the step gives back (`StepOutput`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from tgi_server.sampler import SamplingParams


@dataclass
class Sequence:
    token_ids: list[int]
    sampling: SamplingParams
    top_n_tokens: int
    # Tokens known when the request arrived; prompt logprobs cover these.
    num_prompt_tokens: int
    wants_prompt_logprobs: bool = False
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # This step's grammar mask when the sequence samples under one (ScheduledSequence.allowed_tokens).
    allowed_tokens: bytes = b""
    # This step's mask comes later, from the step's `masks` source (ScheduledSequence.mask_follows).
    mask_follows: bool = False
    # Proposed tokens at the end of `token_ids` that this step verifies (speculative decoding).
    num_drafts: int = 0
    # Leading tokens whose KV the draft model has computed (`tgi_server.drafter`).
    num_draft_computed: int = 0
    # The LoRA adapter slot its tokens go through (`tgi_server.lora`); 0: the base model.
    adapter_slot: int = 0


@dataclass(frozen=True)
class NewSequence:
    id: int
    token_ids: list[int]
    sampling: SamplingParams
    top_n_tokens: int
    wants_prompt_logprobs: bool = False
    # Leading tokens whose KV is in the cache already (a shared prefix), in the first blocks the
    # sequence's first ScheduledSequence brings.
    num_cached_tokens: int = 0
    adapter_slot: int = 0


@dataclass(frozen=True)
class ScheduledSequence:
    id: int
    num_tokens: int
    new_block_ids: list[int]
    # The token sampled this step is the request's last: no lookahead row for it.
    last_token: bool = False
    # Packed bitmask of the tokens a grammar allows next (the proto's field); empty: any.
    allowed_tokens: bytes = b""
    # The mask comes from the step's `masks` source, read just before sampling.
    mask_follows: bool = False
    # Proposed tokens to verify (speculative decoding; the proto's `draft_token_ids`).
    draft_token_ids: list[int] = field(default_factory=list)
    # Tokens the draft model proposes after the known ones, then verified (the proto's `num_model_drafts`).
    num_model_drafts: int = 0


@dataclass(frozen=True)
class PromptLogprobs:
    """logprobs[i] = log p(token[start + i] | tokens before it), for prompt tokens computed this step."""

    request_id: int
    start: int
    logprobs: list[float]


@dataclass(frozen=True)
class StepOutput:
    samples: list[Sample]
    prompt_logprobs: list[PromptLogprobs]
    forward_ns: int


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float
    top_tokens: list[tuple[int, float]]


@dataclass(frozen=True)
class Sample:
    """The tokens a step produced for a request: one, or the accepted proposals and the token after."""

    request_id: int
    tokens: list[SampledToken]


class BatchRow(NamedTuple):
    """A sequence in the step being run, and how many of its tokens the step computes."""

    request_id: int
    sequence: Sequence
    num_tokens: int

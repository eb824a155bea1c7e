"""The router's view of a request and of one engine step.

These dataclasses are what the scheduler plans with and what `convert.py` turns into protobuf; nothing
here knows about gRPC or HTTP.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"


@dataclass(frozen=True)
class SamplingParams:
    """Sampling controls sent to the shards; the defaults mean greedy decoding."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    seed: int = 0
    watermark: bool = False
    min_p: float = 0.0  # 0 = off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), sorted by id


@dataclass(eq=False)
class Request:
    """One sequence being generated.

    `num_computed_tokens` catches up with `num_tokens` (prompt plus generated); when a step makes them
    equal, the shard samples a token and the sequence grows by one.
    """

    id: int
    prompt_token_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    top_n_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    # The first `num_cached_blocks` of `block_ids` are in the prefix cache (full, computed).
    num_cached_blocks: int = 0
    # Chained hashes of the full blocks of known tokens, as far as computed (the prefix cache's keys).
    block_hashes: list[bytes] = field(default_factory=list)
    # Prompt tokens whose KV came from the prefix cache when the request was first scheduled.
    num_cached_prompt_tokens: int = 0
    # False until the shards have received this request in full (again after a preemption).
    is_on_shards: bool = False
    num_preemptions: int = 0
    # Logprob of each prompt token (NaN until computed; the first never is), when asked for.
    prompt_logprobs: list[float] | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    # When the request first joined a batch (the end of its queue time), and got its first token.
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # A grammar constrains its tokens: the engine sends a mask whenever it samples, and no step that
    # runs it may be started ahead of its plan (the mask needs the token sampled before).
    is_constrained: bool = False
    # The token ids that end it (the tokenizer's end-of-sequence ids; none with ignore_eos).
    stop_token_ids: frozenset[int] = frozenset()
    # The LoRA adapter its tokens go through (`LoraAdapters` ids; 0: the base model), part of its
    # blocks' hashes, and the shards' slot holding it while the request runs (given by the scheduler).
    adapter_id: int = 0
    adapter_slot: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens


@dataclass(frozen=True)
class ScheduledChunk:
    """`num_tokens` tokens of `request` computed this step, with the blocks appended for them."""

    request: Request
    num_tokens: int
    new_block_ids: list[int]
    # The token sampled after this chunk is the request's last (it reaches max_new_tokens).
    last_token: bool = False
    # Speculative decoding: proposed tokens after the request's known ones, computed in this chunk
    # too (`num_tokens` counts them) and verified by the shards.
    draft_token_ids: tuple[int, ...] = ()
    # ... or the number of tokens the shards' draft model proposes (and verifies) instead.
    num_model_drafts: int = 0

    @property
    def num_proposed(self) -> int:
        """Proposed tokens this chunk verifies, from the router or the draft model."""
        return len(self.draft_token_ids) + self.num_model_drafts

    @property
    def samples(self) -> bool:
        """Whether the request samples after this chunk (its known tokens are then all computed)."""
        return self.request.num_computed_tokens + self.num_tokens - self.num_proposed == self.request.num_tokens


@dataclass
class StepPlan:
    """What one step changes: ids the shards forget, requests they learn, and the batch."""

    step_id: int
    finished_ids: list[int]
    new_requests: list[Request]
    scheduled: list[ScheduledChunk]
    # No request waits, so the shards may start the next decode step early (the proto's `lookahead`).
    lookahead: bool = False
    # The constrained requests that sample this step: their grammar masks follow the step (the
    # proto's `ScheduledRequest.mask_follows`; the engine fills this in and sends the masks).
    masked_ids: set[int] = field(default_factory=set)
    # (slot, adapter id): LoRA adapters the shards copy into GPU slots before the step.
    adapter_placements: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.scheduled)

    @property
    def num_draft_tokens(self) -> int:
        return sum(chunk.num_proposed for chunk in self.scheduled)


@dataclass(frozen=True)
class SampledToken:
    """A token a shard sampled, with its logprob and the top-n alternatives."""

    token_id: int
    logprob: float
    top_tokens: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Sample:
    """The tokens one step produced for a request, in order (the proto's `Sample`)."""

    request_id: int
    tokens: tuple[SampledToken, ...]


@dataclass(frozen=True)
class NewTokens:
    """What a step added to a request: the tokens kept (up to the first that ends it) and, when one
    did, why (length or end of sequence: the stops that need no text)."""

    request: Request
    tokens: tuple[SampledToken, ...]
    finish: FinishReason | None = None


@dataclass(frozen=True)
class PromptLogprobs:
    """logprobs[i] is the logprob of prompt token `start + i` of request `request_id`."""

    request_id: int
    start: int
    logprobs: tuple[float, ...]


@dataclass(frozen=True)
class StepResult:
    samples: list[Sample]
    forward_ns: int = 0
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)

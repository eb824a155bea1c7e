"""Runs steps on one shard: keeps each request's tokens and block table, builds the flat batch for a
forward pass over the paged KV cache, and samples for the requests whose prompt is fully computed.

The router decides everything (which requests, how many tokens, which blocks); this module only
follows the plan. All ranks run the same plan and sample the same tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from tgi_server.distributed import TPGroup
from tgi_server.layers.attention import AttentionMetadata, kv_cache_shape
from tgi_server.sampler import SamplingBatch, SamplingParams, sample


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


@dataclass(frozen=True)
class NewSequence:
    id: int
    token_ids: list[int]
    sampling: SamplingParams
    top_n_tokens: int
    wants_prompt_logprobs: bool = False


@dataclass(frozen=True)
class ScheduledSequence:
    id: int
    num_tokens: int
    new_block_ids: list[int]


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
class Sample:
    request_id: int
    token_id: int
    logprob: float
    top_tokens: list[tuple[int, float]]


class ModelRunner:
    def __init__(self, model, config, tp: TPGroup, device: torch.device, dtype: torch.dtype, block_size: int):
        self.model = model
        self.config = config
        self.tp = tp
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.sequences: dict[int, Sequence] = {}
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = []  # free the old cache before allocating the new one
        shape = kv_cache_shape(self.config, self.tp, num_blocks, self.block_size)
        self.kv_caches = [
            torch.zeros(shape, dtype=self.dtype, device=self.device)  # [2, blocks, block, kv_heads, head_dim]
            for _ in range(self.config.num_hidden_layers)
        ]
        self.num_blocks = num_blocks

    def kv_cache_bytes_per_block(self) -> int:
        shape = kv_cache_shape(self.config, self.tp, 1, self.block_size)
        return math.prod(shape) * self.dtype.itemsize * self.config.num_hidden_layers

    def clear(self) -> None:
        self.sequences.clear()

    @torch.inference_mode()
    def step(
        self, finished_ids: list[int], new: list[NewSequence], scheduled: list[ScheduledSequence]
    ) -> StepOutput:
        """Applies one plan; returns the samples (batch order), any prompt logprobs, and the
        forward+sampling time in ns."""
        start = time.perf_counter_ns()
        for request_id in finished_ids:
            self.sequences.pop(request_id, None)
        for request in new:
            self.sequences[request.id] = Sequence(
                list(request.token_ids), request.sampling, request.top_n_tokens,
                num_prompt_tokens=len(request.token_ids), wants_prompt_logprobs=request.wants_prompt_logprobs,
            )
        batch = []
        for item in scheduled:
            sequence = self.sequences[item.id]
            sequence.block_table.extend(item.new_block_ids)
            batch.append((item.id, sequence, item.num_tokens))
        samples, prompt_logprobs = self._forward_and_sample(batch) if batch else ([], [])
        return StepOutput(samples, prompt_logprobs, time.perf_counter_ns() - start)

    def _forward_and_sample(self, batch: list[tuple[int, Sequence, int]]) -> tuple[list[Sample], list[PromptLogprobs]]:
        input_ids, positions, attn, sample_rows = self._prepare(batch)
        hidden = self.model(input_ids, positions, attn, self.kv_caches)  # [num_tokens, hidden]
        prompt_logprobs = self._prompt_logprobs(batch, hidden, attn.query_start_loc_cpu)
        to_sample = [(request_id, seq) for request_id, seq, n in batch if seq.num_computed_tokens + n == len(seq.token_ids)]
        for _, seq, n in batch:
            seq.num_computed_tokens += n
        if not to_sample:
            return [], prompt_logprobs
        logits = self.model.compute_logits(hidden[sample_rows])  # [num_samples, vocab]
        return self._sample(logits, to_sample), prompt_logprobs

    def _prompt_logprobs(self, batch, hidden: torch.Tensor, query_start_loc: list[int]) -> list[PromptLogprobs]:
        """Raw-model logprobs of the next prompt token at each prompt position computed this step."""
        rows, targets, spans = [], [], []
        for (request_id, seq, num_tokens), first_row in zip(batch, query_start_loc):
            start = seq.num_computed_tokens
            stop = min(start + num_tokens, seq.num_prompt_tokens - 1)  # positions with a next prompt token
            if not seq.wants_prompt_logprobs or stop <= start:
                continue
            rows += range(first_row, first_row + stop - start)
            targets += seq.token_ids[start + 1 : stop + 1]
            spans.append((request_id, start + 1, stop - start))
        if not rows:
            return []
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])  # [rows, vocab]
        target_ids = torch.tensor(targets, device=self.device)[:, None]
        values = torch.log_softmax(logits, dim=-1).gather(1, target_ids).squeeze(1).tolist()
        out, offset = [], 0
        for request_id, first_position, count in spans:
            out.append(PromptLogprobs(request_id, first_position, values[offset : offset + count]))
            offset += count
        return out

    def _prepare(self, batch: list[tuple[int, Sequence, int]]):
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        block_size = self.block_size
        for _, seq, num_tokens in batch:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_tokens
            if end > len(seq.block_table) * block_size:
                raise ValueError(f"block table of {len(seq.block_table)} blocks cannot hold {end} tokens")
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            table = seq.block_table
            slots += [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
            query_start_loc.append(query_start_loc[-1] + num_tokens)
            seq_lens.append(end)
            if end == len(seq.token_ids):
                sample_rows.append(query_start_loc[-1] - 1)
        width = max(len(seq.block_table) for _, seq, _ in batch)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for _, seq, _ in batch]
        device = self.device
        attn = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),  # [num_tokens]
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),  # [B + 1]
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),  # [B]
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device),  # [B, max_blocks]
            query_start_loc_cpu=query_start_loc,
            seq_lens_cpu=seq_lens,
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=device)  # [num_tokens]
        pos = torch.tensor(positions, dtype=torch.int64, device=device)  # [num_tokens]
        return ids, pos, attn, torch.tensor(sample_rows, dtype=torch.int64, device=device)

    def _sample(self, logits: torch.Tensor, to_sample: list[tuple[int, Sequence]]) -> list[Sample]:
        params = [seq.sampling for _, seq in to_sample]
        batch = SamplingBatch.build(params, [seq.token_ids for _, seq in to_sample], self.device)
        out = sample(logits, batch, [seq.top_n_tokens for _, seq in to_sample])
        token_ids = out.token_ids.tolist()
        logprobs = out.logprobs.tolist()
        top_ids, top_logprobs = out.top_ids.tolist(), out.top_logprobs.tolist()
        top_counts = out.top_counts.tolist()
        samples = []
        for row, (request_id, seq) in enumerate(to_sample):
            seq.token_ids.append(token_ids[row])
            n = top_counts[row]
            top = list(zip(top_ids[row][:n], top_logprobs[row][:n]))
            samples.append(Sample(request_id, token_ids[row], logprobs[row], top))
        return samples

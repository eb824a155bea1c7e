"""Runs steps on one shard: keeps each request's tokens and block table, builds the flat batch for a
forward pass over the paged KV cache, and samples for the requests whose prompt is fully computed.

The router decides everything (which requests, how many tokens, which blocks); this module only
follows the plan. All ranks run the same plan and sample the same tokens.

Lookahead: when the router says nothing waits and the step's batch will decode next (on CUDA, with
graphs), the runner starts that next decode step before returning; the GPU runs it while the router
handles the result. The next plan's decode rows that match what was started (same sequence,
unchanged since) take its samples; everything else is computed as usual. When a plan is entirely
served by the started step, the runner chains: it queues the step after it at once, fed with the
started step's sampled tokens on the device, and only then waits for the started step's samples, so
the GPU never idles between decode steps. A started row recomputes exactly what the plan would have
asked (sampling is a pure function of the sequence and its seed), so reusing it changes nothing but
the time. Rows with penalties, a watermark or top-n alternatives need the host's copy of the tokens,
so they are never chained.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tgi_server.cuda_graphs import DecodeGraphs, MixedGraphs, token_buckets
from tgi_server.distributed import TPGroup
from tgi_server.drafter import Drafter
from tgi_server.attention_metadata import allocate_kv_caches, kv_cache_bytes_per_block
from tgi_server.flat_batch import FlatBatch, Span, decode_slots, flatten, forward_flat
from tgi_server.sampler import SamplerOutput, SamplingBatch, SamplingParams, Watermark, sample


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


@dataclass
class _Lookahead:
    """A decode step started before its plan arrived; row i decodes the token at positions[i] of
    sequences[i] (its last token, or for a chained step the token the step before is sampling)."""

    sequences: list[Sequence]
    # Valid while the sequence's num_computed_tokens equals this (the row's decode position).
    positions: list[int]
    output: SamplerOutput  # on the device
    # Pinned host copies of output's token ids and logprobs, complete once `done` has passed (None
    # off CUDA, where the copies are complete when made).
    host_token_ids: torch.Tensor
    host_logprobs: torch.Tensor
    done: torch.cuda.Event | None


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


class ModelRunner:
    def __init__(
        self,
        model,
        config,
        tp: TPGroup,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int,
        cuda_graph_sizes: tuple[int, ...] = (),
        kv_cache_dtype: torch.dtype | None = None,
        watermark: Watermark = Watermark(),
        drafter: Drafter | None = None,
    ):
        self.model = model
        self.drafter = drafter
        self.config = config
        self.tp = tp
        self.device = device
        self.dtype = dtype
        # The KV cache's element type: the model's, or an fp8 type (values stored as they are, unscaled).
        self.kv_cache_dtype = kv_cache_dtype or dtype
        self.block_size = block_size
        self.watermark = watermark
        self.sequences: dict[int, Sequence] = {}
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        # Decode batch sizes to replay as CUDA graphs once the KV cache exists (none on CPU).
        self.cuda_graph_sizes = cuda_graph_sizes if device.type == "cuda" else ()
        self.decode_graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        self._lookahead: _Lookahead | None = None
        self._masks: Callable[[], dict[int, bytes]] | None = None  # this step's source of following masks
        self.num_lookahead_rows_used = 0  # samples served from a started step (a statistic)
        self.num_chained_steps = 0  # decode steps queued behind a started one (a statistic)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._lookahead = None
        self.decode_graphs = self.mixed_graphs = None  # graphs address the old cache
        self.kv_caches = []  # free the old cache before allocating the new one
        self.kv_caches = allocate_kv_caches(self.model.kv_cache_specs, num_blocks, self.block_size, self.kv_cache_dtype,
                                            self.device)
        self.num_blocks = num_blocks
        if self.drafter is not None:
            self.drafter.allocate_kv_cache(num_blocks)

    def capture_cuda_graphs(self, max_total_tokens: int, max_batch_size: int, max_batch_tokens: int) -> None:
        """Captures, over the current KV cache, for sequences of up to `max_total_tokens` tokens:
        decode steps of the `cuda_graph_sizes` up to `max_batch_size` (and that size itself), and
        mixed steps of up to `max_batch_tokens` tokens in `max_batch_size` sequences."""
        sizes = [size for size in self.cuda_graph_sizes if size < max_batch_size]
        if self.cuda_graph_sizes and max(self.cuda_graph_sizes) >= max_batch_size:
            sizes.append(max_batch_size)
        if not sizes or not self.num_blocks:
            return
        self._check_thread_device()
        max_blocks_per_seq = -(-(max_total_tokens + 1) // self.block_size)  # + the lookahead token
        self.mixed_graphs = MixedGraphs(
            self.model, self.kv_caches, token_buckets(max_batch_tokens), max_batch_size, max_blocks_per_seq, self.device
        )
        has_lora = any(getattr(layer, "lora", None) is not None for layer in self.model.modules())
        self.decode_graphs = DecodeGraphs(
            self.model, self.kv_caches, sizes, max_blocks_per_seq, self.device, pool=self.mixed_graphs.pool, lora=has_lora
        )
        if self.drafter is not None:
            self.drafter.capture_cuda_graphs(sizes, max_batch_size, max_blocks_per_seq, self.decode_graphs.pool)

    def _check_thread_device(self) -> None:
        """Refuses to run on a thread whose current CUDA device is another GPU: CUDA graphs would be
        captured on the wrong stream and kernels launched on the wrong device (see
        `tgi_server.cli.device_thread_pool`)."""
        if self.device.type == "cuda" and self.device.index is not None:
            current = torch.cuda.current_device()
            if current != self.device.index:
                raise RuntimeError(
                    f"the model of {self.device} was called from a thread whose current device is cuda:{current}"
                )

    def kv_cache_bytes_per_block(self) -> int:
        draft_bytes = self.drafter.kv_cache_bytes_per_block() if self.drafter is not None else 0
        return kv_cache_bytes_per_block(self.model.kv_cache_specs, self.block_size, self.kv_cache_dtype) + draft_bytes

    def clear(self) -> None:
        self.sequences.clear()
        self._lookahead = None

    @torch.inference_mode()
    def step(
        self,
        finished_ids: list[int],
        new: list[NewSequence],
        scheduled: list[ScheduledSequence],
        lookahead: bool = False,
        masks: Callable[[], dict[int, bytes]] | None = None,
    ) -> StepOutput:
        """Applies one plan; returns the samples (one per request that sampled, in no set order),
        any prompt logprobs, and the step's time in ns. With `lookahead`, may start the next decode
        step (see the module's docstring). `masks()` gives the grammar masks of the sequences whose
        mask follows; it is called once the forward is queued, just before sampling (it may wait
        for them: the forward runs meanwhile)."""
        self._masks = masks
        self._check_thread_device()
        start = time.perf_counter_ns()
        started, self._lookahead = self._lookahead, None
        for request_id in finished_ids:
            self.sequences.pop(request_id, None)
        for request in new:
            if not 0 <= request.num_cached_tokens < len(request.token_ids) or request.num_cached_tokens % self.block_size:
                raise ValueError(f"request {request.id}: {request.num_cached_tokens} cached tokens of "
                                 f"{len(request.token_ids)} (blocks of {self.block_size})")
            self.sequences[request.id] = Sequence(
                list(request.token_ids), request.sampling, request.top_n_tokens,
                num_prompt_tokens=len(request.token_ids), wants_prompt_logprobs=request.wants_prompt_logprobs,
                num_computed_tokens=request.num_cached_tokens, adapter_slot=request.adapter_slot,
            )
        batch, continuing = [], []
        for item in scheduled:
            sequence = self.sequences[item.id]
            sequence.block_table.extend(item.new_block_ids)
            sequence.allowed_tokens = item.allowed_tokens
            sequence.mask_follows = item.mask_follows
            batch.append((item.id, sequence, item.num_tokens))
            if not item.last_token:
                continuing.append(sequence)
        self._add_proposals(scheduled)
        reused = self._take_started(started, batch) if started is not None else []
        reused_ids = {request_id for request_id, _, _ in reused}
        rest = [item for item in batch if item[0] not in reused_ids]
        lookahead = lookahead and self.tp.stage is None  # a step's tokens reach the first stage only from the last
        if lookahead and continuing and reused and not rest:
            self._lookahead = self._chain_lookahead(started, continuing)
        samples, prompt_logprobs = self._forward_and_sample(rest) if rest else ([], [])
        if reused:
            samples = self._collect_started(started, reused) + samples
            self.num_lookahead_rows_used += len(reused)
        if lookahead and continuing and self._lookahead is None:
            self._start_lookahead(continuing)
        return StepOutput(samples, prompt_logprobs, time.perf_counter_ns() - start)

    def _add_proposals(self, scheduled: list[ScheduledSequence]) -> None:
        """Appends the tokens each scheduled sequence verifies this step: the router's, or the draft
        model's (proposed now, for all such sequences at once)."""
        by_model = []
        for item in scheduled:
            sequence = self.sequences[item.id]
            count = len(item.draft_token_ids) + item.num_model_drafts
            if not count:
                continue
            if (item.draft_token_ids and item.num_model_drafts
                    or sequence.num_computed_tokens + item.num_tokens != len(sequence.token_ids) + count
                    or item.allowed_tokens or item.mask_follows):
                raise ValueError(f"request {item.id}: proposed tokens to verify on a step that does not sample "
                                 "right after them, or under a grammar, or from both the router and the draft model")
            if item.num_model_drafts and self.drafter is None:
                raise ValueError(f"request {item.id}: draft-model proposals asked of a shard without a draft model")
            sequence.num_drafts = count
            if item.draft_token_ids:
                sequence.token_ids.extend(item.draft_token_ids)
            else:
                by_model.append((sequence, count))
        if by_model:
            for (sequence, _), proposed in zip(by_model, self.drafter.propose(by_model)):
                sequence.token_ids.extend(proposed)

    @staticmethod
    def _take_started(started: _Lookahead, batch: list[tuple[int, Sequence, int]]) -> list[tuple[int, Sequence, int]]:
        """The batch's decode rows that the started step computed, unchanged since."""
        rows = {id(seq): position for seq, position in zip(started.sequences, started.positions)}
        return [
            (request_id, seq, n)
            for request_id, seq, n in batch
            if n == 1 and rows.get(id(seq)) == seq.num_computed_tokens == len(seq.token_ids) - 1
            and not (seq.allowed_tokens or seq.mask_follows)  # the started step sampled without the grammar mask
        ]

    def _collect_started(self, started: _Lookahead, reused: list[tuple[int, Sequence, int]]) -> list[Sample]:
        if started.done is not None:
            started.done.synchronize()
        token_ids, logprobs = started.host_token_ids.tolist(), started.host_logprobs.tolist()
        row_of = {id(seq): row for row, seq in enumerate(started.sequences)}
        samples = []
        for request_id, seq, _ in reused:
            row = row_of[id(seq)]
            seq.num_computed_tokens += 1
            seq.token_ids.append(token_ids[row])
            samples.append(Sample(request_id, [SampledToken(token_ids[row], logprobs[row], [])]))
        return samples

    def _start_lookahead(self, sequences: list[Sequence]) -> None:
        """Launches the decode step of `sequences`' last tokens (all of them, or none) without waiting."""
        if self._fits_graphs(sequences) and all(self._can_start(seq, seq.num_computed_tokens) for seq in sequences):
            self._lookahead = self._launch_decode(
                sequences, [seq.num_computed_tokens for seq in sequences], [seq.token_ids[-1] for seq in sequences]
            )

    def _chain_lookahead(self, started: _Lookahead, sequences: list[Sequence]) -> _Lookahead | None:
        """Launches the decode step after `started` for `sequences` (all rows of it, or none), its
        input tokens being the ones `started` samples, on the device."""
        row_of = {id(seq): row for row, seq in enumerate(started.sequences)}
        rows = [row_of.get(id(seq)) for seq in sequences]
        if None in rows or not self._fits_graphs(sequences):
            return None
        for seq in sequences:
            params = seq.sampling
            if params.watermark or params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0:
                return None  # their sampling reads the previous token on the host
            if not self._can_start(seq, seq.num_computed_tokens + 1):
                return None
        token_ids = started.output.token_ids
        if rows != list(range(len(started.sequences))):
            token_ids = token_ids[self._index_on_device(rows)]
        positions = [seq.num_computed_tokens + 1 for seq in sequences]
        self.num_chained_steps += 1
        return self._launch_decode(sequences, positions, [0] * len(sequences), device_input_ids=token_ids)

    def _can_start(self, seq: Sequence, position: int) -> bool:
        """Whether a started decode step can compute `seq`'s token at `position` (its last known
        token, or for a chained step the one after)."""
        return (
            seq.num_computed_tokens == len(seq.token_ids) - 1  # decoding, not prefilling
            and not seq.top_n_tokens  # top-n needs a host sync inside sampling
            and (not seq.adapter_slot or self.decode_graphs.lora)  # graphs captured with the adapter kernels
            and position < len(seq.block_table) * self.block_size  # a slot for the token
            and len(seq.block_table) <= self.decode_graphs.max_blocks_per_seq
        )

    def _fits_graphs(self, sequences: list[Sequence]) -> bool:
        return self.decode_graphs is not None and self.decode_graphs.padded_size(len(sequences)) is not None

    def _launch_decode(
        self, sequences: list[Sequence], positions: list[int], input_ids: list[int], device_input_ids=None
    ) -> _Lookahead:
        tables = [seq.block_table for seq in sequences]
        logits = self.decode_graphs.run(
            input_ids, positions, decode_slots(tables, positions, self.block_size), tables, device_input_ids=device_input_ids,
            adapter_slots=[seq.adapter_slot for seq in sequences],
        )
        # A chained row's history lacks the token being sampled before it (it has no penalties).
        batch = SamplingBatch.build(
            [seq.sampling for seq in sequences], [seq.token_ids for seq in sequences], self.device, [p + 1 for p in positions],
            self.watermark,
        )
        output = sample(logits, batch, [0] * len(sequences))
        host_token_ids, host_logprobs = self._copy_to_host(output)
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        return _Lookahead(list(sequences), positions, output, host_token_ids, host_logprobs, done)

    def _index_on_device(self, values: list[int]) -> torch.Tensor:
        """An int64 tensor of `values` on the device, copied (from pinned memory on CUDA) without
        waiting for the work queued before it."""
        host = torch.tensor(values, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        return host.to(self.device, non_blocking=True)

    def _copy_to_host(self, output: SamplerOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Starts copying the sampled ids and logprobs to (pinned) host memory; read them after a sync."""
        pin = self.device.type == "cuda"
        token_ids = torch.empty(output.token_ids.shape, dtype=torch.int64, pin_memory=pin)
        logprobs = torch.empty(output.logprobs.shape, dtype=torch.float32, pin_memory=pin)
        token_ids.copy_(output.token_ids, non_blocking=True)
        logprobs.copy_(output.logprobs, non_blocking=True)
        return token_ids, logprobs

    def _forward_and_sample(self, batch: list[tuple[int, Sequence, int]]) -> tuple[list[Sample], list[PromptLogprobs]]:
        if self._is_graph_decode(batch):
            return self._decode_with_graph(batch), []
        flat = self._flatten(batch)
        # Copied before the forward is queued, so the LM head's launch does not wait for it to finish.
        sample_rows = self._index_on_device(flat.sample_rows)
        lora_segments = tuple((seq.adapter_slot, start, stop) for (_, seq, _), start, stop
                              in zip(batch, flat.query_start_loc, flat.query_start_loc[1:]) if seq.adapter_slot)
        hidden = forward_flat(self.model, self.kv_caches, flat, self.mixed_graphs, self.device, lora_segments)
        stage = self.tp.stage
        is_sampling = stage is None or stage.is_last
        prompt_logprobs = self._prompt_logprobs(batch, hidden, flat.query_start_loc) if is_sampling else []
        to_sample = [(request_id, seq) for request_id, seq, n in batch if seq.num_computed_tokens + n == len(seq.token_ids)]
        for _, seq, n in batch:
            seq.num_computed_tokens += n
        if not to_sample:
            return [], prompt_logprobs
        if not is_sampling:  # an earlier pipeline stage: the last one's tokens come back, nothing to answer
            for (_, seq), token_id in zip(to_sample, stage.broadcast_tokens(None, len(to_sample), self.device)):
                seq.token_ids.append(token_id)
            return [], []
        logits = self.model.compute_logits(hidden[sample_rows])  # [num_samples, vocab]
        samples = self._sample(logits, to_sample)
        if stage is not None:  # one token per sample: no speculation with stages
            stage.broadcast_tokens([sample.tokens[0].token_id for sample in samples], len(samples), self.device)
        return samples, prompt_logprobs

    def _is_graph_decode(self, batch: list[tuple[int, Sequence, int]]) -> bool:
        """Every sequence computes its last known token (so samples, and needs no prompt logprobs),
        within the captured batch sizes and sequence length."""
        graphs = self.decode_graphs
        return (
            graphs is not None
            and graphs.padded_size(len(batch)) is not None
            and all(
                n == 1 and seq.num_computed_tokens + 1 == len(seq.token_ids) and (not seq.adapter_slot or graphs.lora)
                and seq.num_computed_tokens < len(seq.block_table) * self.block_size <= graphs.max_blocks_per_seq * self.block_size
                for _, seq, n in batch
            )
        )

    def _decode_with_graph(self, batch: list[tuple[int, Sequence, int]]) -> list[Sample]:
        positions = [seq.num_computed_tokens for _, seq, _ in batch]
        tables = [seq.block_table for _, seq, _ in batch]
        logits = self.decode_graphs.run(
            [seq.token_ids[-1] for _, seq, _ in batch], positions, decode_slots(tables, positions, self.block_size), tables,
            adapter_slots=[seq.adapter_slot for _, seq, _ in batch],
        )
        for _, seq, _ in batch:
            seq.num_computed_tokens += 1
        return self._sample(logits, [(request_id, seq) for request_id, seq, _ in batch])

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

    def _flatten(self, batch: list[tuple[int, Sequence, int]]) -> FlatBatch:
        flat = flatten([
            Span(seq.token_ids[seq.num_computed_tokens : seq.num_computed_tokens + n], seq.num_computed_tokens, seq.block_table)
            for _, seq, n in batch
        ], self.block_size)
        for (_, seq, n), end_row in zip(batch, flat.query_start_loc[1:]):
            if seq.num_computed_tokens + n == len(seq.token_ids):  # the last known token's row, and one per proposal
                flat.sample_rows.extend(range(end_row - 1 - seq.num_drafts, end_row))
        return flat

    def _sample(self, logits: torch.Tensor, to_sample: list[tuple[int, Sequence]]) -> list[Sample]:
        if any(seq.mask_follows for _, seq in to_sample):
            if self._masks is None:
                raise ValueError("a sequence's grammar mask follows, but the step has no source of masks")
            masks = self._masks()
            for request_id, seq in to_sample:
                if seq.mask_follows:
                    if request_id not in masks:
                        raise ValueError(f"no grammar mask came for request {request_id}")
                    seq.allowed_tokens, seq.mask_follows = masks[request_id], False
        # One row per sampled position: a sequence verifying proposals samples after its last known
        # token and after each proposal, with the history up to there (as one token at a time would).
        rows = [(request_id, seq, len(seq.token_ids) - seq.num_drafts + j)
                for request_id, seq in to_sample for j in range(seq.num_drafts + 1)]
        batch = SamplingBatch.build(
            [seq.sampling for _, seq, _ in rows],
            [seq.token_ids if length == len(seq.token_ids) else seq.token_ids[:length] for _, seq, length in rows], self.device,
            watermark=self.watermark, allowed_tokens=[seq.allowed_tokens for _, seq, _ in rows],
        )
        top_n = [seq.top_n_tokens for _, seq, _ in rows]
        out = sample(logits, batch, top_n)
        host_token_ids, host_logprobs = self._copy_to_host(out)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        token_ids, logprobs = host_token_ids.tolist(), host_logprobs.tolist()
        tops: list[list[tuple[int, float]]] = [[] for _ in rows]
        if any(top_n):
            top_ids, top_logprobs = out.top_ids.tolist(), out.top_logprobs.tolist()
            for row, n in enumerate(out.top_counts.tolist()):
                tops[row] = list(zip(top_ids[row][:n], top_logprobs[row][:n]))
        samples, row = [], 0
        for request_id, seq in to_sample:
            num_drafts, base = seq.num_drafts, len(seq.token_ids) - seq.num_drafts
            kept = 0  # proposals that agree with the sample before them: what one token at a time picks
            while kept < num_drafts and token_ids[row + kept] == seq.token_ids[base + kept]:
                kept += 1
            del seq.token_ids[base + kept:]
            seq.token_ids.append(token_ids[row + kept])
            seq.num_computed_tokens -= num_drafts - kept  # the rejected proposals' KV is stale
            seq.num_draft_computed = min(seq.num_draft_computed, base + kept)  # ... in the draft's cache too
            seq.num_drafts = 0
            samples.append(Sample(request_id, [
                SampledToken(token_ids[j], logprobs[j], tops[j]) for j in range(row, row + kept + 1)
            ]))
            row += num_drafts + 1
        return samples

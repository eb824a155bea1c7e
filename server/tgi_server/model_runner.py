"""Runs steps on one shard: keeps each request's tokens and block table, builds the flat batch for a
forward pass over the paged KV cache, and samples for the requests whose prompt is fully computed.

The router decides everything (which requests, how many tokens, which blocks); this module only
follows the plan. All ranks run the same plan and sample the same tokens. With lookahead, the next
decode step may already be running when a plan arrives (`tgi_server.lookahead`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from tgi_server.cuda_graphs import DecodeGraphs, MixedGraphs, token_buckets
from tgi_server.distributed import TPGroup
from tgi_server.drafter import Drafter
from tgi_server.attention_metadata import allocate_kv_caches, kv_cache_bytes_per_block
from tgi_server.flat_batch import FlatBatch, Span, decode_slots, flatten, forward_flat, index_on_device
from tgi_server.lookahead import Lookahead
from tgi_server.sampler import SamplingBatch, Watermark, copy_to_host, sample
from tgi_server.sequence import (BatchRow, NewSequence, PromptLogprobs, Sample, SampledToken, ScheduledSequence,
                                 Sequence, StepOutput)

__all__ = ["ModelRunner", "NewSequence", "ScheduledSequence", "Sample", "SampledToken", "StepOutput"]


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
        # Decode batch sizes to replay as CUDA graphs once the KV cache exists (none on CPU, nor for a
        # model whose forward a graph cannot replay).
        capturable = device.type == "cuda" and getattr(model, "supports_cuda_graphs", True)
        self.cuda_graph_sizes = cuda_graph_sizes if capturable else ()
        self.decode_graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        self.lookahead = Lookahead(block_size, device, watermark)
        self._masks: Callable[[], dict[int, bytes]] | None = None  # this step's source of following masks

    @property
    def num_lookahead_rows_used(self) -> int:
        return self.lookahead.num_rows_used

    @property
    def num_chained_steps(self) -> int:
        return self.lookahead.num_chained_steps

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.lookahead.started = None
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
        has_lora = any(getattr(layer, "lora", None) is not None for layer in self.model.modules())
        self.mixed_graphs = MixedGraphs(self.model, self.kv_caches, token_buckets(max_batch_tokens), max_batch_size,
                                        max_blocks_per_seq, self.device, lora=has_lora)
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
        self.lookahead.started = None

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
        started, self.lookahead.started = self.lookahead.started, None
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
            batch.append(BatchRow(item.id, sequence, item.num_tokens))
            if not item.last_token:
                continuing.append(sequence)
        if any(row.sequence.adapter_slot for row in batch):
            # Each adapter's rows side by side: the LoRA kernels' tiles of 16 rows then read an
            # adapter's weights once per tile its rows fill, not once per tile they are scattered over.
            batch.sort(key=lambda row: row.sequence.adapter_slot)
            continuing.sort(key=lambda seq: seq.adapter_slot)
        self._add_proposals(scheduled)
        reused = self.lookahead.take(started, batch) if started is not None else []
        reused_ids = {row.request_id for row in reused}
        rest = [row for row in batch if row.request_id not in reused_ids]
        lookahead = lookahead and self.tp.stage is None  # a step's tokens reach the first stage only from the last
        if lookahead and continuing and reused and not rest:
            self.lookahead.chain(self.decode_graphs, started, continuing)
        samples, prompt_logprobs = self._forward_and_sample(rest) if rest else ([], [])
        if reused:
            samples = self.lookahead.collect(started, reused) + samples
        if lookahead and continuing and self.lookahead.started is None:
            self.lookahead.start(self.decode_graphs, continuing)
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

    def _forward_and_sample(self, batch: list[BatchRow]) -> tuple[list[Sample], list[PromptLogprobs]]:
        if self._is_graph_decode(batch):
            return self._decode_with_graph(batch), []
        flat = self._flatten(batch)
        # Copied before the forward is queued, so the LM head's launch does not wait for it to finish.
        sample_rows = index_on_device(flat.sample_rows, self.device)
        lora_segments = _adapter_runs(batch, flat.query_start_loc)
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

    def _is_graph_decode(self, batch: list[BatchRow]) -> bool:
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

    def _decode_with_graph(self, batch: list[BatchRow]) -> list[Sample]:
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

    def _flatten(self, batch: list[BatchRow]) -> FlatBatch:
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
        host_token_ids, host_logprobs = copy_to_host(out)
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


def _adapter_runs(batch: list[BatchRow], query_start_loc: list[int]) -> tuple[tuple[int, int, int], ...]:
    """(adapter slot, first row, end row) of each run of consecutive flat rows through one adapter."""
    runs: list[tuple[int, int, int]] = []
    for row, start, stop in zip(batch, query_start_loc, query_start_loc[1:]):
        slot = row.sequence.adapter_slot
        if slot and runs and runs[-1][0] == slot and runs[-1][2] == start:
            runs[-1] = (slot, runs[-1][1], stop)
        elif slot:
            runs.append((slot, start, stop))
    return tuple(runs)

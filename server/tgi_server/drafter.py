"""Speculative decoding with a draft model: a smaller model of the same tokenizer proposes each
decoding sequence's next tokens on the shard, and the runner verifies them in the target's forward.

The draft model has its own paged KV cache laid out like the target's: the same block ids index other
tensors, so the router's block allocation covers both (a block costs the bytes of both caches). The
draft's cache catches up lazily: before proposing, the draft computes the tokens of a sequence it has
not seen (its whole prompt the first time; afterwards the one or two tokens the last verify step
settled), then proposes one token per forward. Blocks shared through the prefix cache are written by
every sequence's draft with the same tokens at the same positions, hence the same values.

A proposal is what the sequence's own sampler picks from the draft's logits, with the same
per-position noise (`tgi_server.sampler`): the draft's argmax for greedy rows, a sample coupled to the
target's for seeded ones, so the closer the two models, the more proposals the target keeps. The
verification is the runner's (the target samples every position as it would one token at a time), so
the output is the target's alone, whatever the draft proposes.

The draft shares the target's tensor-parallel group: its logits, hence its proposals, are the same on
every rank.
"""

from __future__ import annotations

import torch

from tgi_server.attention_metadata import allocate_kv_caches, kv_cache_bytes_per_block
from tgi_server.cuda_graphs import DecodeGraphs, MixedGraphs, token_buckets
from tgi_server.flat_batch import Span, decode_slots, flatten, forward_flat
from tgi_server.sampler import SamplingBatch, Watermark, sample

# Tokens in one catch-up forward at most, until `Drafter.max_tokens` is set (warmup sets the step's budget).
DEFAULT_MAX_TOKENS = 8192
# Catch-up forwards up to this many tokens replay a captured graph (the usual one or two per sequence).
MAX_GRAPH_TOKENS = 256


class Drafter:
    def __init__(self, model, config, device: torch.device, block_size: int, kv_cache_dtype: torch.dtype,
                 watermark: Watermark = Watermark()):
        self.model = model
        self.config = config
        self.device = device
        self.block_size = block_size
        self.kv_cache_dtype = kv_cache_dtype
        self.watermark = watermark
        self.kv_caches: list[torch.Tensor] = []
        self.max_tokens = DEFAULT_MAX_TOKENS
        self.decode_graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        self.num_forwards = 0  # draft forwards run (a statistic)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.decode_graphs = self.mixed_graphs = None  # graphs address the old cache
        self.kv_caches = []  # free the old cache before allocating the new one
        self.kv_caches = allocate_kv_caches(self.model.kv_cache_specs, num_blocks, self.block_size, self.kv_cache_dtype,
                                            self.device)

    def kv_cache_bytes_per_block(self) -> int:
        return kv_cache_bytes_per_block(self.model.kv_cache_specs, self.block_size, self.kv_cache_dtype)

    def capture_cuda_graphs(self, batch_sizes: list[int], max_seqs: int, max_blocks_per_seq: int, pool) -> None:
        """Captures the proposal forwards (one token per sequence) at `batch_sizes`, and catch-up
        forwards of up to MAX_GRAPH_TOKENS tokens in `max_seqs` sequences."""
        if not self.model.supports_cuda_graphs or not batch_sizes:
            return
        self.mixed_graphs = MixedGraphs(self.model, self.kv_caches, token_buckets(MAX_GRAPH_TOKENS), max_seqs,
                                        max_blocks_per_seq, self.device)
        self.decode_graphs = DecodeGraphs(self.model, self.kv_caches, batch_sizes, max_blocks_per_seq, self.device,
                                          pool=pool)

    def catch_up(self, sequences: list) -> torch.Tensor:
        """Computes the draft KV of every known token of `sequences` (runner `Sequence`s, each with at
        least one token the draft has not computed); returns the logits [len(sequences), vocab] after
        each one's last token. Forwards hold at most `max_tokens` tokens (more sequences than that:
        one token each)."""
        limit = max(self.max_tokens, len(sequences))
        while sum(len(seq.token_ids) - seq.num_draft_computed for seq in sequences) > limit:
            spans, room = [], limit  # the longest backlogs first in line, short of their last token
            for seq in sequences:
                count = min(len(seq.token_ids) - 1 - seq.num_draft_computed, room)
                if count > 0:
                    start = seq.num_draft_computed
                    spans.append((seq, Span(seq.token_ids[start : start + count], start, seq.block_table)))
                    room -= count
            self._forward(spans)
        hidden = self._forward([
            (seq, Span(seq.token_ids[seq.num_draft_computed :], seq.num_draft_computed, seq.block_table))
            for seq in sequences
        ])
        return self.model.compute_logits(hidden)

    def propose(self, rows: list[tuple[object, int]]) -> list[list[int]]:
        """The next `count` tokens the draft proposes after each sequence's known ones, for each
        (sequence, count) of `rows` (count >= 1); each sequence's block table must hold them."""
        sequences = [seq for seq, _ in rows]
        proposals: list[list[int]] = [[] for _ in rows]
        logits = self.catch_up(sequences)
        active = list(range(len(rows)))
        while True:
            token_ids = self._sample(logits, [sequences[i] for i in active], [proposals[i] for i in active])
            for i, token_id in zip(active, token_ids):
                proposals[i].append(token_id)
            active = [i for i in active if len(proposals[i]) < rows[i][1]]
            if not active:
                return proposals
            # The last proposal's KV: the next forward computes it, and its logits give the one after.
            logits = self._decode([sequences[i] for i in active], [proposals[i] for i in active])

    def _forward(self, spans: list[tuple[object, Span]]) -> torch.Tensor:
        """Hidden states [len(spans), hidden] at each span's last token; advances num_draft_computed."""
        flat = flatten([span for _, span in spans], self.block_size)
        hidden = forward_flat(self.model, self.kv_caches, flat, self.mixed_graphs, self.device)
        self.num_forwards += 1
        for seq, span in spans:
            seq.num_draft_computed = span.start + len(span.token_ids)
        return hidden[torch.tensor(flat.query_start_loc[1:], device=self.device) - 1]

    def _decode(self, sequences: list, proposals: list[list[int]]) -> torch.Tensor:
        """Logits [len(sequences), vocab] after each sequence's last proposal, computing its KV."""
        positions = [len(seq.token_ids) + len(drafted) - 1 for seq, drafted in zip(sequences, proposals)]
        graphs = self.decode_graphs
        if (graphs is not None and graphs.padded_size(len(sequences)) is not None
                and all(len(seq.block_table) <= graphs.max_blocks_per_seq for seq in sequences)):
            tables = [seq.block_table for seq in sequences]
            logits = graphs.run([drafted[-1] for drafted in proposals], positions,
                                decode_slots(tables, positions, self.block_size), tables)
            self.num_forwards += 1
            for seq, position in zip(sequences, positions):
                seq.num_draft_computed = position + 1
            return logits
        hidden = self._forward([
            (seq, Span([drafted[-1]], position, seq.block_table))
            for seq, drafted, position in zip(sequences, proposals, positions)
        ])
        return self.model.compute_logits(hidden)

    def _sample(self, logits: torch.Tensor, sequences: list, proposals: list[list[int]]) -> list[int]:
        """Each sequence's next token as its sampler picks it from the draft's logits, at the position
        after its proposals so far (the target's noise there)."""
        batch = SamplingBatch.build(
            [seq.sampling for seq in sequences],
            [seq.token_ids + drafted for seq, drafted in zip(sequences, proposals)],
            self.device, watermark=self.watermark,
        )
        return sample(logits, batch, [0] * len(sequences)).token_ids.tolist()

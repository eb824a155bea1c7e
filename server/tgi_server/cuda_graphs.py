"""CUDA graphs of the forward pass, so a step costs one launch instead of hundreds.

`DecodeGraphs`: a decode step (every sequence adds one token) has a shape fixed by its batch size
alone, so it is captured once per size in `batch_sizes`, forward plus LM head; a step of n sequences
replays the smallest captured size >= n with the extra rows padded. Padding rows write their K/V to
slot 0 (block 0 is reserved as padding and never holds a sequence's tokens) and attend to that slot.
With LoRA adapters (`lora=True`) each size is captured twice: as above, and with every linear's
adapter kernels reading each row's adapter slot from a device buffer (0: none), which a step whose
rows name an adapter replays; a step without adapters keeps the plain graph and pays nothing.

`MixedGraphs`: any other step (prefill chunks with or without decodes) is captured per token count
bucket, for up to `max_seqs` sequences; the attention kernel reads the batch layout from the device
and launches enough programs for any split of the bucket's tokens. Padding tokens belong to no
sequence (their rows are never read) and write their K/V to slot 0; padding sequences have no
tokens. The graph returns hidden states; the runner picks the rows to score. With LoRA adapters
(`lora=True`) each bucket is captured twice too, the copy reading each token's adapter slot from a
device buffer (the grouped kernels' tiles per block and slot), for steps with adapted rows. A large step whose
bucket would pad it by more than an eighth runs eagerly instead: from a few hundred tokens on, the
GPU's work outlasts launching it op by op, so the graph would only add padded compute.
"""

from __future__ import annotations

import torch

from tgi_server.attention_metadata import AttentionMetadata
from tgi_server.forward_context import LoraRows, forward_context

# Mixed-step buckets up to this many tokens are powers of two, and always replayed (see `fits`).
_SMALL_BUCKET = 512
# Rows of the packed input buffer: input id, position, KV slot, sequence length, LoRA adapter slot.
_IDS, _POSITIONS, _SLOTS, _SEQ_LENS, _ADAPTERS = range(5)


class DecodeGraphs:
    def __init__(
        self,
        model,
        kv_caches: list[torch.Tensor],
        batch_sizes: list[int],
        max_blocks_per_seq: int,
        device: torch.device,
        pool=None,
        lora: bool = False,
    ):
        self.batch_sizes = sorted(set(batch_sizes))
        max_size = self.batch_sizes[-1]
        # One host buffer (pinned) and one device buffer, so a step's inputs cross in one copy.
        self._host = torch.zeros(5, max_size, dtype=torch.int64, pin_memory=True)  # [5, max_size]
        self._host_rows = self._host.numpy()
        self._inputs = torch.zeros(5, max_size, dtype=torch.int64, device=device)  # [5, max_size]
        self._host_tables = torch.zeros(max_size, max_blocks_per_seq, dtype=torch.int32, pin_memory=True)
        self._block_tables = torch.zeros(max_size, max_blocks_per_seq, dtype=torch.int32, device=device)
        self._query_start_loc = torch.arange(max_size + 1, dtype=torch.int32, device=device)  # 1 token each
        self.max_blocks_per_seq = max_blocks_per_seq
        # (size, with adapters) -> its graph, and the logits [size, vocab_size] float32 each replay writes
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self._logits: dict[tuple[int, bool], torch.Tensor] = {}
        self._inputs_read = torch.cuda.Event()  # the pinned buffer may be rewritten after this
        self.pool = pool
        self.lora = lora
        self._capture(model, kv_caches)

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self._inputs[_SLOTS, :size],
            query_start_loc=self._query_start_loc[: size + 1],
            seq_lens=self._inputs[_SEQ_LENS, :size],
            block_tables=self._block_tables[:size],
            query_start_loc_cpu=[],  # the kernels read the device tensors only
            seq_lens_cpu=[],
            max_query_len=1,
        )

    @torch.inference_mode()
    def _capture(self, model, kv_caches: list[torch.Tensor]) -> None:
        self._inputs[_SEQ_LENS].fill_(1)  # padding rows: slot 0, one key
        for size in reversed(self.batch_sizes):  # largest first: the smaller ones reuse its memory
            for with_lora in (False, True) if self.lora else (False,):

                def forward(size=size, with_lora=with_lora):
                    # Fresh metadata each call: what kernels derive from it must be computed in the graph.
                    lora = LoraRows(None, self._inputs[_ADAPTERS, :size]) if with_lora else None
                    with forward_context(self._metadata(size), kv_caches, lora):
                        hidden = model(self._inputs[_IDS, :size], self._inputs[_POSITIONS, :size])
                    return model.compute_logits(hidden)

                key = size, with_lora
                self._graphs[key], self._logits[key], self.pool = capture(forward, self.pool)

    def graph(self, size: int, with_lora: bool = False) -> torch.cuda.CUDAGraph:
        """The graph captured for batch size `size` (benchmarks replay it to time the GPU alone)."""
        return self._graphs[size, with_lora]

    def padded_size(self, num_seqs: int) -> int | None:
        """The captured batch size a step of `num_seqs` decodes runs at, or None if it is too big."""
        for size in self.batch_sizes:
            if size >= num_seqs:
                return size
        return None

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        block_tables: list[list[int]],
        device_input_ids: torch.Tensor | None = None,
        adapter_slots: list[int] | None = None,
    ) -> torch.Tensor:
        """Logits [num_seqs, vocab_size] of one decode step; sequence i's new token sits at
        positions[i] and goes to KV slot slots[i], its context is positions[i] + 1 tokens, and it goes
        through the LoRA adapter in slot adapter_slots[i] (0 or None: the base model; only with
        `lora`). With `device_input_ids` ([num_seqs] int64 on the device) the input ids come from
        there, in stream order (e.g. from the step before, still running), and `input_ids` is
        ignored. Copies inputs without a host sync."""
        num_seqs = len(input_ids)
        size = self.padded_size(num_seqs)
        self._inputs_read.synchronize()  # the previous step's inputs have left the pinned buffers
        host = self._host_rows
        host[_IDS, :num_seqs] = input_ids
        host[_POSITIONS, :num_seqs] = positions
        host[_SLOTS, :num_seqs] = slots
        host[_SEQ_LENS, :num_seqs] = positions
        host[_SEQ_LENS, :num_seqs] += 1
        host[:, num_seqs:size] = 0
        host[_SEQ_LENS, num_seqs:size] = 1
        with_lora = any(adapter_slots or ())
        if with_lora:
            assert self.lora, "adapter rows in decode graphs captured without LoRA"
            host[_ADAPTERS, :num_seqs] = adapter_slots
        tables = self._host_tables.numpy()
        tables[:size] = 0  # padding rows read block 0
        for row, table in enumerate(block_tables):
            tables[row, : len(table)] = table
        self._inputs[:, :size].copy_(self._host[:, :size], non_blocking=True)
        self._block_tables[:size].copy_(self._host_tables[:size], non_blocking=True)
        self._inputs_read.record()
        if device_input_ids is not None:
            self._inputs[_IDS, :num_seqs].copy_(device_input_ids)
        self._graphs[size, with_lora].replay()
        return self._logits[size, with_lora][:num_seqs]


def capture(forward, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, object]:
    """Captures `forward()` (after one plain run that compiles its kernels); returns the graph, its
    output tensor and the memory pool the next capture should share."""
    forward()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = forward()
    torch.cuda.synchronize()
    return graph, output, graph.pool()


class MixedGraphs:
    def __init__(
        self,
        model,
        kv_caches: list[torch.Tensor],
        token_buckets: list[int],
        max_seqs: int,
        max_blocks_per_seq: int,
        device: torch.device,
        lora: bool = False,
    ):
        self.token_buckets = sorted(set(token_buckets))
        self.lora = lora
        self.max_seqs = max_seqs
        self.max_blocks_per_seq = max_blocks_per_seq
        max_tokens = self.token_buckets[-1]
        # Rows: input id, position, KV slot, LoRA adapter slot (per token, the _IDS ... rows, less
        # _SEQ_LENS); query_start_loc and seq_lens (per sequence).
        self._host_tokens = torch.zeros(5, max_tokens, dtype=torch.int64, pin_memory=True)
        self._host_seqs = torch.zeros(2, max_seqs + 1, dtype=torch.int32, pin_memory=True)
        self._tokens = torch.zeros(5, max_tokens, dtype=torch.int64, device=device)
        self._seqs = torch.zeros(2, max_seqs + 1, dtype=torch.int32, device=device)
        self._block_tables = torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.int32, device=device)
        # (bucket, with adapters) -> its graph, and the hidden states [bucket, hidden_size] each replay writes
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self._hidden: dict[tuple[int, bool], torch.Tensor] = {}
        self._inputs_read = torch.cuda.Event()  # the pinned buffers may be rewritten after this
        self.pool = None
        with torch.inference_mode():
            for key in [(bucket, with_lora) for bucket in reversed(self.token_buckets)
                        for with_lora in ((False, True) if lora else (False,))]:

                def forward(bucket=key[0], with_lora=key[1]):
                    # Fresh metadata each call: what kernels derive from it must be computed in the graph.
                    attn = AttentionMetadata(
                        slot_mapping=self._tokens[_SLOTS, :bucket],
                        query_start_loc=self._seqs[0],
                        seq_lens=self._seqs[1, :max_seqs],
                        block_tables=self._block_tables,
                        query_start_loc_cpu=[],
                        seq_lens_cpu=[],
                        max_query_len=bucket,
                    )
                    lora_rows = LoraRows(None, self._tokens[_ADAPTERS, :bucket]) if with_lora else None
                    with forward_context(attn, kv_caches, lora_rows):
                        return model(self._tokens[_IDS, :bucket], self._tokens[_POSITIONS, :bucket])

                self._graphs[key], self._hidden[key], self.pool = capture(forward, self.pool)

    def fits(self, num_tokens: int, num_seqs: int, max_blocks: int) -> bool:
        """Whether a step of this shape runs as a graph (see the module's docstring)."""
        if num_tokens > self.token_buckets[-1] or num_seqs > self.max_seqs or max_blocks > self.max_blocks_per_seq:
            return False
        bucket = next(b for b in self.token_buckets if b >= num_tokens)
        return bucket <= _SMALL_BUCKET or bucket - num_tokens <= num_tokens // 8

    def run(self, flat, lora_segments: tuple[tuple[int, int, int], ...] = ()) -> torch.Tensor:
        """Hidden states [num_tokens, hidden_size] of a step laid out as `flat` (a FlatBatch), the rows
        of `lora_segments` (adapter slot, first row, end row) through their adapter (only with `lora`)."""
        num_tokens, num_seqs = len(flat.input_ids), len(flat.seq_lens)
        bucket = next(b for b in self.token_buckets if b >= num_tokens)
        self._inputs_read.synchronize()
        tokens = self._host_tokens.numpy()
        tokens[_IDS, :num_tokens] = flat.input_ids
        tokens[_POSITIONS, :num_tokens] = flat.positions
        tokens[_SLOTS, :num_tokens] = flat.slots
        tokens[:, num_tokens:bucket] = 0
        with_lora = bool(lora_segments)
        if with_lora:
            assert self.lora, "adapter rows in mixed-step graphs captured without LoRA"
            tokens[_ADAPTERS, :num_tokens] = 0
            for slot, start, stop in lora_segments:
                tokens[_ADAPTERS, start:stop] = slot
        seqs = self._host_seqs.numpy()
        seqs[0, : num_seqs + 1] = flat.query_start_loc
        seqs[0, num_seqs + 1 :] = num_tokens  # padding sequences: no tokens
        seqs[1, :num_seqs] = flat.seq_lens
        seqs[1, num_seqs:] = 0
        self._tokens[:, :bucket].copy_(self._host_tokens[:, :bucket], non_blocking=True)
        self._seqs.copy_(self._host_seqs, non_blocking=True)
        self._block_tables[:num_seqs, : flat.block_tables.shape[1]].copy_(torch.from_numpy(flat.block_tables))
        self._inputs_read.record()
        self._graphs[bucket, with_lora].replay()
        return self._hidden[bucket, with_lora][:num_tokens]


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts to capture mixed steps at: powers of two from 64 to 512, then evenly spaced (at
    least 512 apart, at most 16 more buckets) up to `max_tokens`, which is one."""
    buckets, size = [], 64
    while size < min(max_tokens, _SMALL_BUCKET):
        buckets.append(size)
        size *= 2
    step = max(_SMALL_BUCKET, -(-max_tokens // 16))
    size = _SMALL_BUCKET
    while size < max_tokens:
        buckets.append(size)
        size += step
    return [*buckets, max_tokens]

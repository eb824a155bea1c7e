"""Decode steps started before their plan arrives, so the GPU runs the next step while the router
handles this one's result.

When the router says nothing waits and the step's batch will decode next (on CUDA, with graphs),
the runner starts that next decode step before returning (`start`). The next plan's decode rows that
match what was started (same sequence, unchanged since) take its samples (`take`, `collect`);
everything else is computed as usual. When a plan is entirely served by the started step, the runner
chains (`chain`): it queues the step after it at once, fed with the started step's sampled tokens on
the device, and only then waits for the started step's samples, so the GPU never idles between
decode steps. A started row recomputes exactly what the plan would have asked (sampling is a pure
function of the sequence and its seed), so reusing it changes nothing but the time. Rows with
penalties, a watermark or top-n alternatives need the host's copy of the tokens, so they are never
chained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tgi_server.cuda_graphs import DecodeGraphs
from tgi_server.flat_batch import decode_slots, index_on_device
from tgi_server.sampler import SamplerOutput, SamplingBatch, Watermark, copy_to_host, sample
from tgi_server.sequence import BatchRow, Sample, SampledToken, Sequence


@dataclass
class StartedStep:
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

    def rows(self) -> dict[int, int]:
        """Each started sequence's row, by the sequence's id()."""
        return {id(seq): row for row, seq in enumerate(self.sequences)}


class Lookahead:
    """The step started last (`started`, None if none) and how to start, chain and reuse steps."""

    def __init__(self, block_size: int, device: torch.device, watermark: Watermark):
        self.block_size = block_size
        self.device = device
        self.watermark = watermark
        self.started: StartedStep | None = None
        self.num_rows_used = 0  # samples served from a started step (a statistic)
        self.num_chained_steps = 0  # decode steps queued behind a started one (a statistic)

    @staticmethod
    def take(started: StartedStep, batch: list[BatchRow]) -> list[BatchRow]:
        """The batch's decode rows that the started step computed, unchanged since."""
        positions = {id(seq): position for seq, position in zip(started.sequences, started.positions)}
        return [
            row for row in batch
            if row.num_tokens == 1
            and positions.get(id(row.sequence)) == row.sequence.num_computed_tokens == len(row.sequence.token_ids) - 1
            and not (row.sequence.allowed_tokens or row.sequence.mask_follows)  # sampled without the grammar mask
        ]

    def collect(self, started: StartedStep, reused: list[BatchRow]) -> list[Sample]:
        """The started step's samples for the `reused` rows, appended to their sequences."""
        if started.done is not None:
            started.done.synchronize()
        token_ids, logprobs = started.host_token_ids.tolist(), started.host_logprobs.tolist()
        row_of = started.rows()
        samples = []
        for request_id, seq, _ in reused:
            row = row_of[id(seq)]
            seq.num_computed_tokens += 1
            seq.token_ids.append(token_ids[row])
            samples.append(Sample(request_id, [SampledToken(token_ids[row], logprobs[row], [])]))
        self.num_rows_used += len(reused)
        return samples

    def start(self, graphs: DecodeGraphs | None, sequences: list[Sequence]) -> None:
        """Launches the decode step of `sequences`' last tokens (all of them, or none) without waiting."""
        if self._fits(graphs, sequences) and all(self._can_start(graphs, seq, seq.num_computed_tokens) for seq in sequences):
            self.started = self._launch(
                graphs, sequences, [seq.num_computed_tokens for seq in sequences], [seq.token_ids[-1] for seq in sequences]
            )

    def chain(self, graphs: DecodeGraphs | None, started: StartedStep, sequences: list[Sequence]) -> None:
        """Launches the decode step after `started` for `sequences` (all rows of it, or none), its
        input tokens being the ones `started` samples, on the device."""
        row_of = started.rows()
        rows = [row_of.get(id(seq)) for seq in sequences]
        if None in rows or not self._fits(graphs, sequences):
            return
        for seq in sequences:
            params = seq.sampling
            if params.watermark or params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0:
                return  # their sampling reads the previous token on the host
            if not self._can_start(graphs, seq, seq.num_computed_tokens + 1):
                return
        token_ids = started.output.token_ids
        if rows != list(range(len(started.sequences))):
            token_ids = token_ids[index_on_device(rows, self.device)]
        positions = [seq.num_computed_tokens + 1 for seq in sequences]
        self.num_chained_steps += 1
        self.started = self._launch(graphs, sequences, positions, [0] * len(sequences), device_input_ids=token_ids)

    def _can_start(self, graphs: DecodeGraphs, seq: Sequence, position: int) -> bool:
        """Whether a started decode step can compute `seq`'s token at `position` (its last known
        token, or for a chained step the one after)."""
        return (
            seq.num_computed_tokens == len(seq.token_ids) - 1  # decoding, not prefilling
            and not seq.top_n_tokens  # top-n needs a host sync inside sampling
            and (not seq.adapter_slot or graphs.lora)  # graphs captured with the adapter kernels
            and position < len(seq.block_table) * self.block_size  # a slot for the token
            and len(seq.block_table) <= graphs.max_blocks_per_seq
        )

    @staticmethod
    def _fits(graphs: DecodeGraphs | None, sequences: list[Sequence]) -> bool:
        return graphs is not None and graphs.padded_size(len(sequences)) is not None

    def _launch(self, graphs: DecodeGraphs, sequences: list[Sequence], positions: list[int], input_ids: list[int],
                device_input_ids=None) -> StartedStep:
        tables = [seq.block_table for seq in sequences]
        logits = graphs.run(
            input_ids, positions, decode_slots(tables, positions, self.block_size), tables, device_input_ids=device_input_ids,
            adapter_slots=[seq.adapter_slot for seq in sequences],
        )
        # A chained row's history lacks the token being sampled before it (it has no penalties).
        batch = SamplingBatch.build(
            [seq.sampling for seq in sequences], [seq.token_ids for seq in sequences], self.device, [p + 1 for p in positions],
            self.watermark,
        )
        output = sample(logits, batch, [0] * len(sequences))
        host_token_ids, host_logprobs = copy_to_host(output)
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        return StartedStep(list(sequences), positions, output, host_token_ids, host_logprobs, done)

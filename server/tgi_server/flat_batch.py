"""One forward over the paged KV cache: the new tokens of several sequences laid out flat, and the
forward itself (a captured mixed-step graph where one fits, else eager). The runner's steps and the
draft model's (`tgi_server.drafter`) both go through here."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tgi_server.attention_metadata import AttentionMetadata
from tgi_server.cuda_graphs import MixedGraphs
from tgi_server.forward_context import LoraRows, forward_context


@dataclass(frozen=True)
class Span:
    """New tokens of one sequence: `token_ids` at positions start, start + 1, ..., whose KV goes to
    the slots `block_table` gives them; the context before `start` is in the cache already."""

    token_ids: list[int]
    start: int
    block_table: list[int]


@dataclass
class FlatBatch:
    """A step's new tokens flattened in batch order, on the host."""

    input_ids: np.ndarray  # [num_tokens] int64
    positions: np.ndarray  # [num_tokens] int64
    slots: np.ndarray  # [num_tokens] int64: block_id * block_size + offset
    query_start_loc: list[int]  # [B + 1]: sequence i's tokens are rows [q[i], q[i + 1])
    seq_lens: list[int]  # [B]: context length after this step
    block_tables: np.ndarray  # [B, max_blocks] int32, padded with 0
    sample_rows: list[int] = field(default_factory=list)  # rows whose logits are scored (the runner's)


def decode_slots(block_tables: list[list[int]], positions: list[int], block_size: int) -> list[int]:
    """The KV slot of each sequence's token at positions[i] (one token per sequence, a decode step)."""
    return [table[p // block_size] * block_size + p % block_size for table, p in zip(block_tables, positions)]


def flatten(spans: list[Span], block_size: int) -> FlatBatch:
    input_ids, positions, slots, query_start_loc, seq_lens = [], [], [], [0], []
    tables = np.zeros((len(spans), max(len(span.block_table) for span in spans)), dtype=np.int32)
    for row, span in enumerate(spans):
        end = span.start + len(span.token_ids)
        if end > len(span.block_table) * block_size:
            raise ValueError(f"block table of {len(span.block_table)} blocks cannot hold {end} tokens")
        tables[row, : len(span.block_table)] = span.block_table
        positions_here = np.arange(span.start, end)
        input_ids.append(np.asarray(span.token_ids, dtype=np.int64))
        positions.append(positions_here)
        slots.append(tables[row, positions_here // block_size].astype(np.int64) * block_size + positions_here % block_size)
        query_start_loc.append(query_start_loc[-1] + len(span.token_ids))
        seq_lens.append(end)
    return FlatBatch(
        input_ids=np.concatenate(input_ids),
        positions=np.concatenate(positions),
        slots=np.concatenate(slots),
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        block_tables=tables,
    )


def forward_flat(model, kv_caches: list[torch.Tensor], flat: FlatBatch, graphs: MixedGraphs | None,
                 device: torch.device, lora_segments: tuple[tuple[int, int, int], ...] = ()) -> torch.Tensor:
    """Hidden states [num_tokens, hidden] of `model` over `flat`, writing the new tokens' KV; rows in
    `lora_segments` (adapter slot, first row, end row) through their adapter."""
    if (graphs is not None and (graphs.lora or not lora_segments)
            and graphs.fits(len(flat.input_ids), len(flat.seq_lens), flat.block_tables.shape[1])):
        return graphs.run(flat, lora_segments)
    attn = AttentionMetadata.from_host(flat.slots, flat.query_start_loc, flat.seq_lens, flat.block_tables, device)
    input_ids = torch.from_numpy(flat.input_ids).to(device)  # [num_tokens]
    positions = torch.from_numpy(flat.positions).to(device)  # [num_tokens]
    lora = LoraRows.from_segments(lora_segments, len(flat.input_ids), device) if lora_segments else None
    with forward_context(attn, kv_caches, lora):
        return model(input_ids, positions)


def index_on_device(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 tensor of `values` on `device`, copied (from pinned memory on CUDA) without waiting
    for the work queued before it."""
    host = torch.tensor(values, dtype=torch.int64, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)

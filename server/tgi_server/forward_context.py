"""The per-step state a model's layers read without it passing through every forward signature.

The runner (and CUDA-graph capture) enters `forward_context(attn, kv_caches)` around
`model(input_ids, positions)`; an attention layer reads the step's `AttentionMetadata` and its own
cache (by layer index) from `current()`. The state is a context variable, so steps run from
different threads (the gRPC worker pool) never see each other's.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tgi_server.attention_metadata import AttentionMetadata


@dataclass(frozen=True)
class LoraRows:
    """Which rows of the flat batch go through which LoRA adapter slot (`tgi_server.lora`), two ways:
    runs of rows for the portable product, and a slot per row (0: none) for the kernels."""

    # (adapter slot, first row, end row) of each run of rows an adapter applies to; None: known on
    # the device only (a CUDA graph replayed with the slots of its step)
    segments: tuple[tuple[int, int, int], ...] | None
    # [num_tokens] int32 (or int64) on the model's device
    token_slots: torch.Tensor

    @classmethod
    def from_segments(cls, segments: tuple[tuple[int, int, int], ...], num_tokens: int, device: torch.device) -> LoraRows:
        token_slots = torch.zeros(num_tokens, dtype=torch.int32)
        for slot, start, stop in segments:
            token_slots[start:stop] = slot
        return cls(segments, token_slots.to(device, non_blocking=True))


@dataclass(frozen=True)
class ForwardContext:
    attn: AttentionMetadata
    # one per attention layer, shaped by the model's `kv_cache_specs`
    kv_caches: list[torch.Tensor]
    # the rows that LoRA adapters apply to; None: none
    lora: LoraRows | None = None


_current: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar("forward_context", default=None)


@contextlib.contextmanager
def forward_context(attn: AttentionMetadata, kv_caches: list[torch.Tensor],
                    lora: LoraRows | None = None) -> Iterator[ForwardContext]:
    """The step's metadata, caches and adapter rows, for the forward passes run inside the block."""
    token = _current.set(ForwardContext(attn, kv_caches, lora))
    try:
        yield _current.get()
    finally:
        _current.reset(token)


def current() -> ForwardContext:
    """The context of the forward pass in progress; a model called outside one is a bug."""
    context = _current.get()
    if context is None:
        raise RuntimeError("a model forward ran outside forward_context(attn, kv_caches)")
    return context

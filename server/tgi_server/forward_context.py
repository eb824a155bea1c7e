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
class ForwardContext:
    attn: AttentionMetadata
    # one per attention layer, shaped by the model's `kv_cache_specs`
    kv_caches: list[torch.Tensor]
    # LoRA: (adapter slot, first row, end row) of each run of the flat batch's rows that an adapter
    # applies to (`tgi_server.lora`); empty: none
    lora_segments: tuple[tuple[int, int, int], ...] = ()


_current: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar("forward_context", default=None)


@contextlib.contextmanager
def forward_context(attn: AttentionMetadata, kv_caches: list[torch.Tensor],
                    lora_segments: tuple[tuple[int, int, int], ...] = ()) -> Iterator[ForwardContext]:
    """The step's metadata, caches and adapter rows, for the forward passes run inside the block."""
    token = _current.set(ForwardContext(attn, kv_caches, lora_segments))
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

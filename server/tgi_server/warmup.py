"""Warmup: run the largest step the router may send, size the paged KV cache, capture CUDA graphs.

The largest step is `max_batch_prefill_tokens` prompt tokens spread over as few requests as the
per-request limit allows, with every sampling feature on (and the draft model computing the same
prompts, when there is one), so peak activation memory is known before the KV cache takes what is left. Two tiny steps follow (1 and 17 tokens): Triton compiles a kernel once
per class of its integer arguments (one, a multiple of 16, any other), and a first request should not
wait for that.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from tgi_server.model_runner import ModelRunner, NewSequence, ScheduledSequence
from tgi_server.sampler import SamplingParams

# Share of free accelerator memory given to the KV cache after warmup (the rest is headroom).
CUDA_KV_FRACTION = 0.9
# On CPU the cache lives in RAM next to everything else: take a modest share, bounded.
CPU_KV_FRACTION = 0.2
CPU_KV_MAX_BYTES = 1 << 30

log = logging.getLogger(__name__)

_WARMUP_SAMPLING = SamplingParams(
    do_sample=True, temperature=0.9, top_k=10, top_p=0.9, typical_p=0.9,
    repetition_penalty=1.2, frequency_penalty=0.1, seed=0,
)


def warmup(
    runner: ModelRunner,
    max_batch_prefill_tokens: int,
    max_total_tokens: int,
    max_batch_size: int,
    max_batch_total_tokens: int = 0,
    memory_fraction: float = 1.0,
) -> int:
    """Runs the largest allowed step, then allocates the KV cache (within `memory_fraction` of the
    GPU) and captures the decode CUDA graphs; returns the cache's number of blocks."""
    lengths = _warmup_lengths(max_batch_prefill_tokens, max(max_total_tokens - 1, 1), max_batch_size)
    if runner.drafter is not None:
        runner.drafter.max_tokens = max_batch_prefill_tokens
    started = time.monotonic()
    for step_lengths in (lengths, [1], [17]):
        _run_step(runner, step_lengths)
    log.info("warmup steps (%d prompt tokens in %d requests, then 1 and 17) took %.1f s",
             sum(lengths), len(lengths), time.monotonic() - started)
    if max_batch_total_tokens:
        num_blocks = 1 + -(-max_batch_total_tokens // runner.block_size)
    else:
        # More than every request at its longest can never be used.
        num_useful = 1 + -(-max_batch_size * max_total_tokens // runner.block_size)
        num_blocks = min(_num_kv_blocks_that_fit(runner, memory_fraction), num_useful)
    runner.allocate_kv_cache(num_blocks)
    if runner.device.type == "cuda":
        # CUDA graphs allocate from a private pool, which cannot use blocks the caching allocator
        # holds for the warmup steps' tensors: hand those back first (a 30B MoE on 80 GB ran out).
        torch.cuda.empty_cache()
    started = time.monotonic()
    runner.capture_cuda_graphs(max_total_tokens, max_batch_size, max_batch_prefill_tokens)
    decode, mixed = runner.decode_graphs, runner.mixed_graphs
    if decode is not None:
        copies = 2 if decode.lora else 1
        log.info("CUDA graphs captured in %.1f s: %d decode (batch sizes %d to %d), %d mixed steps (up to %d tokens)%s",
                 time.monotonic() - started, len(decode.batch_sizes) * copies, decode.batch_sizes[0],
                 decode.batch_sizes[-1], len(mixed.token_buckets) * copies, mixed.token_buckets[-1],
                 ", each also with LoRA adapters" if decode.lora else "")
    return num_blocks


def _run_step(runner: ModelRunner, lengths: list[int]) -> None:
    """One step prefilling `lengths` prompts on a cache just big enough; leaves no cache behind."""
    block_size = runner.block_size
    # A slot for each sampled token too: the draft model's catch-up computes it.
    runner.allocate_kv_cache(1 + sum(-(-(n + 1) // block_size) for n in lengths))
    new, scheduled, next_block = [], [], 1
    for request_id, length in enumerate(lengths):
        count = -(-(length + 1) // block_size)
        token_ids = [(request_id * 31 + i) % 100 + 1 for i in range(length)]
        new.append(NewSequence(request_id, token_ids, _WARMUP_SAMPLING, top_n_tokens=5, wants_prompt_logprobs=True))
        scheduled.append(ScheduledSequence(request_id, length, list(range(next_block, next_block + count))))
        next_block += count
    runner.step([], new, scheduled)
    if runner.drafter is not None:  # the draft model computes the same prompts before its first proposals
        runner.drafter.catch_up(list(runner.sequences.values()))
    runner.clear()
    runner.allocate_kv_cache(0)


def _warmup_lengths(num_tokens: int, max_length: int, max_batch_size: int) -> list[int]:
    lengths = []
    while num_tokens > 0 and len(lengths) < max_batch_size:
        lengths.append(min(num_tokens, max_length))
        num_tokens -= lengths[-1]
    return lengths


def _num_kv_blocks_that_fit(runner: ModelRunner, memory_fraction: float) -> int:
    per_block = runner.kv_cache_bytes_per_block()
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
        free, total = torch.cuda.mem_get_info(runner.device)
        reserved = torch.cuda.memory_reserved(runner.device)
        cached = reserved - torch.cuda.memory_allocated(runner.device)
        budget = (min(free, total * memory_fraction - reserved) + cached) * CUDA_KV_FRACTION
    else:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        budget = min(available * CPU_KV_FRACTION, CPU_KV_MAX_BYTES)
    return max(int(budget // per_block), 2)

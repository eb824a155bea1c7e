"""Step time of one shard when a prompt chunk rides along a full decode batch (no router, no gRPC).

This is the step that serves many concurrent streams while new prompts arrive: `--decode-rows`
sequences at a `--context`-token context each decode one token, and one new prompt computes a
`--chunks` token chunk in the same forward. For each chunk size it times the mixed step, the lone
chunk, and the lone decode step, so the saving of riding along is `chunk + decode - mixed`, and
prints the GPU kernels of one mixed step when `--profile-chunk` names a size. Prints one JSON object.

    python bench/mixed_step.py --decode-rows 128 --context 1024 --chunks 0,256,512,1024,2048,3968
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from shard_step import BLOCK_SIZE, build_runner
from tgi_proto.settings import DEFAULT_CUDA_GRAPH_SIZES
from tgi_server.model_runner import ModelRunner, NewSequence, ScheduledSequence
from tgi_server.sampler import SamplingParams


class Workload:
    """Decoding sequences (ids 0..rows-1) on fixed block ranges, and fresh prompts on a spare range."""

    def __init__(self, runner: ModelRunner, rows: int, context: int, max_steps: int, max_chunk: int):
        self.runner = runner
        self.rows = rows
        self.blocks_per_row = -(-(context + max_steps + 2) // BLOCK_SIZE)
        self.chunk_blocks = list(range(1 + rows * self.blocks_per_row, 1 + rows * self.blocks_per_row + -(-max_chunk // BLOCK_SIZE)))
        self.next_id = 1_000_000
        # Prefill the decoding rows in chunks of whole prompts (untimed).
        for first in range(0, rows, 4):
            ids = range(first, min(first + 4, rows))
            new = [NewSequence(i, [(7 * i + t) % 1000 + 1 for t in range(context)], SamplingParams(), 0) for i in ids]
            runner.step([], new, [ScheduledSequence(i, context, self._row_blocks(i)) for i in ids])

    def _row_blocks(self, row: int) -> list[int]:
        return list(range(1 + row * self.blocks_per_row, 1 + (row + 1) * self.blocks_per_row))

    def step(self, chunk: int, decode: bool) -> float:
        """Seconds of one step: the rows' decodes (if `decode`) and a new prompt's first `chunk` tokens."""
        scheduled = [ScheduledSequence(i, 1, []) for i in range(self.rows)] if decode else []
        new, finished = [], []
        if chunk:
            request_id, self.next_id = self.next_id, self.next_id + 1
            # A prompt longer than the chunk: the step computes part of it and samples nothing for it.
            new = [NewSequence(request_id, [(3 * t) % 1000 + 1 for t in range(chunk + 1)], SamplingParams(), 0)]
            scheduled.append(ScheduledSequence(request_id, chunk, self.chunk_blocks[: -(-(chunk + 1) // BLOCK_SIZE)]))
            finished = [request_id]
        start = time.perf_counter()
        self.runner.step([], new, scheduled)  # samples come back as Python ints: the step is synchronous
        seconds = time.perf_counter() - start
        if finished:
            self.runner.step(finished, [], [])
        return seconds


def median_ms(workload: Workload, chunk: int, decode: bool, repeats: int) -> float:
    times = [workload.step(chunk, decode) for _ in range(repeats + 1)][1:]
    return round(statistics.median(times) * 1000, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--decode-rows", type=int, default=128)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--chunks", default="0,256,512,1024,2048,3968")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile-chunk", type=int, help="Print the GPU kernels of mixed steps with this chunk to stderr.")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chunks = [int(c) for c in args.chunks.split(",")]
    max_steps = (len(chunks) * 2 + 4) * (args.repeats + 1)
    max_total_tokens = args.context + max_steps + 2
    blocks_per_row = -(-max_total_tokens // BLOCK_SIZE)
    num_blocks = 1 + args.decode_rows * blocks_per_row + -(-max(chunks) // BLOCK_SIZE) + 1
    # As the server captures them: decode batches up to 256, mixed steps up to 4096 tokens.
    runner = build_runner(args.shape, device, num_blocks, DEFAULT_CUDA_GRAPH_SIZES if device.type == "cuda" else (), max_total_tokens)
    workload = Workload(runner, args.decode_rows, args.context, max_steps, max(chunks))
    decode_ms = median_ms(workload, 0, True, args.repeats)
    results = []
    for chunk in chunks:
        if not chunk:
            continue
        mixed = median_ms(workload, chunk, True, args.repeats)
        alone = median_ms(workload, chunk, False, args.repeats)
        results.append({
            "chunk": chunk, "mixed_ms": mixed, "chunk_alone_ms": alone, "decode_alone_ms": decode_ms,
            "saved_ms": round(alone + decode_ms - mixed, 3),
            "output_tok_s_mixed": round(args.decode_rows / mixed * 1000, 1),
        })
        print(results[-1], file=sys.stderr)
    if args.profile_chunk:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                workload.step(args.profile_chunk, True)
        print(f"== 3 mixed steps: {args.decode_rows} decodes at context {args.context} + a {args.profile_chunk}-token chunk",
              file=sys.stderr)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), file=sys.stderr)
    print(json.dumps({
        "benchmark": "mixed_step", "shape": args.shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "decode_rows": args.decode_rows, "context": args.context,
        "decode_step_ms": decode_ms, "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()

"""Step time of one shard's ModelRunner, without router or gRPC.

Builds a model of one of `make_model_dir.SHAPES` with random bf16 weights (no checkpoint needed), times a lone
prefill of each `--prefill-lens`, then prefills requests and times decode steps at several batch
sizes; with CUDA graphs it also times the bare graph replay (GPU time of the forward + LM head), so
step time = replay + host work + sampling. Prints one JSON object.

    python bench/shard_step.py --shape llama-3.1-8b --batch-sizes 1,32 --decode-steps 64
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from transformers import AutoConfig

from tgi_proto.settings import DEFAULT_CUDA_GRAPH_SIZES
from tgi_server.distributed import SINGLE, TPGroup
from tgi_server.kernels import pdl
from tgi_server.layers.linear import quantize_linears
from tgi_server.model_runner import ModelRunner, NewSequence, ScheduledSequence
from bench_common import replay_ms
from make_model_dir import SHAPES
from tgi_server.models.registry import fill_random_weights, model_architecture, model_class
from tgi_server.ops import building_with
from tgi_server.sampler import SamplingParams

BLOCK_SIZE = 16


def build_runner(
    shape: str, device: torch.device, num_blocks: int, graph_sizes: tuple[int, ...], max_total_tokens: int,
    tp: TPGroup = SINGLE, backend: str | None = None, quantize: str | None = None,
) -> ModelRunner:
    fields = dict(SHAPES[shape])
    config = AutoConfig.for_model(fields.pop("model_type", "llama"), **fields)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with building_with(backend):
        model = model_class(model_architecture(config), tp.world_size)(config, tp, dtype, device).eval()
    fill_random_weights(model, seed=0)
    if quantize == "fp8":  # as --quantize fp8 does after loading
        quantize_linears(model)
    if backend == "portable":  # its attention is not capture-safe (`tgi_server.ops.portable.CAPTURE_SAFE`)
        graph_sizes = ()
    runner = ModelRunner(model, config, tp, device, dtype, BLOCK_SIZE, graph_sizes)
    runner.allocate_kv_cache(num_blocks)
    if graph_sizes:
        runner.capture_cuda_graphs(max_total_tokens, max(graph_sizes), max(max_total_tokens, 4096))
    return runner


def time_prefill(runner: ModelRunner, length: int, request_id: int, repeats: int = 5) -> dict:
    """Median time of one step that prefills a lone `length`-token prompt and samples its first token."""
    blocks = list(range(1, 1 + -(-length // BLOCK_SIZE)))
    times = []
    for i in range(repeats):
        new = [NewSequence(request_id + i, [(3 * t) % 1000 + 1 for t in range(length)], SamplingParams(), 0)]
        start = time.perf_counter()
        runner.step([], new, [ScheduledSequence(request_id + i, length, blocks)])
        times.append(time.perf_counter() - start)
        runner.step([request_id + i], [], [])
    return {"prompt_len": length, "prefill_step_median_ms": round(statistics.median(times[1:]) * 1000, 3)}


def time_graph_replay(runner: ModelRunner, batch_size: int, repeats: int = 50) -> float | None:
    """GPU time (ms) of one replay of the decode graph that serves `batch_size` sequences."""
    graphs = runner.decode_graphs
    size = graphs.padded_size(batch_size) if graphs is not None else None
    if size is None:
        return None
    graph = graphs.graph(size)
    graph.replay()
    return round(replay_ms(graph, repeats), 3)


def time_decode(runner: ModelRunner, batch_size: int, prompt_len: int, num_steps: int, first_id: int) -> dict:
    """Prefills `batch_size` prompts, then runs `num_steps` decode steps; returns per-step times."""
    blocks_per_seq = -(-(prompt_len + num_steps) // BLOCK_SIZE)
    new, scheduled = [], []
    for i in range(batch_size):
        request_id = first_id + i
        blocks = list(range(1 + i * blocks_per_seq, 1 + (i + 1) * blocks_per_seq))
        new.append(NewSequence(request_id, [(7 * i + t) % 1000 + 1 for t in range(prompt_len)], SamplingParams(), 0))
        scheduled.append(ScheduledSequence(request_id, prompt_len, blocks))
    start = time.perf_counter()
    runner.step([], new, scheduled)
    prefill_s = time.perf_counter() - start
    decode = [ScheduledSequence(first_id + i, 1, []) for i in range(batch_size)]
    step_times = []
    for _ in range(num_steps):
        start = time.perf_counter()
        runner.step([], [], decode)  # samples come back as Python ints: the step is synchronous
        step_times.append(time.perf_counter() - start)
    replay_ms = time_graph_replay(runner, batch_size) if runner.device.type == "cuda" else None
    runner.step([first_id + i for i in range(batch_size)], [], [])
    median = statistics.median(step_times)
    return {
        "graph_replay_ms": replay_ms,
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "prefill_s": round(prefill_s, 4),
        "decode_step_median_ms": round(median * 1000, 3),
        "decode_step_p90_ms": round(sorted(step_times)[int(0.9 * len(step_times))] * 1000, 3),
        "output_tokens_per_s": round(batch_size / median, 1),
    }


def time_verify(runner: ModelRunner, prompt_len: int, num_proposals: list[int], num_steps: int, first_id: int) -> list[dict]:
    """One decoding request's speculative verify steps: the last token and k proposed ones in one
    forward, sampled at each (`ScheduledSequence.draft_token_ids`), for each k; the proposals are
    never right, so each step keeps one token (the request grows by one per step, as when decoding)."""
    max_k = max(num_proposals)
    blocks = list(range(1, 1 + -(-(prompt_len + max_k + num_steps * len(num_proposals) + 2) // BLOCK_SIZE)))
    runner.step([], [NewSequence(first_id, [(5 * t) % 1000 + 1 for t in range(prompt_len)], SamplingParams(), 0)],
                [ScheduledSequence(first_id, prompt_len, blocks)])
    results = []
    for k in num_proposals:
        step_times = []
        for _ in range(num_steps):
            sequence = runner.sequences[first_id]
            wrong = [(sequence.token_ids[-1] + 1 + j) % 1000 + 1 for j in range(k)]  # an unlikely continuation
            start = time.perf_counter()
            runner.step([], [], [ScheduledSequence(first_id, 1 + k, [], draft_token_ids=wrong)] if k else
                        [ScheduledSequence(first_id, 1, [])])
            step_times.append(time.perf_counter() - start)
        results.append({"proposed_tokens": k, "step_median_ms": round(statistics.median(step_times) * 1000, 3)})
    runner.step([first_id], [], [])
    return results


def profile(runner: ModelRunner, prompt_len: int, prefill_lens: list[int], batch_sizes: list[int]) -> None:
    """torch.profiler tables (to stderr) of 8 decode steps at each of `batch_sizes` and of lone
    prefills of each of `prefill_lens`."""
    import sys

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for i, batch_size in enumerate(batch_sizes):
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            time_decode(runner, batch_size, prompt_len, 8, first_id=30_000 + 1000 * i)
        print(f"== decode, batch {batch_size}, prompt {prompt_len}, 8 steps", file=sys.stderr)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), file=sys.stderr)
    for i, length in enumerate(prefill_lens):
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            time_prefill(runner, length, request_id=40_000 + 100 * i, repeats=2)
        print(f"== prefill of {length} tokens, 2 repeats (plus one untimed)", file=sys.stderr)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--prefill-lens", default="128,1024", help="Lone prompts to time a prefill step of.")
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--disable-custom-kernels", action="store_true", help="The portable PyTorch path.")
    parser.add_argument("--skinny-max-rows", type=int, help="Batches up to this many rows use the skinny linear kernel (default: the kernel's MAX_ROWS; 0: cuBLAS only).")
    parser.add_argument("--quantize", choices=["fp8"], help="The linears in fp8, as --quantize fp8 serves them.")
    parser.add_argument("--fp8-dot-max-rows", type=int, help="Rows up to which fp8 linears take the tensor-core GEMV "
                        "(kernels.skinny.FP8_DOT_MAX_ROWS; default: the module's).")
    parser.add_argument("--profile", action="store_true", help="Print the top GPU kernels of decode steps and prefills to stderr.")
    parser.add_argument("--profile-batch-sizes", default="1", help="Decode batch sizes to profile.")
    parser.add_argument("--verify-lens", default="", help="Also time one request's speculative verify steps with these "
                        "numbers of proposed tokens (0: a plain decode step), e.g. 0,1,2,4,8.")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "portable" if args.disable_custom_kernels else None
    if args.skinny_max_rows is not None:
        from tgi_server.kernels import skinny

        skinny.MAX_ROWS = args.skinny_max_rows
    if args.fp8_dot_max_rows is not None:
        from tgi_server.kernels import skinny

        skinny.FP8_DOT_MAX_ROWS = args.fp8_dot_max_rows
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    prefill_lens = [int(n) for n in args.prefill_lens.split(",") if n]
    max_total_tokens = max([args.prompt_len + args.decode_steps + 1, *prefill_lens])
    profile_batch_sizes = [int(b) for b in args.profile_batch_sizes.split(",")] if args.profile else []
    decode_blocks = -(-(args.prompt_len + args.decode_steps + 1) // BLOCK_SIZE)
    verify_blocks = -(-(args.prompt_len + args.decode_steps * 9 + 16) // BLOCK_SIZE)
    blocks_needed = max(batch_sizes + profile_batch_sizes) * decode_blocks + -(-max_total_tokens // BLOCK_SIZE) + 1 + verify_blocks
    graph_sizes = () if args.no_cuda_graphs or device.type != "cuda" else tuple(
        size for size in DEFAULT_CUDA_GRAPH_SIZES if size <= max(batch_sizes + profile_batch_sizes)
    )
    runner = build_runner(args.shape, device, blocks_needed, graph_sizes, max_total_tokens, backend=backend,
                          quantize=args.quantize)
    time_decode(runner, 1, 16, 4, first_id=10_000)  # warm-up: allocator, kernels
    prefills = [time_prefill(runner, n, request_id=20_000 + 100 * i) for i, n in enumerate(prefill_lens)]
    results = [
        time_decode(runner, b, args.prompt_len, args.decode_steps, first_id=1000 * (i + 1))
        for i, b in enumerate(batch_sizes)
    ]
    verify_lens = [int(k) for k in args.verify_lens.split(",") if k]
    verify = time_verify(runner, args.prompt_len, verify_lens, args.decode_steps, first_id=50_000) if verify_lens else []
    if args.profile:
        profile(runner, args.prompt_len, prefill_lens, profile_batch_sizes)
    print(json.dumps({
        "benchmark": "shard_step",
        "shape": args.shape,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda_graphs": list(graph_sizes),
        "custom_kernels": not args.disable_custom_kernels,
        "skinny_max_rows": args.skinny_max_rows,
        "quantize": args.quantize,
        "fp8_dot_max_rows": args.fp8_dot_max_rows,
        "pdl": pdl.ENABLED,
        "prefill": prefills,
        "results": results,
        "verify": verify,
    }, indent=2))


if __name__ == "__main__":
    main()

"""Where a one-stream decode step's GPU time goes with tensor parallelism: one process per GPU, each
rank's runner built for its share of the 8B shape (random weights), one sequence decoding with CUDA
graphs as the router drives it (lookahead). Per world size and all-reduce path it reports the step's
wall time, the decode graph's replay time (forward + LM head on the GPU), and rank 0's kernels in
one replay grouped by name (count and summed time), so the all-reduce time per step and the time
between kernels are read off directly.

    python bench/tp_decode.py --world-sizes 1,2 > tp_decode.json

Prints one JSON object; a summary goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys

import torch
import torch.multiprocessing as mp

from decode_timeline import run_steps
from shard_step import BLOCK_SIZE, build_runner, time_graph_replay
from tgi_server.distributed import init_distributed


def _kernels(graph, replays: int = 5) -> tuple[list[dict], float]:
    """Kernels of `replays` replays grouped by name (per replay), and their summed time (us)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    path = f"/tmp/tp_decode_trace_{os.getpid()}.json"
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    by_name: dict[str, list[float]] = {}
    for event in events:
        if event.get("ph") == "X" and event.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            by_name.setdefault(event["name"], []).append(event["dur"])
    rows = [{"kernel": name[:90], "count": len(t) // replays, "us": round(sum(t) / replays, 1)} for name, t in by_name.items()]
    rows.sort(key=lambda r: -r["us"])
    return rows, sum(r["us"] for r in rows)


def _worker(rank: int, world_size: int, port: int, custom: bool, args, out_path: str) -> None:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    tp = init_distributed(rank, world_size, "127.0.0.1", port, device, torch.bfloat16, custom_all_reduce=custom)
    max_total = args.prompt_len + args.steps + 16
    runner = build_runner(args.shape, device, 4 * (max_total // BLOCK_SIZE + 2), (), max_total, tp=tp)
    runner.cuda_graph_sizes = (1,)
    runner.capture_cuda_graphs(max_total, 1, 64)  # one decode graph; mixed steps only up to 64 tokens
    run_steps(runner, 1, args.prompt_len, 16)
    times = run_steps(runner, 2, args.prompt_len, args.steps)
    graph = runner.decode_graphs.graph(1)
    if world_size > 1:
        torch.distributed.barrier()
    replay = time_graph_replay(runner, 1, repeats=100)
    kernels, busy_us = _kernels(graph)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({
                "world_size": world_size, "custom_all_reduce": tp.fast_all_reduce is not None,
                "step_median_ms": round(statistics.median(times) * 1000, 3),
                "graph_replay_ms": round(replay, 3), "kernel_busy_ms": round(busy_us / 1000, 3),
                "num_kernels": sum(k["count"] for k in kernels), "kernels": kernels[:25],
            }, f)
    if world_size > 1:
        torch.distributed.barrier()
    # No destroy_process_group: with symmetric memory rendezvoused it was seen to hang (H200, torch 2.11).
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--world-sizes", default="1,2")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--all-reduce", choices=["both", "custom", "nccl"], default="both", help="paths to run with 2+ ranks")
    args = parser.parse_args()
    runs = []
    for world_size in (int(w) for w in args.world_sizes.split(",")):
        paths = {"both": [True, False], "custom": [True], "nccl": [False]}[args.all_reduce]
        for custom in (paths if world_size > 1 else [False]):
            out = f"/tmp/tp_decode_{world_size}_{custom}.json"
            mp.spawn(_worker, args=(world_size, _free_port(), custom, args, out), nprocs=world_size, join=True)
            runs.append(json.load(open(out)))
            r = runs[-1]
            print(f"TP={world_size} custom={r['custom_all_reduce']}: step {r['step_median_ms']} ms, replay "
                  f"{r['graph_replay_ms']} ms, kernels busy {r['kernel_busy_ms']} ms in {r['num_kernels']} kernels", file=sys.stderr)
            for k in r["kernels"][:12]:
                print(f"    {k['us']:>8} us  x{k['count']:<4} {k['kernel']}", file=sys.stderr)
    print(json.dumps({"device": torch.cuda.get_device_name(), "shape": args.shape, "runs": runs}))


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    main()

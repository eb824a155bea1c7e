"""All-reduce latency on this machine's GPUs: NCCL against the shards' symmetric-memory kernel
(`tgi_server.distributed.SymmetricAllReduce`), each replayed from a CUDA graph as a decode step does.

    python bench/all_reduce.py --world-size 2 > all_reduce.json

Sizes are rows of hidden states (bf16, hidden 4096 by default): 1 row is a one-stream decode step's
message, 128 rows a 128-sequence decode step's, 4096 a large prompt chunk's. Each method is checked
against the exact sum first (every rank draws every rank's input from its seed). Prints one JSON
object; the table goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tgi_server.distributed import SYMMETRIC_ALL_REDUCE_MAX_BYTES, SymmetricAllReduce, init_distributed

NUM_OPS_PER_GRAPH = 64  # a decode step of the 8B shape has 64 all-reduces (two per layer)


def _rank_input(rank: int, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(1000 + rank)
    return torch.randn(numel, generator=generator).to(dtype).to(device)


def _chain_graph(fn, x: torch.Tensor) -> torch.cuda.CUDAGraph:
    """NUM_OPS_PER_GRAPH calls of `fn`, each on the last one's output (as layer after layer), captured."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = x
        for _ in range(NUM_OPS_PER_GRAPH):
            y = fn(y)
    return graph


def _replay_ms(graph: torch.cuda.CUDAGraph, num_replays: int) -> float:
    for _ in range(3):
        graph.replay()
    dist.barrier()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(num_replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _time_graph(fn, x: torch.Tensor, num_replays: int) -> float:
    """Microseconds per op: NUM_OPS_PER_GRAPH ops captured in one graph, replayed `num_replays` times,
    less the `* 0.5` that keeps the chain's values bounded (timed alone)."""
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    with_op = _replay_ms(_chain_graph(lambda y: fn(y) * 0.5, x), num_replays)
    scale_only = _replay_ms(_chain_graph(lambda y: y * 0.5, x), num_replays)
    return (with_op - scale_only) * 1000 / (num_replays * NUM_OPS_PER_GRAPH)


def _worker(rank: int, world_size: int, port: int, rows: list[int], hidden: int, out_path: str) -> None:
    device = torch.device("cuda", rank)
    dtype = torch.bfloat16
    tp = init_distributed(rank, world_size, "127.0.0.1", port, device, dtype, custom_all_reduce=True)
    big = SymmetricAllReduce(tp.group, device, dtype, max(rows) * hidden * dtype.itemsize)

    def nccl(x):
        y = x.clone()
        dist.all_reduce(y, group=tp.group)
        return y

    def two_shot(x):
        buffer = big.buffer[: x.numel()]
        buffer.copy_(x)
        torch.ops.symm_mem.two_shot_all_reduce_(buffer, "sum", big.group_name)
        return buffer.clone()

    methods = {"nccl": nccl, "symmetric_one_shot": big, "symmetric_two_shot": two_shot}
    results = []
    for num_rows in rows:
        numel = num_rows * hidden
        inputs = [_rank_input(r, numel, dtype, device) for r in range(world_size)]
        expected = sum(t.float() for t in inputs)
        for name, fn in methods.items():
            got = fn(inputs[rank]).float()
            error = ((got - expected).norm() / expected.norm()).item()
            micros = _time_graph(fn, inputs[rank], num_replays=50 if num_rows < 1024 else 10)
            results.append({
                "method": name, "rows": num_rows, "bytes": numel * 2, "us_per_op": round(micros, 2),
                "rel_error": error, "gb_s": round(numel * 2 / micros / 1000, 1),
            })
    results.append({"symmetric_path_max_bytes": SYMMETRIC_ALL_REDUCE_MAX_BYTES, "shard_uses_symmetric": tp.fast_all_reduce is not None})
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world-size", type=int, default=torch.cuda.device_count())
    parser.add_argument("--rows", default="1,2,8,32,128,512,1024,4096")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--out", default="/tmp/all_reduce_rank0.json")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows = [int(r) for r in args.rows.split(",")]
    mp.spawn(_worker, args=(args.world_size, port, rows, args.hidden, args.out), nprocs=args.world_size, join=True)
    results = json.load(open(args.out))
    for r in results:
        if "method" in r:
            print(f"{r['method']:>20} rows {r['rows']:>5} {r['bytes']:>10} B  {r['us_per_op']:>8.2f} us  "
                  f"{r['gb_s']:>6} GB/s  err {r['rel_error']:.1e}", file=sys.stderr)
    print(json.dumps({"world_size": args.world_size, "hidden": args.hidden, "device": torch.cuda.get_device_name(),
                      "ops_per_graph": NUM_OPS_PER_GRAPH, "results": results}))


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    main()

"""The skinny (few-token) linear kernel against cuBLAS on the Llama-3.1-8B projection shapes.

For each shape and row count, times `F.linear` (cuBLAS) and every tile configuration of
`tgi_server.kernels.skinny`, each as a CUDA graph of calls over rotating weight copies (more bytes
than the L2 cache holds, as in a decode step that walks 32 layers), checks the result against
cuBLAS, and prints one JSON object: per shape and M, cuBLAS's time and bandwidth, the best
configuration's, and every configuration's time.

    python bench/skinny_linear.py --rows 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F

from tgi_server.kernels.skinny import _config, skinny_linear

SHAPES = {  # name: (N, K) of the 8B's weights, one rank
    "qkv_proj": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate_up_proj": (28672, 4096),
    "down_proj": (4096, 14336),
    "lm_head": (128256, 4096),
    # Qwen3-30B-A3B's attention and router (hidden 2048, 32 heads of 128 over 4 KV heads, 128 experts)
    "moe_qkv_proj": (5120, 2048),
    "moe_o_proj": (2048, 4096),
    "moe_router": (128, 2048),
}
CONFIGS = [
    (block_n, block_k, warps)
    for block_n, block_k, warps in itertools.product((1, 2, 4, 8, 16), (256, 512, 1024, 2048), (2, 4, 8))
]
L2_FLUSH_BYTES = 512 << 20


def time_calls(fn, weights: list[torch.Tensor], replays: int = 20) -> float:
    """Median ms per call of fn(w) over `weights`, replayed as one CUDA graph."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for w in weights[:2]:
            fn(w)  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for w in weights:
            fn(w)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(weights))
    return sorted(times)[len(times) // 2]


def fits(m_block: int, config: tuple[int, int, int]) -> bool:
    block_n, block_k, warps = config
    return m_block * block_n * block_k // (32 * warps) <= 128  # float32 accumulator registers per thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda")
    results = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        copies = max(2, -(-L2_FLUSH_BYTES // (n * k * 2)))
        weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for m in map(int, args.rows.split(",")):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            reference = F.linear(x.float(), weights[0].float())
            cublas_ms = time_calls(lambda w: F.linear(x, w), weights)
            row = {"shape": name, "n": n, "k": k, "m": m, "cublas_ms": round(cublas_ms, 4),
                   "cublas_tb_s": round(n * k * 2 / cublas_ms / 1e9, 3), "configs": {}}
            m_block = max(1, 1 << (m - 1).bit_length())
            for config in [c for c in CONFIGS if fits(m_block, c)]:
                out = skinny_linear(x, weights[0], config=config)
                error = ((out.float() - reference).norm() / reference.norm()).item()
                if not error < 1e-2:
                    row["configs"][str(config)] = f"wrong: relative error {error:.3g}"
                    continue
                row["configs"][str(config)] = round(time_calls(lambda w: skinny_linear(x, w, config=config), weights), 4)
            timed = {c: t for c, t in row["configs"].items() if isinstance(t, float)}
            best = min(timed, key=timed.get)
            row["best"] = best
            row["best_ms"] = timed[best]
            row["best_tb_s"] = round(n * k * 2 / timed[best] / 1e9, 3)
            row["default"] = str(_config(m, n, k))
            row["default_ms"] = timed.get(row["default"])
            results.append(row)
            print(f"{name:13s} m={m} cublas {cublas_ms:.4f} ms ({row['cublas_tb_s']} TB/s)  "
                  f"best {best} {timed[best]:.4f} ms ({row['best_tb_s']} TB/s)  default {row['default_ms']}", file=sys.stderr, flush=True)
        del weights
    print(json.dumps({"benchmark": "skinny_linear", "device": torch.cuda.get_device_name(), "results": results}))


if __name__ == "__main__":
    main()

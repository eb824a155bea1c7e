"""The fused MoE layer at decode sizes: tile configs of the per-pair matrix-vector kernels against the
grouped-GEMM path, and the router's top-k kernel against PyTorch's, each timed as a CUDA-graph replay
(as a decode step runs them). Prints one JSON object; bandwidth counts the distinct experts' weights
a call reads.

    python bench/moe_decode.py --tokens 1,2,4,8,16
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from bench_common import replay_ms
from tgi_server.kernels import moe
from tgi_server.ops import portable

SHAPES = {  # (num_experts, top_k, hidden_size, expert width)
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "mixtral-8x7b": (8, 2, 4096, 14336),
}
GROUPED_CONFIGS = [(16, 64, 64, 4, 3), (32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 128, 64, 8, 3),
                   (128, 128, 64, 8, 3), (64, 64, 128, 4, 4), (16, 128, 128, 4, 3), (32, 128, 64, 4, 4)]
CONFIGS = [(2, 1024, 4), (4, 512, 4), (4, 256, 4), (8, 256, 4), (8, 512, 8), (16, 256, 8), (16, 128, 4), (32, 128, 8)]
# the down projection's: the loop over experts (False) at the gate/up tiles, and the experts side by side
DOWN_CONFIGS = [(*config, False) for config in CONFIGS] + [
    (n, k, w, True) for n in (1, 2, 4, 8) for k in (128, 256, 512) for w in (4, 8) if n * k <= 2048]


def graph_time_us(fn, repeats: int = 200) -> float:
    """Median over 5 rounds of the mean replay time of a CUDA graph of `fn`, microseconds."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return statistics.median(replay_ms(graph, repeats) * 1000 for _ in range(5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,2,4,8,16")
    parser.add_argument("--grouped-tokens", default="16,128,1024", help="Token counts to sweep the grouped GEMMs' configs at.")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    results = []
    grouped_tokens = [int(t) for t in args.grouped_tokens.split(",") if t]
    for shape in args.shapes.split(","):
        num_experts, top_k, hidden_size, width = SHAPES[shape]
        w13 = torch.empty(num_experts, 2 * width, hidden_size, dtype=torch.bfloat16, device=device).uniform_(-1e-2, 1e-2, generator=generator)
        w2 = torch.empty(num_experts, hidden_size, width, dtype=torch.bfloat16, device=device).uniform_(-1e-2, 1e-2, generator=generator)
        token_counts = sorted({int(t) for t in args.tokens.split(",")} | set(grouped_tokens))
        for num_tokens in token_counts:
            hidden = torch.randn(num_tokens, hidden_size, dtype=torch.bfloat16, device=device, generator=generator)
            logits = torch.randn(num_tokens, num_experts, dtype=torch.bfloat16, device=device, generator=generator)
            weights, ids = moe.route_experts(logits, top_k, True)
            expert_bytes = ids.unique().numel() * 3 * hidden_size * width * 2
            expected = portable.fused_moe(hidden, w13, w2, weights, ids, "silu")
            routing = weights.view(-1)
            row = {"shape": shape, "num_tokens": num_tokens, "expert_mb": round(expert_bytes / 1e6, 2)}
            row["route_kernel_us"] = round(graph_time_us(lambda: moe.route_experts(logits, top_k, True)), 2)
            row["route_torch_us"] = round(graph_time_us(lambda: portable.route_experts(logits, top_k, True)), 2)
            row["grouped_us"] = round(graph_time_us(lambda: moe._grouped_path(hidden, w13, w2, routing, ids, "silu")), 2)
            if num_tokens in grouped_tokens:
                grouped = {}
                for config in GROUPED_CONFIGS:
                    out = moe._grouped_path(hidden, w13, w2, routing, ids, "silu", config)
                    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
                    grouped[str(config)] = graph_time_us(lambda: moe._grouped_path(hidden, w13, w2, routing, ids, "silu", config), 50)
                row["grouped_default"] = str(moe._grouped_config(num_tokens * top_k, num_experts))
                row["grouped_top5"] = {k: round(v, 2) for k, v in sorted(grouped.items(), key=lambda kv: kv[1])[:5]}
            if num_tokens <= 16:
                # each kernel's tiles swept with the other's default, then the best pair timed
                up_default = moe.GATE_UP_GEMV_ONE_TOKEN if num_tokens == 1 else moe.GATE_UP_GEMV
                up, down = {}, {}
                down_default = moe.down_gemv_config(top_k)
                for sweep, configs, pair in ((up, CONFIGS, lambda c: (c, down_default)),
                                             (down, DOWN_CONFIGS, lambda c: (up_default, c))):
                    for config in configs:
                        up_config, down_config = pair(config)
                        out = moe._gemv_experts(hidden, w13, w2, routing, ids, "silu", up_config, down_config)
                        torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
                        sweep[config] = graph_time_us(
                            lambda: moe._gemv_experts(hidden, w13, w2, routing, ids, "silu", up_config, down_config), 50)
                best = (min(up, key=up.get), min(down, key=down.get))
                best_us = graph_time_us(lambda: moe._gemv_experts(hidden, w13, w2, routing, ids, "silu", *best), 50)
                row["gemv_default_us"] = round(down[down_default], 2)
                row["uses_gemv"] = moe.uses_gemv(num_tokens, top_k, num_experts)
                row["gemv_best"] = f"{best[0]}/{best[1]}"
                row["gemv_best_us"] = round(best_us, 2)
                row["gemv_best_gb_s"] = round(expert_bytes / best_us / 1e3, 1)
                row["gate_up_top5"] = {str(k): round(v, 2) for k, v in sorted(up.items(), key=lambda kv: kv[1])[:5]}
                row["down_top5"] = {str(k): round(v, 2) for k, v in sorted(down.items(), key=lambda kv: kv[1])[:5]}
                row["down_loop_best_us"] = round(min(v for k, v in down.items() if not k[3]), 2)
                row["down_side_by_side_best_us"] = round(min(v for k, v in down.items() if k[3]), 2)
            results.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"benchmark": "moe_decode", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()

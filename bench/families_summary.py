"""Summarises bench/families.sh's runs: per shape, one-stream tok/s and TPOT, TTFT of a 1,024-token
prompt, 128-concurrent output tok/s, transformers' generate_batch where it ran, and the bandwidth
floor of one decode token (weight bytes it reads ÷ HBM bandwidth; for a mixture of experts, only the
experts a token is routed to; with N tensor-parallel shards, each GPU's 1/N of those bytes).

    python bench/families_summary.py /tmp/families-results [--hbm-gbps 4300] [--num-shard 8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from make_model_dir import SHAPES


def decode_bytes_per_token(config: dict, dtype_bytes: int = 2) -> int:
    """Bytes of weights one decode token reads: every attention and dense-MLP weight, the experts it
    is routed to (top-k of them), the router, the norms and the LM head (not the embedding: one row)."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    num_experts = config.get("num_experts") or config.get("num_local_experts") or 0
    if num_experts:
        width = config.get("moe_intermediate_size") or config["intermediate_size"]
        mlp = config["num_experts_per_tok"] * 3 * hidden * width + hidden * num_experts
    else:
        mlp = 3 * hidden * config["intermediate_size"]
    layers = config["num_hidden_layers"] * (attention + mlp + 4 * hidden)
    return (layers + config["vocab_size"] * hidden) * dtype_bytes


def measured_hbm_gbps() -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), GB/s."""
    import torch

    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    stop.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * 10 / (start.elapsed_time(stop) / 1000) / 1e9


def _read(path: Path) -> dict:
    """A result file's "results" (bench/serving.py and hf_generate_batch.py write them there)."""
    return json.loads(path.read_text()).get("results", {}) if path.exists() else {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", type=Path)
    parser.add_argument("--hbm-gbps", type=float)
    parser.add_argument("--num-shard", type=int, default=1, help="tensor-parallel shards (GPUs) the runs used")
    args = parser.parse_args()
    hbm = args.hbm_gbps or measured_hbm_gbps()
    summary = {"hbm_gbps": round(hbm, 1), "num_shard": args.num_shard, "shapes": {}}
    for shape_dir in sorted(p for p in args.results.iterdir() if p.is_dir()):
        config = SHAPES[shape_dir.name]
        floor_ms = decode_bytes_per_token(config) / args.num_shard / (hbm * 1e9) * 1e3
        single = _read(shape_dir / "http_single_stream.json")
        ttft = _read(shape_dir / "http_ttft_1024.json")
        c128 = _read(shape_dir / "http_c128.json")
        hf = _read(shape_dir / "hf_generate_batch.json")
        tpot = single.get("median_tpot_ms")
        summary["shapes"][shape_dir.name] = {
            "decode_weight_gb_per_token": round(decode_bytes_per_token(config) / 1e9, 3),
            "decode_weight_gb_per_token_per_gpu": round(decode_bytes_per_token(config) / args.num_shard / 1e9, 3),
            "floor_ms_per_token": round(floor_ms, 3),
            "floor_tok_s": round(1e3 / floor_ms, 1),
            "single_stream_tok_s": single.get("output_throughput"),
            "single_stream_median_tpot_ms": tpot,
            "share_of_floor": round(floor_ms / tpot, 3) if tpot else None,
            "ttft_1024_median_ms": ttft.get("median_ttft_ms"),
            "c128_output_tok_s": c128.get("output_throughput"),
            "c128_completed": c128.get("completed"),
            "c128_failed": c128.get("failed"),
            "hf_generate_batch_output_tok_s": hf.get("output_throughput"),
        }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

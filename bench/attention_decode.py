"""The paged attention kernel on decode tokens, across key-tile and launch settings.

Times `tgi_server.kernels.attention.paged_attention` (Llama-3.1-8B heads: 32 query, 8 KV, dim 128,
bf16, 16-token pages) on decode batches that read a lot of KV cache (128 and 32 sequences at 1,100
tokens of context, one at 4,096), and 128 of them beside a 1024-token prompt (a mixed step), for
each setting of DECODE_BLOCK_N x DECODE_WARPS x DECODE_STAGES, over bf16 or fp8 caches; prints the
KV cache read rate (TB/s; the H100's HBM3 peaks at 3.35) and one JSON object.

    python bench/attention_decode.py
    python bench/attention_decode.py --block-n 64,128 --warps 4 --stages 3 --kv-dtypes bfloat16,float8_e4m3fn
"""

from __future__ import annotations

import argparse
import json

import torch

from attention_prefill import sweep

WORKLOADS = {  # name: [(query tokens, context before them)] per sequence
    "128_decodes_ctx1100": [(1, 1100)] * 128,
    "32_decodes_ctx1100": [(1, 1100)] * 32,
    "1_decode_ctx4096": [(1, 4096)],
    "128_decodes_ctx1100_plus_prompt_1024": [(1, 1100)] * 128 + [(1024, 0)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-n", default="32,64,128")
    parser.add_argument("--warps", default="2,4,8")
    parser.add_argument("--stages", default="2,3,4")
    parser.add_argument("--kv-dtypes", default="bfloat16", help="KV cache types, e.g. bfloat16,float8_e4m3fn")
    args = parser.parse_args()
    settings = {name: tuple(int(v) for v in getattr(args, arg).split(","))
                for name, arg in (("DECODE_BLOCK_N", "block_n"), ("DECODE_WARPS", "warps"), ("DECODE_STAGES", "stages"))}
    results = [row for kv_dtype in args.kv_dtypes.split(",")
               for row in sweep(WORKLOADS, settings, torch.device("cuda"), getattr(torch, kv_dtype))]
    print(json.dumps({"benchmark": "attention_decode", "device": torch.cuda.get_device_name(), "results": results}))


if __name__ == "__main__":
    main()

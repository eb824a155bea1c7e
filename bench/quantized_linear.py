"""The quantized linears against bf16 on the Llama-3.1-8B projection shapes, few rows (decode).

For each shape and row count, times as a CUDA graph of calls over rotating weight copies (more bytes
than the L2 cache holds, as a decode step walking 32 layers does): bf16 through the server's linear
(`ops.triton_backend.linear`: the skinny kernel or cuBLAS), fp8 weights through the same (the skinny
fp8 kernel or `torch._scaled_mm`, activations quantized per token inside), and 4-bit weights (group
128) through the W4A16 kernel; prints each one's time and the weight bandwidth it reaches, as JSON.

    python bench/quantized_linear.py --rows 1,16
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from skinny_linear import L2_FLUSH_BYTES, SHAPES, time_calls
from tgi_server.ops import triton_backend
from tgi_server.quantization import pack_int4, quantize_fp8_rows

GROUP_SIZE = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--shapes", default="qkv_proj,o_proj,gate_up_proj,down_proj")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda")
    results = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        copies = max(2, -(-L2_FLUSH_BYTES // (n * k)))
        dense = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        fp8 = [quantize_fp8_rows(w.float()) for w in dense]
        codes = torch.randint(0, 16, (n, k), device=device, dtype=torch.int32)
        int4 = [(pack_int4(codes.roll(i, 1)), torch.full((n, k // GROUP_SIZE), 1e-3, device=device, dtype=torch.bfloat16),
                 torch.full((n, k // GROUP_SIZE), 8, device=device, dtype=torch.bfloat16)) for i in range(copies)]
        for m in map(int, args.rows.split(",")):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            times = {
                "bf16": time_calls(lambda w: triton_backend.linear(x, w), dense),
                "fp8": time_calls(lambda w: triton_backend.linear(x, w[0], None, w[1].squeeze(1)), fp8),
                "int4": time_calls(lambda w: triton_backend.int4_linear(x, w[0], w[1], w[2], GROUP_SIZE), int4),
            }
            weight_bytes = {"bf16": n * k * 2, "fp8": n * k, "int4": n * k // 2 + 2 * n * (k // GROUP_SIZE) * 2}
            row = {"shape": name, "n": n, "k": k, "m": m}
            for kind, ms in times.items():
                row[f"{kind}_ms"] = round(ms, 4)
                row[f"{kind}_tb_s"] = round(weight_bytes[kind] / ms / 1e9, 3)
            row["fp8_over_bf16"] = round(times["bf16"] / times["fp8"], 2)
            row["int4_over_bf16"] = round(times["bf16"] / times["int4"], 2)
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        del dense, fp8, int4
    print(json.dumps({"benchmark": "quantized_linear", "device": torch.cuda.get_device_name(), "results": results}))


if __name__ == "__main__":
    main()

"""The quantized linears against bf16 on the Llama-3.1-8B projection shapes, few rows (decode).

For each shape and row count, times as a CUDA graph of calls over rotating weight copies (more bytes
than the L2 cache holds, as a decode step walking 32 layers does): bf16 through the server's linear
(`ops.triton_backend.linear`: the skinny kernel or cuBLAS), fp8 weights through the same (the skinny
fp8 kernel or `torch._scaled_mm`, activations quantized per token inside), and 4-bit weights (group
128) through the W4A16 kernel; prints each one's time and the weight bandwidth it reaches, as JSON.

Up to 128 rows also go through the fp8 tensor-core GEMV (`skinny.fp8_gemv`, x quantized per token).

With --sweep, also every tile configuration of the skinny kernel on fp8 weights, of the fp8 tensor-core
GEMV and of the W4A16 GEMV kernel at each row count up to their row limits (results checked against float32 on the dequantized
weight), with the best one per shape and the best single config over all shapes (the sum of times).

    python bench/quantized_linear.py --rows 1,16
    python bench/quantized_linear.py --rows 1 --sweep
    python bench/quantized_linear.py --rows 1 --sweep fp8_dot,int4
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from skinny_linear import L2_FLUSH_BYTES, SHAPES, fits, time_calls
from tgi_server.kernels import skinny, w4a16
from tgi_server.ops import triton_backend
from tgi_server.quantization import dequantize_int4, pack_int4, quantize_fp8_rows

GROUP_SIZE = 128
FP8_CONFIGS = list(itertools.product((1, 2, 4), (2048, 4096, 8192), (4, 8, 16)))
GEMV_CONFIGS = list(itertools.product((4, 8, 16, 32), (1, 2, 4, 8), (2, 4, 8), (1, 2)))  # (BLOCK_N, CHUNKS, num_warps, TILES)
FP8_DOT_CONFIGS = list(itertools.product((64, 128), (128, 256, 512), (4,), (2, 3, 4, 6)))  # + num_stages


def sweep(kind: str, x: torch.Tensor, weights: list, reference: torch.Tensor, configs: list) -> dict:
    """{str(config): ms or 'wrong: ...'} for every config that keeps the accumulator in registers."""
    if kind == "fp8":
        call = lambda w, c: skinny.skinny_linear(x, w[0], config=c, weight_scale=w[1])  # noqa: E731
    elif kind == "fp8_dot":
        call = lambda w, c: skinny.fp8_gemv(x, w[0], w[1], config=c)  # noqa: E731
    else:
        call = lambda w, c: w4a16.int4_linear(x, *w, GROUP_SIZE, gemv_config=c)  # noqa: E731
    m_block = triton_next_power_of_2(x.shape[0])
    timed = {}
    for config in configs:
        if kind == "fp8" and not fits(m_block, config):  # the float32 accumulator tile: [m, BLOCK_N, BLOCK_K]
            continue
        if kind == "int4" and 2 * config[0] * config[1] * 16 * config[3] > 128 * 32 * config[2]:  # two float32 tiles a row tile
            continue
        try:
            error = ((call(weights[0], config).float() - reference).norm() / reference.norm()).item()
        except Exception as e:  # a config Triton cannot compile (shared memory, registers)
            timed[str(config)] = f"failed: {type(e).__name__}"
            continue
        timed[str(config)] = round(time_calls(lambda w: call(w, config), weights), 4) if error < 1e-2 else f"wrong: {error:.3g}"
    return timed


def triton_next_power_of_2(m: int) -> int:
    return max(1, 1 << (m - 1).bit_length())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--shapes", default="qkv_proj,o_proj,gate_up_proj,down_proj")
    parser.add_argument("--sweep", nargs="?", const="fp8,fp8_dot,int4", default="",
                        help="also every tile config of these few-row kernels (all three when given alone)")
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
        scales = torch.rand((n, k // GROUP_SIZE), device=device).to(torch.bfloat16) * 2e-3
        zeros = torch.randint(0, 16, (n, k // GROUP_SIZE), device=device).to(torch.bfloat16)
        loaded = pack_int4(codes)  # the loaders' layout, for the reference; the kernels read the backend's
        int4 = [(triton_backend.prepare_int4(pack_int4(codes.roll(i, 1))), scales, zeros) for i in range(copies)]
        for m in map(int, args.rows.split(",")):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            times = {
                "bf16": time_calls(lambda w: triton_backend.linear(x, w), dense),
                "fp8": time_calls(lambda w: triton_backend.linear(x, w[0], None, w[1].squeeze(1)), fp8),
                "int4": time_calls(lambda w: triton_backend.int4_linear(x, w[0], w[1], w[2], GROUP_SIZE), int4),
            }
            if m <= 128:  # the fp8 tensor cores, x quantized per token (W8A8)
                times["fp8_dot"] = time_calls(lambda w: skinny.fp8_gemv(x, w[0], w[1].squeeze(1)), fp8)
            weight_bytes = {"bf16": n * k * 2, "fp8": n * k, "fp8_dot": n * k, "int4": n * k // 2 + 2 * n * (k // GROUP_SIZE) * 2}
            row = {"shape": name, "n": n, "k": k, "m": m}
            for kind, ms in times.items():
                row[f"{kind}_ms"] = round(ms, 4)
                row[f"{kind}_tb_s"] = round(weight_bytes[kind] / ms / 1e9, 3)
            row["fp8_over_bf16"] = round(times["bf16"] / times["fp8"], 2)
            row["int4_over_bf16"] = round(times["bf16"] / times["int4"], 2)
            if "fp8_dot" in times:
                row["fp8_dot_over_bf16"] = round(times["bf16"] / times["fp8_dot"], 2)
            sweeps = [kind for kind in args.sweep.split(",") if kind]
            if sweeps:
                dequantized_fp8 = fp8[0][0].float() * fp8[0][1]
                if m <= skinny.MAX_ROWS and "fp8" in sweeps:
                    reference = x.float() @ dequantized_fp8.t()
                    row["fp8_configs"] = sweep("fp8", x, [(w, s.squeeze(1)) for w, s in fp8], reference, FP8_CONFIGS)
                if m <= 128 and "fp8_dot" in sweeps:  # x quantized to fp8 in the reference too
                    x_fp8, x_scale = quantize_fp8_rows(x.float())
                    reference = (x_fp8.float() * x_scale) @ dequantized_fp8.t()
                    row["fp8_dot_configs"] = sweep("fp8_dot", x, [(w, s.squeeze(1)) for w, s in fp8], reference, FP8_DOT_CONFIGS)
                if m <= w4a16.GEMV_MAX_ROWS and "int4" in sweeps:
                    reference = x.float() @ dequantize_int4(loaded, scales, zeros, GROUP_SIZE).float().t()
                    row["int4_configs"] = sweep("int4", x, int4, reference, GEMV_CONFIGS)
                for kind in ("fp8", "fp8_dot", "int4"):
                    timed = {c: t for c, t in row.get(f"{kind}_configs", {}).items() if isinstance(t, float)}
                    if timed:
                        best = min(timed, key=timed.get)
                        row[f"{kind}_best"], row[f"{kind}_best_tb_s"] = best, round(weight_bytes[kind] / timed[best] / 1e9, 3)
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        del dense, fp8, int4
    overall = {}
    for kind in ("fp8", "fp8_dot", "int4"):
        for m in {r["m"] for r in results if f"{kind}_configs" in r}:
            rows = [r for r in results if r["m"] == m and f"{kind}_configs" in r]
            common = set.intersection(*({c for c, t in r[f"{kind}_configs"].items() if isinstance(t, float)} for r in rows))
            if common:  # the one config best over every shape together (sum of times)
                best = min(common, key=lambda c: sum(r[f"{kind}_configs"][c] for r in rows))
                overall[f"{kind}_m{m}"] = {"config": best, "ms_sum": round(sum(r[f"{kind}_configs"][best] for r in rows), 4),
                                           "per_shape_best_ms_sum": round(sum(min(t for t in r[f"{kind}_configs"].values() if isinstance(t, float)) for r in rows), 4)}
                print(f"{kind} m={m}: best overall {overall[f'{kind}_m{m}']}", file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "quantized_linear", "device": torch.cuda.get_device_name(), "results": results, "best_overall": overall}))


if __name__ == "__main__":
    main()

"""Instructions per weight in a few-row linear kernel's K loop, compiled for an H100 (sm_90) here,
with no GPU: Triton compiles the kernel for that target (pointers and strides divisible by 16, as the
launcher specialises them), cuobjdump (shipped with Triton) disassembles it, and the SASS between the
K loop's label and its backward branch is counted. A decode step's linears are bound by these counts
where they exceed what streaming the weight allows (about 128 thread-instructions a clock per SM
against the weights a clock per SM that the bandwidth delivers). Prints one JSON line per kernel.

    python bench/sass.py int4_gemv 8,4,4,1 8,4,4,2      # (BLOCK_N, CHUNKS, num_warps, TILES)
    python bench/sass.py fp8_gemv 1,64,256,4,4          # (rows, BLOCK_N, BLOCK_K, num_warps, num_stages)
    python bench/sass.py skinny 1,2,2048,4 fp8:1,4,2048,4   # (rows, BLOCK_N, BLOCK_K, num_warps); fp8: weights
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tgi_server.kernels import skinny, w4a16

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
TARGET = GPUTarget("cuda", 90, 128)


def compile_sass(fn, signature: dict, constants: dict, options: dict) -> list[str]:
    pointers_and_ints = [i for i, kind in enumerate(signature.values()) if kind != "constexpr" and kind != "fp32"]
    attrs = {(i,): [["tt.divisibility", 16]] for i in pointers_and_ints}
    kernel = triton.compile(ASTSource(fn, signature, constants, attrs=attrs), target=TARGET, options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        return subprocess.run([CUOBJDUMP, "-sass", cubin.name], capture_output=True, text=True, check=True).stdout.splitlines()


def k_loop(lines: list[str]) -> list[str]:
    """Opcodes of the last loop in the SASS (the K loop: the last backward branch and its target)."""
    address = lambda line: int(m.group(1), 16) if (m := re.search(r"/\*([0-9a-f]{4,})\*/", line)) else None  # noqa: E731
    loop = None
    for i, line in enumerate(lines):
        branch = re.search(r"\bBRA\s+(?:!?U?P\w+,\s*)?0x([0-9a-f]+)", line)
        if branch and address(line) is not None and int(branch.group(1), 16) < address(line):
            start = next(j for j, other in enumerate(lines) if address(other) == int(branch.group(1), 16))
            loop = (start, i)
    assert loop is not None, "no backward branch"
    opcodes = [re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line) for line in lines[loop[0]:loop[1] + 1]]
    return [m.group(1) for m in opcodes if m]


def int4_gemv(block_n: int, chunks: int, num_warps: int, tiles: int) -> tuple[list[str], int, int]:
    names = ["x_ptr", "qweight_ptr", "scales_ptr", "zeros_ptr", "bias_ptr", "y_ptr", "N", "K", "group_size",
             "stride_x", "stride_q", "stride_s", "stride_z", "stride_y"]
    kinds = ["*bf16", "*i32", "*bf16", "*bf16", "*bf16", "*bf16"] + ["i32"] * 8
    constants = {"HAS_BIAS": False, "BLOCK_N": block_n, "CHUNKS": chunks, "TILES": tiles, "PDL": False}
    signature = dict(zip(names, kinds)) | dict.fromkeys(constants, "constexpr")
    lines = compile_sass(w4a16._int4_gemv_kernel, signature, constants, {"num_warps": num_warps})
    return lines, block_n * tiles * chunks * 128, num_warps


def fp8_gemv(rows: int, block_n: int, block_k: int, num_warps: int, num_stages: int) -> tuple[list[str], int, int]:
    names = ["x_ptr", "x_scale_ptr", "w_ptr", "w_scale_ptr", "bias_ptr", "y_ptr", "M", "N", "K", "stride_x", "stride_w",
             "stride_y", "fp8_max"]
    kinds = ["*bf16" if rows == 1 else "*fp8e4nv", "*fp32", "*fp8e4nv", "*fp32", "*bf16", "*bf16"] + ["i32"] * 6 + ["fp32"]
    constants = {"QUANTIZE_X": rows == 1, "HAS_BIAS": False, "EVEN_K": True, "BLOCK_M": max(triton.next_power_of_2(rows), 16),
                 "BLOCK_N": block_n, "BLOCK_K": block_k, "PDL": False}
    signature = dict(zip(names, kinds)) | dict.fromkeys(constants, "constexpr")
    lines = compile_sass(skinny._fp8_dot_kernel, signature, constants, {"num_warps": num_warps, "num_stages": num_stages})
    return lines, block_n * block_k, num_warps


def skinny_linear(rows: int, block_n: int, block_k: int, num_warps: int, fp8: bool = False) -> tuple[list[str], int, int]:
    names = ["x_ptr", "w_ptr", "w_scale_ptr", "bias_ptr", "y_ptr", "M", "N", "K", "stride_x", "stride_w", "stride_y"]
    kinds = ["*bf16", "*fp8e4nv" if fp8 else "*bf16", "*fp32", "*bf16", "*bf16"] + ["i32"] * 6
    constants = {"HAS_SCALE": fp8, "HAS_BIAS": False, "EVEN_K": True, "BLOCK_M": triton.next_power_of_2(rows),
                 "BLOCK_N": block_n, "BLOCK_K": block_k, "PDL": False}
    signature = dict(zip(names, kinds)) | dict.fromkeys(constants, "constexpr")
    lines = compile_sass(skinny._skinny_linear_kernel, signature, constants, {"num_warps": num_warps})
    return lines, block_n * block_k, num_warps


def main() -> None:
    kernel, configs = sys.argv[1], sys.argv[2:]
    for config in configs:
        fp8 = config.startswith("fp8:")
        values = [int(v) for v in config.removeprefix("fp8:").split(",")]
        if kernel == "int4_gemv":
            lines, weights, warps = int4_gemv(*values)
        elif kernel == "fp8_gemv":
            lines, weights, warps = fp8_gemv(*values)
        elif kernel == "skinny":
            lines, weights, warps = skinny_linear(*values, fp8=fp8)
        else:
            raise SystemExit(f"unknown kernel {kernel!r}: int4_gemv, fp8_gemv or skinny")
        opcodes = k_loop(lines)
        per_weight = len(opcodes) * 32 * warps / weights  # the loop's instructions, for every thread, per weight it reads
        counts = collections.Counter(op.split(".")[0] for op in opcodes).most_common(8)
        print(json.dumps({"kernel": kernel, "config": config, "target": "sm_90", "loop_instructions": len(opcodes),
                          "weights_per_iteration": weights, "instructions_per_weight": round(per_weight, 2),
                          "top_opcodes": dict(counts)}))


if __name__ == "__main__":
    main()

"""Does programmatic dependent launch (PDL, Hopper) pay for a decode step's chain of small kernels?

A decode layer is a chain of short kernels, each waiting for the one before to finish and for its own
launch. With PDL, a kernel launched with `launch_pdl=True` may start while the previous one still
runs: its programs load what does not depend on that kernel (a linear's weight tile, a norm's weight)
and only then wait (`gdc_wait`) for the previous kernel's results. This measures a chain like a decode
step's, `layers` x (RMSNorm -> matrix-vector product with its own weight, 8B-sized), captured in a
CUDA graph with and without PDL (same kernels, same math, results compared bitwise), over weights
larger than the L2 cache. Prints one JSON object.

    python bench/pdl.py --layers 64
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from bench_common import replay_ms


@triton.jit
def _norm_kernel(x_ptr, w_ptr, y_ptr, K, eps, PDL: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # the norm's weight: no dependency
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.rsqrt(tl.sum(x * x, 0) / K + eps)
    tl.store(y_ptr + cols, (x * scale * w).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y = W x for BLOCK_N rows of W [N, K] (K a multiple of BLOCK_K); the first weight tile is read
    before waiting for the kernel that writes x."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    row_valid = rows < N
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :]
    w = tl.load(w_ptrs, mask=row_valid[:, None], other=0.0)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        w_next = tl.load(w_ptrs + k + BLOCK_K, mask=row_valid[:, None] & (k + BLOCK_K + cols[None, :] < K), other=0.0)
        x = tl.load(x_ptr + k + cols).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
        w = w_next
    tl.store(y_ptr + rows, tl.sum(acc, 1).to(y_ptr.dtype.element_ty), mask=row_valid)


def chain(x, layers, pdl: bool, block_k: int):
    """x -> norm -> W_0 x -> norm -> W_1 ... (each product's N is the next one's K)."""
    for norm_weight, weight in layers:
        n, k = weight.shape
        normed = torch.empty_like(x)
        _norm_kernel[(1,)](x, norm_weight, normed, k, 1e-5, PDL=pdl, BLOCK=triton.next_power_of_2(k), launch_pdl=pdl)
        y = torch.empty(n, dtype=x.dtype, device=x.device)
        _gemv_kernel[(triton.cdiv(n, 2),)](normed, weight, y, n, k, PDL=pdl, BLOCK_N=2, BLOCK_K=block_k,
                                           num_warps=4, launch_pdl=pdl)
        x = y
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=64)
    parser.add_argument("--shapes", default="6144x4096,4096x6144,14336x4096,4096x14336",
                        help="N x K of the products, cycled; each N the next one's K")
    parser.add_argument("--block-k", type=int, default=1024)
    args = parser.parse_args()
    device = torch.device("cuda")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    generator = torch.Generator(device=device).manual_seed(0)
    layers = []
    for i in range(args.layers):
        n, k = shapes[i % len(shapes)]
        layers.append((torch.rand(k, device=device, generator=generator).to(torch.bfloat16),
                       (torch.rand(n, k, device=device, generator=generator) - 0.5).to(torch.bfloat16)))
    if any(a[0] != b[1] for a, b in zip(shapes, shapes[1:] + shapes[:1])):
        parser.error("each product's N must be the next one's K (and the last's the first's)")
    x = torch.randn(shapes[0][1], device=device, generator=generator).to(torch.bfloat16)
    nbytes = sum(w.numel() * 2 for _, w in layers)
    results = {}
    outputs = {}
    for pdl in (False, True):
        outputs[pdl] = chain(x, layers, pdl, args.block_k).clone()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            for _ in range(2):
                chain(x, layers, pdl, args.block_k)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain(x, layers, pdl, args.block_k)
        ms = sorted(replay_ms(graph, 20) for _ in range(5))[2]
        results["pdl" if pdl else "plain"] = {"graph_replay_ms": round(ms, 4), "tb_s": round(nbytes / ms / 1e9, 3),
                                              "us_per_layer": round(ms * 1000 / args.layers, 2)}
    results["same_output"] = bool(torch.equal(outputs[False], outputs[True]))
    results["speedup"] = round(results["plain"]["graph_replay_ms"] / results["pdl"]["graph_replay_ms"], 3)
    print(json.dumps({"benchmark": "pdl", "device": torch.cuda.get_device_name(), "layers": args.layers,
                      "shapes": args.shapes, "weight_gb": round(nbytes / 1e9, 3), "results": results}, indent=1))


if __name__ == "__main__":
    main()

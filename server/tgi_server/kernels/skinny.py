"""Linear layers for a few tokens (decode at small batch): y = x @ weight.T, read at memory speed.

With a handful of rows in x, a linear is a matrix-vector product bound by reading the weight once.
Each program streams BLOCK_N whole weight rows in BLOCK_K-wide tiles (16-byte loads along the
contiguous K axis) and multiplies every tile by all rows of x at once, accumulating in float32 tiles
that are summed over K only at the end; the output is rounded to the model dtype once, as cuBLAS
rounds. No split-K: one launch, no workspace, so it sits in a CUDA graph as is.

`skinny_linear` takes the tile sizes from `_config`, tuned on an H100 (bench/skinny_linear.py): for
one row it beats cuBLAS by 5-20% on the Llama-3.1-8B projections (2.5-3.2 TB/s against 2.0-2.8); for
two rows it merely ties, for four it loses, hence MAX_ROWS.

The same kernel reads fp8 weights (`--quantize fp8` and fp8 checkpoints): weight e4m3 [N, K] with one
float32 scale per row, applied once per output. x stays in the model dtype (weight-only fp8, W8A16):
at one row the step is bound by reading the weight, and quantizing x per token would cost launches
and precision for nothing (more rows go to the fp8 tensor cores, activations quantized per token).
Its tiles come from `_config` by the weight's bytes per element (bench/quantized_linear.py --sweep).

`fp8_gemv` is the other way for fp8 weights at a few rows, on the tensor cores (W8A8): the weight tile
is the left operand of a swapped dot ([BLOCK_N, BLOCK_K] x [BLOCK_K, rows of x padded to 16+]), so each
byte goes into wgmma as loaded, where the skinny kernel converts every weight to float32 (about six
instructions a weight in its K loop); x is quantized per token, inside the kernel for one row. Which
rows take it is FP8_DOT_MAX_ROWS, 0 (off) until measured (bench/switches.sh).

Under programmatic dependent launch (`kernels.pdl`), each program reads its first weight tile before
waiting for the kernel that writes x.

Fusing the RMSNorm before a projection into it does not pay: every program would recompute the row's
scale, and with ~2 weight rows per program that re-reads x from L2 thousands of times (measured: one
stream's decode step 6.03 ms fused against 5.73 ms unfused).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tgi_server.kernels import pdl
from tgi_server.kernels.fused import fp8_row_scale, quantize_fp8_rows, to_e4m3
from tgi_server.kernels.pdl import launch_next, wait_for_previous, wait_previous
from tgi_server.quantization import FP8_MAX

# Rows of x up to which `layers.linear.linear` uses the skinny kernel instead of cuBLAS.
MAX_ROWS = 1


@triton.jit
def _skinny_linear_kernel(
    x_ptr, w_ptr, w_scale_ptr, bias_ptr, y_ptr,
    M, N, K, stride_x, stride_w, stride_y,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    """EVEN_K: K a multiple of BLOCK_K, so the K loop needs no masks (a ragged N tile's last rows, and
    the padding rows of x, repeat the last real row instead of masking every load). The first K tile
    of the weight is read before waiting for the previous kernel (PDL): no kernel writes weights."""
    launch_next(PDL)
    rows_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    mask_n = rows_n < N
    mask_m = rows_m < M
    w_ptrs = w_ptr + tl.minimum(rows_n, N - 1)[:, None].to(tl.int64) * stride_w + cols[None, :]  # [BLOCK_N, BLOCK_K]
    x_ptrs = x_ptr + tl.minimum(rows_m, M - 1)[:, None] * stride_x + cols[None, :]  # [BLOCK_M, BLOCK_K]
    w = _k_tile(w_ptrs, 0, cols, K, EVEN_K)
    wait_previous(PDL)
    x = _k_tile(x_ptrs, 0, cols, K, EVEN_K)
    acc = x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    for k in range(BLOCK_K, K, BLOCK_K):
        w = _k_tile(w_ptrs, k, cols, K, EVEN_K)
        x = _k_tile(x_ptrs, k, cols, K, EVEN_K)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    y = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]
    if HAS_SCALE:  # fp8 weight: one float32 scale per weight row
        y *= tl.load(w_scale_ptr + rows_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows_m[:, None] * stride_y + rows_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _k_tile(ptrs, k, cols, K, EVEN_K: tl.constexpr):
    """The [rows, BLOCK_K] tile at K offset k of `ptrs`, zeros past K (no masks when EVEN_K)."""
    if EVEN_K:
        tile = tl.load(ptrs + k)
    else:
        tile = tl.load(ptrs + k, mask=(k + cols)[None, :] < K, other=0.0)
    return tile


def _config(m: int, n: int, k: int, weight_bytes: int = 2) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for an [m, k] x [n, k]^T product. 2-byte weights: 2048-wide tiles
    of 2 rows measured best (or within 1%) for one row on every 8B shape; more rows shrink the tile to
    keep the accumulator in registers. 1-byte (fp8) weights: FP8_CONFIG."""
    block_m = triton.next_power_of_2(m)
    if weight_bytes == 1:
        block_n, block_k, num_warps = FP8_CONFIG
        return block_n, max(block_k // block_m, 128), num_warps
    return 2, max(2048 // block_m, 128), 4


# (BLOCK_N, BLOCK_K, num_warps) for one row of x against an fp8 weight: the best single config over the
# 8B's four projections on an H100 (bench/quantized_linear.py --rows 1 --sweep, 2026-12-07): their
# times sum to 0.105 ms against the bf16 kernel's 0.152 (1.45x).
FP8_CONFIG = (4, 2048, 4)


def skinny_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    config: tuple[int, int, int] | None = None, weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS or any M, slower), weight [N, K] (K contiguous) -> [M, N] in x's dtype:
    x @ weight.T (+ bias). With weight_scale ([N] float32), weight is e4m3 and each of its rows is
    multiplied by its scale: x @ (weight * weight_scale[:, None]).T (+ bias)."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and weight.stride(1) == 1 and x.stride(1) == 1
    if weight_scale is not None:
        assert weight_scale.numel() == n and weight_scale.is_contiguous() and weight_scale.dtype == torch.float32
    block_n, block_k, num_warps = config or _config(m, n, k, weight.element_size())
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    _skinny_linear_kernel[(triton.cdiv(n, block_n),)](
        x, weight, weight_scale if weight_scale is not None else weight, bias if bias is not None else weight, y,
        m, n, k, x.stride(0), weight.stride(0), y.stride(0),
        HAS_SCALE=weight_scale is not None, HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0,
        BLOCK_M=max(triton.next_power_of_2(m), 1), BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, **pdl.options(x),
    )
    return y


@triton.jit
def _fp8_dot_kernel(
    x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_y, fp8_max,
    QUANTIZE_X: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    """y = x . w_n for the M rows of x and BLOCK_N fp8 weight rows n, on the fp8 tensor cores (W8A8),
    swapped so that the weight tile is the dot's left operand [BLOCK_N, BLOCK_K] and x the right one
    [BLOCK_K, BLOCK_M] (BLOCK_M >= 16): every weight byte goes into the tensor cores as loaded.

    x is e4m3 with a float32 scale per row, or with QUANTIZE_X (one row, in the model dtype) quantized
    here: its scale from its absolute maximum over K (a first pass, from L2), then tile by tile,
    each tile repeated over the BLOCK_M columns. Rows of x past M repeat row M - 1, weight rows past
    N repeat row N - 1."""
    wait_for_previous(PDL)
    rows_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    if QUANTIZE_X:  # a wide first pass: each step waits for its loads from L2
        x_scale = fp8_row_scale(x_ptr, K, fp8_max, 4096)
    else:
        x_scale = tl.load(x_scale_ptr + tl.minimum(rows_m, M - 1))[None, :]
    w_ptrs = w_ptr + tl.minimum(rows_n, N - 1)[:, None].to(tl.int64) * stride_w + cols[None, :]  # [BLOCK_N, BLOCK_K]
    x_ptrs = x_ptr + tl.minimum(rows_m, M - 1)[None, :] * stride_x + cols[:, None]  # [BLOCK_K, BLOCK_M]
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs + k)
        else:
            w = tl.load(w_ptrs + k, mask=(k + cols)[None, :] < K, other=0.0)
        if QUANTIZE_X:
            x = tl.load(x_ptr + k + cols, mask=k + cols < K, other=0.0)
            x = tl.broadcast_to(to_e4m3(x.to(tl.float32), x_scale, fp8_max)[:, None], [BLOCK_K, BLOCK_M])
        elif EVEN_K:
            x = tl.load(x_ptrs + k)
        else:
            x = tl.load(x_ptrs + k, mask=(k + cols)[:, None] < K, other=0.0)
        acc = tl.dot(w, x, acc)
    mask_n = rows_n < N
    y = acc * (tl.load(w_scale_ptr + rows_n, mask=mask_n, other=0.0)[:, None] * x_scale)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + rows_m[None, :] * stride_y + rows_n[:, None], y.to(y_ptr.dtype.element_ty),
             mask=mask_n[:, None] & (rows_m < M)[None, :])


# Rows of x up to which an fp8 weight goes through `fp8_gemv` (the tensor cores, x quantized per
# token); 0: one row through the skinny kernel (W8A16) and more through `torch._scaled_mm`.
FP8_DOT_MAX_ROWS = 0
# (BLOCK_N, BLOCK_K, num_warps, num_stages) of `fp8_gemv`; BLOCK_N of 64 takes Hopper's wgmma. Unswept.
FP8_DOT_CONFIG = (64, 256, 4, 4)


def fp8_gemv(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """x [M, K] @ (weight * weight_scale[:, None]).T (+ bias) with x quantized to fp8 per token, as
    `ops.portable.linear` computes an fp8 linear; weight e4m3 [N, K], weight_scale [N] float32. One row
    is quantized inside the kernel; more rows first, by `fused.quantize_fp8_rows`."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and weight.stride(1) == 1 and x.stride(1) == 1
    assert weight_scale.numel() == n and weight_scale.is_contiguous() and weight_scale.dtype == torch.float32
    block_n, block_k, num_warps, num_stages = config or FP8_DOT_CONFIG
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    x_scale = x  # unused for one row
    if m > 1:
        x, x_scale = quantize_fp8_rows(x)
    _fp8_dot_kernel[(triton.cdiv(n, block_n),)](
        x, x_scale, weight, weight_scale, bias if bias is not None else weight, y, m, n, k,
        x.stride(0), weight.stride(0), y.stride(0), FP8_MAX,
        QUANTIZE_X=m == 1, HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0,
        BLOCK_M=max(triton.next_power_of_2(m), 16), BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages, **pdl.options(x),
    )
    return y

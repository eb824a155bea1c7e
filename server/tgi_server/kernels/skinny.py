"""Linear layers for a few tokens (decode at small batch): y = x @ weight.T, read at memory speed.

With a handful of rows in x, a linear is a matrix-vector product bound by reading the weight once.
Each program streams BLOCK_N whole weight rows in BLOCK_K-wide tiles (16-byte loads along the
contiguous K axis) and multiplies every tile by all rows of x at once, accumulating in float32 tiles
that are summed over K only at the end; the output is rounded to the model dtype once, as cuBLAS
rounds. No split-K: one launch, no workspace, so it sits in a CUDA graph as is.

`skinny_linear` takes the tile sizes from `_config`, tuned on an H100 (bench/skinny_linear.py): for
one row it beats cuBLAS by 5-20% on the Llama-3.1-8B projections (2.5-3.2 TB/s against 2.0-2.8); for
two rows it merely ties, for four it loses, hence MAX_ROWS.

`skinny_fp8_linear` is the same kernel for `--quantize fp8`: weight e4m3 [N, K] with one float32 scale
per row, x already quantized per row (`quantization.quantize_fp8_rows`); the e4m3 products are exact in
float32, so it computes the portable fp8 `linear` up to summation order. Its tiles are not tuned yet.

Fusing the RMSNorm before a projection into it does not pay: every program would recompute the row's
scale, and with ~2 weight rows per program that re-reads x from L2 thousands of times (measured: one
stream's decode step 6.03 ms fused against 5.73 ms unfused).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Rows of x up to which `layers.linear.linear` uses the skinny kernel instead of cuBLAS.
MAX_ROWS = 1


@triton.jit
def _skinny_linear_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    M, N, K, stride_x, stride_w, stride_y,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    mask_n = rows_n < N
    mask_m = rows_m < M
    w_ptrs = w_ptr + rows_n[:, None].to(tl.int64) * stride_w + cols[None, :]  # [BLOCK_N, BLOCK_K]
    x_ptrs = x_ptr + rows_m[:, None] * stride_x + cols[None, :]  # [BLOCK_M, BLOCK_K]
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        mask_k = (k + cols) < K
        w = tl.load(w_ptrs + k, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        x = tl.load(x_ptrs + k, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    y = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows_m[:, None] * stride_y + rows_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _config(m: int, n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for an [m, k] x [n, k]^T product: 2048-wide tiles of 2 rows
    measured best (or within 1%) for one row on every 8B shape; more rows shrink the tile to keep the
    accumulator in registers."""
    block_m = triton.next_power_of_2(m)
    return 2, max(2048 // block_m, 128), 4


def skinny_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS or any M, slower), weight [N, K] (K contiguous) -> [M, N] in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and weight.stride(1) == 1 and x.stride(1) == 1
    block_n, block_k, num_warps = config or _config(m, n, k)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _skinny_linear_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, y,
        m, n, k, x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=max(triton.next_power_of_2(m), 1), BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return y


@triton.jit
def _skinny_fp8_linear_kernel(
    x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, y_ptr,
    M, N, K, stride_x, stride_x_scale, stride_w, stride_y,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """`_skinny_linear_kernel` on e4m3 x and weight: the sum over K of the unscaled products, then
    times x_scale[m] * w_scale[n] once per output."""
    rows_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    mask_n = rows_n < N
    mask_m = rows_m < M
    w_ptrs = w_ptr + rows_n[:, None].to(tl.int64) * stride_w + cols[None, :]  # [BLOCK_N, BLOCK_K]
    x_ptrs = x_ptr + rows_m[:, None] * stride_x + cols[None, :]  # [BLOCK_M, BLOCK_K]
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        mask_k = (k + cols) < K
        w = tl.load(w_ptrs + k, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        x = tl.load(x_ptrs + k, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    y = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]
    x_scale = tl.load(x_scale_ptr + rows_m * stride_x_scale, mask=mask_m, other=0.0)
    w_scale = tl.load(w_scale_ptr + rows_n, mask=mask_n, other=0.0)
    y = y * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows_m[:, None] * stride_y + rows_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _fp8_config(m: int, n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for the fp8 kernel. Untuned: `_config` carried over byte for byte.
    An e4m3 weight is 1 byte, so 4096-wide tiles of 2 rows read what the bf16 kernel's 2048-wide ones
    read, in as many 16-byte loads; the float32 accumulator has twice the elements, so twice the warps
    keep it at the bf16 kernel's registers per thread."""
    block_m = triton.next_power_of_2(m)
    return 2, max(4096 // block_m, 256), 8


def skinny_fp8_linear(
    x_fp8: torch.Tensor, x_scales: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """x_fp8 [M, K] e4m3 and x_scales [M, 1] (or [M]) float32, as `quantize_fp8_rows(x)` returns them;
    weight [N, K] e4m3 (K contiguous) and weight_scale [N] float32; bias [N] in any float dtype
    -> [M, N] in out_dtype (the model dtype): (x_fp8 * x_scales) @ (weight * weight_scale[:, None]).T + bias."""
    m, k = x_fp8.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and weight.stride(1) == 1 and x_fp8.stride(1) == 1
    assert x_scales.numel() == m and weight_scale.numel() == n and weight_scale.is_contiguous()
    assert x_scales.dtype == torch.float32 and weight_scale.dtype == torch.float32
    block_n, block_k, num_warps = config or _fp8_config(m, n, k)
    y = torch.empty((m, n), dtype=out_dtype, device=x_fp8.device)
    _skinny_fp8_linear_kernel[(triton.cdiv(n, block_n),)](
        x_fp8, x_scales, weight, weight_scale, bias if bias is not None else weight_scale, y,
        m, n, k, x_fp8.stride(0), x_scales.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=max(triton.next_power_of_2(m), 1), BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return y

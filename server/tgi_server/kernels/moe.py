"""Fused mixture-of-experts MLP: token-sorted grouped GEMMs in Triton, with no host sync.

Each (token, k) pair routed to an expert is a row of work. `align_pairs` sorts the pairs by expert
(on the device) and pads each expert's run to a multiple of BLOCK_M rows, so every BLOCK_M-row block
belongs to one expert; blocks past the last real one are marked with expert id `num_experts` and
return at once (the grid is an upper bound, so CUDA graphs can capture it). `_moe_gemm_kernel`
multiplies each block's rows by its expert's weight: first [gate | up] for every pair, then, after
the gated activation, the down projection scaled by the pair's routing weight; the pairs of a token
are summed last.

Same inputs and result as `tgi_server.ops.portable.fused_moe`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tgi_server.kernels.fused import gated_activation

BLOCK_N = 64
BLOCK_K = 64


def _block_m(num_pairs: int) -> int:
    """Rows per block: few pairs (decode) waste less padding in small blocks; many fill big ones."""
    return 16 if num_pairs <= 256 else 64


def align_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_pairs [max_rows] int32: pair index token * top_k + k per row, num_pairs for padding;
    block_experts [max_blocks] int32: each block's expert, num_experts past the last block).

    Fixed sizes from the shapes alone (max_rows = num_pairs + num_experts * (block_m - 1), rounded
    up to blocks), computed with device ops only.
    """
    device = topk_ids.device
    flat = topk_ids.flatten().to(torch.int64)  # [num_pairs]
    num_pairs = flat.shape[0]
    max_blocks = triton.cdiv(num_pairs, block_m) + num_experts
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m  # [num_experts]
    padded_end = padded.cumsum(0)
    padded_start = padded_end - padded
    run_start = counts.cumsum(0) - counts  # each expert's first row among the sorted pairs
    order = torch.sort(flat, stable=True).indices  # [num_pairs]: pair indices, grouped by expert
    experts = flat[order]
    rows = padded_start[experts] + torch.arange(num_pairs, device=device) - run_start[experts]
    sorted_pairs = torch.full((max_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs[rows] = order.to(torch.int32)
    block_starts = torch.arange(max_blocks, device=device) * block_m
    block_experts = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)  # num_experts past the end
    return sorted_pairs, block_experts


@triton.jit
def _moe_gemm_kernel(
    a_ptr, b_ptr, c_ptr, routing_ptr, sorted_pairs_ptr, block_experts_ptr,
    num_pairs, num_experts, N, K,
    stride_am, stride_be, stride_bn, stride_cm,
    PAIRS_PER_A_ROW: tl.constexpr, SCALE_BY_ROUTING: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """c[pair, n] = a[pair // PAIRS_PER_A_ROW, :] . b[expert, n, :] (times the pair's routing weight)
    for the BLOCK_M pairs of block program_id(0) and the BLOCK_N columns of program_id(1)."""
    block = tl.program_id(0)
    expert = tl.load(block_experts_ptr + block)
    if expert >= num_experts:
        return
    pairs = tl.load(sorted_pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    row_valid = pairs < num_pairs
    a_rows = (pairs // PAIRS_PER_A_ROW).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    b_base = b_ptr + expert.to(tl.int64) * stride_be + cols[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_valid = (k0 + offs_k) < K
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + (k0 + offs_k)[None, :],
                    mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        b = tl.load(b_base + (k0 + offs_k)[:, None], mask=k_valid[:, None] & col_valid[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    if SCALE_BY_ROUTING:
        acc = acc.to(c_ptr.dtype.element_ty).to(tl.float32)  # the expert's output rounds first, as the reference's
        acc = acc * tl.load(routing_ptr + pairs, mask=row_valid, other=0.0)[:, None]
    tl.store(c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=row_valid[:, None] & col_valid[None, :])


def _grouped_gemm(a, weight, out, routing, sorted_pairs, block_experts, num_pairs, pairs_per_a_row, block_m):
    num_experts, n, k = weight.shape
    grid = (block_experts.shape[0], triton.cdiv(n, BLOCK_N))
    _moe_gemm_kernel[grid](
        a, weight, out, routing, sorted_pairs, block_experts, num_pairs, num_experts, n, k,
        a.stride(0), weight.stride(0), weight.stride(1), out.stride(0),
        PAIRS_PER_A_ROW=pairs_per_a_row, SCALE_BY_ROUTING=routing is not None, IEEE=a.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden[t]) for each token t.

    hidden [num_tokens, hidden_size]; w13 [num_experts, 2 * width, hidden_size] ([gate | up] rows);
    w2 [num_experts, hidden_size, width]; topk_weights [num_tokens, top_k] float32; topk_ids
    [num_tokens, top_k] int. Returns [num_tokens, hidden_size] in hidden's dtype (this rank's partial
    sum when the experts' width is split across ranks).
    """
    num_tokens, top_k = topk_ids.shape
    num_pairs = num_tokens * top_k
    block_m = _block_m(num_pairs)
    sorted_pairs, block_experts = align_pairs(topk_ids, w13.shape[0], block_m)
    gate_up = torch.empty(num_pairs, w13.shape[1], dtype=hidden.dtype, device=hidden.device)  # [num_pairs, 2 * width]
    _grouped_gemm(hidden, w13, gate_up, None, sorted_pairs, block_experts, num_pairs, top_k, block_m)
    activated = gated_activation(gate_up, activation)  # [num_pairs, width]
    out = torch.empty(num_pairs, w2.shape[1], dtype=hidden.dtype, device=hidden.device)  # [num_pairs, hidden_size]
    routing = topk_weights.to(torch.float32).contiguous().view(-1)
    _grouped_gemm(activated, w2, out, routing, sorted_pairs, block_experts, num_pairs, 1, block_m)
    return out.view(num_tokens, top_k, -1).sum(dim=1)

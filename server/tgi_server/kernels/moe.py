"""Fused mixture-of-experts MLP in Triton, with no host sync: the router's top-k in one kernel, then
either one matrix-vector product per (token, expert) pair (a few tokens: decode) or token-sorted
grouped GEMMs (many tokens: prefill and large batches).

Few tokens: `_route_kernel` takes each token's softmax top-k. `_gate_up_gemv_kernel` streams the
gate and up rows of each pair's expert (as `kernels.skinny` streams a dense weight) and applies the
gated activation before it stores; `_down_gemv_kernel` sums, per token, its experts' down
projections scaled by their routing weights. Three launches per layer, each reading only the chosen
experts' weights; nothing is sorted.

Many tokens: each (token, k) pair routed to an expert is a row of work. `align_pairs` sorts the pairs by expert
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

from tgi_server.kernels import pdl
from tgi_server.kernels.fused import ACTIVATIONS, gate_times_up, gated_activation
from tgi_server.kernels.pdl import wait_for_previous

# (BLOCK_N, BLOCK_K, num_warps) of the matrix-vector kernels, the best or within 5% of it on an H100
# for Qwen3-30B-A3B's and Mixtral-8x7B's experts at 1-8 tokens (bench/moe_decode.py,
# bench/results/2026-12-06-h100-moe-decode.json).
GATE_UP_GEMV_ONE_TOKEN = (2, 1024, 4)
GATE_UP_GEMV = (4, 256, 4)
# ... and of the down projection, the last field choosing `_down_gemv_all_experts_kernel` (True) or
# the loop over experts (False): side by side, one row a program, for Qwen3-30B-A3B's 8 experts a
# token (40.0 -> 33.3 us for both kernels at one token, 64.2 -> 55.9 at two, 107.1 -> 100.8 at four;
# bench/results/2026-12-07-h100-moe-down-kernel.json); the loop for Mixtral's 2 (measured best there
# before the side-by-side kernel existed, which was not measured on it).
DOWN_GEMV = (1, 128, 4, True)
DOWN_GEMV_FEW_EXPERTS = (2, 1024, 4, False)


def uses_gemv(num_tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether `fused_moe` takes the per-pair matrix-vector path: it reads an expert once per pair
    routed to it, the grouped GEMMs once per step, so it wins while pairs rarely share an expert
    (measured: up to 64 pairs of 128 experts, 4 pairs of 8), and always for one token."""
    return num_tokens * top_k <= max(num_experts // 2, top_k)


@triton.jit
def _route_kernel(
    logits_ptr, weights_ptr, ids_ptr, num_experts, stride_logits,
    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr, PDL: tl.constexpr,
):
    """Token program_id(0): softmax over its router logits in float32, the TOP_K largest in
    descending order (ties to the lower expert id), rescaled to sum to 1 when RENORMALIZE.

    Always TOP_K distinct valid experts, even for a row of NaN (a padding row of garbage): NaN
    ranks below every probability, a chosen expert below NaN, a lane past num_experts below both."""
    wait_for_previous(PDL)
    token = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    valid = experts < num_experts
    logits = tl.load(logits_ptr + token * stride_logits + experts, mask=valid, other=-float("inf")).to(tl.float32)
    exps = tl.exp(logits - tl.max(logits, 0))
    probs = exps / tl.sum(exps, 0)
    remaining = tl.where(valid, tl.where(probs == probs, probs, -1.0), -3.0)
    rank = tl.full([BLOCK_E], -1, tl.int32)  # each expert's place among the chosen, -1 if not chosen
    total = 0.0
    for k in tl.static_range(TOP_K):
        chosen = experts == tl.argmax(remaining, 0)
        rank = tl.where(chosen, k, rank)
        total += tl.sum(tl.where(chosen, probs, 0.0), 0)
        remaining = tl.where(chosen, -2.0, remaining)
    weights = probs / total if RENORMALIZE else probs
    picked = rank >= 0
    tl.store(weights_ptr + token * TOP_K + rank, weights, mask=picked)
    tl.store(ids_ptr + token * TOP_K + rank, experts, mask=picked)


def route_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [num_tokens, num_experts] -> (weights [num_tokens, top_k] float32, expert ids
    [num_tokens, top_k] int32), as `ops.portable.route_experts`."""
    num_tokens, num_experts = router_logits.shape
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=router_logits.device)
    if num_tokens:
        _route_kernel[(num_tokens,)](
            router_logits, weights, ids, num_experts, router_logits.stride(0),
            TOP_K=top_k, RENORMALIZE=renormalize, BLOCK_E=triton.next_power_of_2(num_experts),
            **pdl.options(router_logits),
        )
    return weights, ids


@triton.jit
def _gate_up_gemv_kernel(
    x_ptr, w_ptr, ids_ptr, out_ptr, width, K, stride_x, stride_we, stride_wn, stride_out,
    TOP_K: tl.constexpr, GELU_TANH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    """out[pair, n] = act(gate_n . x) * (up_n . x) for BLOCK_N columns n of pair program_id(0),
    x its token's row and gate_n, up_n rows n and width + n of its expert's w13."""
    wait_for_previous(PDL)
    pair = tl.program_id(0)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid = rows < width
    cols = tl.arange(0, BLOCK_K)
    gate_ptrs = w_ptr + expert * stride_we + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]  # [BLOCK_N, BLOCK_K]
    up_ptrs = gate_ptrs + width * stride_wn
    x_ptrs = x_ptr + (pair // TOP_K).to(tl.int64) * stride_x + cols
    acc_gate = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_valid = (k + cols) < K
        mask = row_valid[:, None] & k_valid[None, :]
        x = tl.load(x_ptrs + k, mask=k_valid, other=0.0).to(tl.float32)[None, :]
        acc_gate += tl.load(gate_ptrs + k, mask=mask, other=0.0).to(tl.float32) * x
        acc_up += tl.load(up_ptrs + k, mask=mask, other=0.0).to(tl.float32) * x
    dtype = out_ptr.dtype.element_ty
    out = gate_times_up(tl.sum(acc_gate, 1).to(dtype), tl.sum(acc_up, 1).to(dtype), GELU_TANH)
    tl.store(out_ptr + pair.to(tl.int64) * stride_out + rows, out, mask=row_valid)


@triton.jit
def _down_gemv_kernel(
    a_ptr, w_ptr, ids_ptr, routing_ptr, out_ptr, N, K, stride_a, stride_we, stride_wn, stride_out,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    """out[token, n] = sum_k routing[pair] * (down_n . a[pair]) over token program_id(0)'s TOP_K
    pairs, for BLOCK_N columns n; each expert's output rounds to the model dtype, and so does its
    weighted value, before the float32 sum (as the reference's)."""
    wait_for_previous(PDL)
    token = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid = rows < N
    cols = tl.arange(0, BLOCK_K)
    dtype = out_ptr.dtype.element_ty
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        pair = token * TOP_K + k
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        w_ptrs = w_ptr + expert * stride_we + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
        a_ptrs = a_ptr + pair.to(tl.int64) * stride_a + cols
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_valid = (k0 + cols) < K
            a = tl.load(a_ptrs + k0, mask=k_valid, other=0.0).to(tl.float32)[None, :]
            acc += tl.load(w_ptrs + k0, mask=row_valid[:, None] & k_valid[None, :], other=0.0).to(tl.float32) * a
        expert_out = tl.sum(acc, 1).to(dtype).to(tl.float32)
        total += (expert_out * tl.load(routing_ptr + pair)).to(dtype).to(tl.float32)
    tl.store(out_ptr + token.to(tl.int64) * stride_out + rows, total.to(dtype), mask=row_valid)


@triton.jit
def _down_gemv_all_experts_kernel(
    a_ptr, w_ptr, ids_ptr, routing_ptr, out_ptr, N, K, stride_a, stride_we, stride_wn, stride_out,
    TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    """`_down_gemv_kernel`'s result with the token's TOP_K experts read side by side: each K tile
    loads [BLOCK_E experts, BLOCK_N rows, BLOCK_K] at once and the products reduce over K once at the
    end, so no expert waits for the previous one's reduction; the weighted outputs then sum over the
    experts (float32, as the loop's)."""
    wait_for_previous(PDL)
    token = tl.program_id(0)
    slots = tl.arange(0, BLOCK_E)
    slot_valid = slots < TOP_K
    pairs = token * TOP_K + slots  # [BLOCK_E]
    experts = tl.load(ids_ptr + pairs, mask=slot_valid, other=0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = (w_ptr + experts[:, None, None] * stride_we + rows[None, :, None].to(tl.int64) * stride_wn
              + cols[None, None, :])  # [BLOCK_E, BLOCK_N, BLOCK_K]
    a_ptrs = a_ptr + pairs[:, None].to(tl.int64) * stride_a + cols[None, :]  # [BLOCK_E, BLOCK_K]
    w_valid = slot_valid[:, None, None] & row_valid[None, :, None]
    acc = tl.zeros((BLOCK_E, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_valid = (k0 + cols) < K
        a = tl.load(a_ptrs + k0, mask=slot_valid[:, None] & k_valid[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptrs + k0, mask=w_valid & k_valid[None, None, :], other=0.0)
        acc += w.to(tl.float32) * a[:, None, :]
    dtype = out_ptr.dtype.element_ty
    expert_out = tl.sum(acc, 2).to(dtype).to(tl.float32)  # [BLOCK_E, BLOCK_N]
    routing = tl.load(routing_ptr + pairs, mask=slot_valid, other=0.0)
    weighted = (expert_out * routing[:, None]).to(dtype).to(tl.float32)
    tl.store(out_ptr + token.to(tl.int64) * stride_out + rows, tl.sum(weighted, 0).to(dtype), mask=row_valid)


def down_gemv_config(top_k: int) -> tuple[int, int, int, bool]:
    """The down projection's kernel and tiles for tokens routed to `top_k` experts each."""
    return DOWN_GEMV if top_k >= 4 else DOWN_GEMV_FEW_EXPERTS


def _gemv_experts(hidden, w13, w2, routing, topk_ids, activation, gate_up_config=None, down_config=None):
    """fused_moe for a few tokens: one program row per (token, k) pair, then per token."""
    num_tokens, top_k = topk_ids.shape
    width, hidden_size = w13.shape[1] // 2, w13.shape[2]
    ids = topk_ids.to(torch.int32).contiguous().view(-1)
    block_n, block_k, warps = gate_up_config or (GATE_UP_GEMV_ONE_TOKEN if num_tokens == 1 else GATE_UP_GEMV)
    activated = torch.empty(num_tokens * top_k, width, dtype=hidden.dtype, device=hidden.device)
    launch = pdl.options(hidden)
    _gate_up_gemv_kernel[(num_tokens * top_k, triton.cdiv(width, block_n))](
        hidden, w13, ids, activated, width, hidden_size, hidden.stride(0), w13.stride(0), w13.stride(1),
        activated.stride(0), TOP_K=top_k, GELU_TANH=activation == "gelu_tanh", BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, **launch,
    )
    block_n, block_k, warps, all_experts = down_config or down_gemv_config(top_k)
    out = torch.empty(num_tokens, hidden_size, dtype=hidden.dtype, device=hidden.device)
    args = (activated, w2, ids, routing, out, hidden_size, width, activated.stride(0), w2.stride(0), w2.stride(1),
            out.stride(0))
    grid = (num_tokens, triton.cdiv(hidden_size, block_n))
    if all_experts:
        _down_gemv_all_experts_kernel[grid](*args, TOP_K=top_k, BLOCK_E=triton.next_power_of_2(top_k), BLOCK_N=block_n,
                                            BLOCK_K=block_k, num_warps=warps, **launch)
    else:
        _down_gemv_kernel[grid](*args, TOP_K=top_k, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, **launch)
    return out


def _grouped_config(num_pairs: int, num_experts: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the grouped GEMMs by the rows an expert
    gets on average: few waste less padding in 16-row blocks, many fill big tiles (the best or within
    2% of it on an H100 for Qwen3-30B-A3B and Mixtral-8x7B at 16, 128 and 1,024 tokens)."""
    rows_per_expert = num_pairs / num_experts
    if rows_per_expert <= 16:
        return 16, 128, 128, 4, 3
    if rows_per_expert <= 48:
        return 64, 64, 128, 4, 4
    return 128, 128, 64, 8, 3


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


def _grouped_gemm(a, weight, out, routing, sorted_pairs, block_experts, num_pairs, pairs_per_a_row, config):
    block_m, block_n, block_k, num_warps, num_stages = config
    num_experts, n, k = weight.shape
    grid = (block_experts.shape[0], triton.cdiv(n, block_n))
    _moe_gemm_kernel[grid](
        a, weight, out, routing, sorted_pairs, block_experts, num_pairs, num_experts, n, k,
        a.stride(0), weight.stride(0), weight.stride(1), out.stride(0),
        PAIRS_PER_A_ROW=pairs_per_a_row, SCALE_BY_ROUTING=routing is not None, IEEE=a.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
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
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    num_tokens, top_k = topk_ids.shape
    routing = topk_weights.to(torch.float32).contiguous().view(-1)
    if uses_gemv(num_tokens, top_k, w13.shape[0]):
        return _gemv_experts(hidden, w13, w2, routing, topk_ids, activation)
    return _grouped_path(hidden, w13, w2, routing, topk_ids, activation)


def _grouped_path(hidden, w13, w2, routing, topk_ids, activation, config=None):
    """fused_moe for many tokens: pairs sorted by expert, two grouped GEMMs, the sum over k."""
    num_tokens, top_k = topk_ids.shape
    num_pairs = num_tokens * top_k
    config = config or _grouped_config(num_pairs, w13.shape[0])
    sorted_pairs, block_experts = align_pairs(topk_ids, w13.shape[0], config[0])
    gate_up = torch.empty(num_pairs, w13.shape[1], dtype=hidden.dtype, device=hidden.device)  # [num_pairs, 2 * width]
    _grouped_gemm(hidden, w13, gate_up, None, sorted_pairs, block_experts, num_pairs, top_k, config)
    activated = gated_activation(gate_up, activation)  # [num_pairs, width]
    out = torch.empty(num_pairs, w2.shape[1], dtype=hidden.dtype, device=hidden.device)  # [num_pairs, hidden_size]
    _grouped_gemm(activated, w2, out, routing, sorted_pairs, block_experts, num_pairs, 1, config)
    return out.view(num_tokens, top_k, -1).sum(dim=1)

"""LoRA for a batch mixing adapters: each token through its own adapter's A and B, in two launches.

A linear's adapter stacks (`tgi_server.lora.LoraStacks`) hold, per slot, A [width, in] and B
[out, width] (width = parts x max rank, the scaling folded into B). For every token i of slot s_i:

    shrink:  t[i] = A[s_i] x[i]              (width values, float32)
    expand:  out[i] += B[s_i] t[i]

Each program takes one token and a tile of the outputs, gathering its slot's weights by the token's
slot index (BGMV: the batched gather matrix-vector products of Punica and S-LoRA), so any mix of
adapters costs the same two launches, and the slot index is a device tensor: nothing is read back to
the host, and the launches can sit in a CUDA graph. A token of slot 0 (the base model) loads no weight
and leaves its output row alone. Prompt tokens run the same per-token programs (a grouped SGMV
variant that reuses A across a run of tokens is the next step for long prompts).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, slots_ptr, t_ptr,
    K, W, stride_x, stride_a_slot, stride_a_row, stride_t,
    BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    cols = tl.arange(0, BLOCK_K)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    active = slot != 0
    mask_w = (rows < W) & active
    a_ptrs = a_ptr + slot * stride_a_slot + rows[:, None].to(tl.int64) * stride_a_row + cols[None, :]
    x_ptrs = x_ptr + token.to(tl.int64) * stride_x + cols
    acc = tl.zeros((BLOCK_W, BLOCK_K), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        mask_k = (k + cols) < K
        a = tl.load(a_ptrs + k, mask=mask_w[:, None] & mask_k[None, :], other=0.0)
        x = tl.load(x_ptrs + k, mask=mask_k & active, other=0.0)
        acc += a.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(t_ptr + token.to(tl.int64) * stride_t + rows, tl.sum(acc, axis=1), mask=rows < W)


@triton.jit
def _expand_kernel(
    t_ptr, b_ptr, slots_ptr, out_ptr,
    N, W, stride_t, stride_b_slot, stride_b_row, stride_out,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    token = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_W)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    active = slot != 0
    mask_n = (rows < N) & active
    mask_w = cols < W
    b = tl.load(b_ptr + slot * stride_b_slot + rows[:, None].to(tl.int64) * stride_b_row + cols[None, :],
                mask=mask_n[:, None] & mask_w[None, :], other=0.0)
    t = tl.load(t_ptr + token.to(tl.int64) * stride_t + cols, mask=mask_w & active, other=0.0)
    delta = tl.sum(b.to(tl.float32) * t[None, :], axis=1)
    out_ptrs = out_ptr + token.to(tl.int64) * stride_out + rows
    out = tl.load(out_ptrs, mask=mask_n, other=0.0)
    tl.store(out_ptrs, (out.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), mask=mask_n)


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor,
               out: torch.Tensor) -> torch.Tensor:
    """`out` [T, N] plus B[s] A[s] x for each row of x [T, K] with slot s = token_slots[row] (int32,
    0: nothing added); a [slots, W, K], b [slots, N, W] (K and W contiguous). Adds in place."""
    num_tokens, k = x.shape
    width, n = a.shape[1], b.shape[1]
    assert a.shape[2] == k and b.shape[2] == width and token_slots.shape[0] == num_tokens
    assert x.stride(1) == 1 and a.stride(2) == 1 and b.stride(2) == 1 and out.stride(1) == 1
    t = torch.empty((num_tokens, width), dtype=torch.float32, device=x.device)
    block_w = min(triton.next_power_of_2(width), 64)
    _shrink_kernel[(num_tokens, triton.cdiv(width, block_w))](
        x, a, token_slots, t, k, width, x.stride(0), a.stride(0), a.stride(1), t.stride(0),
        BLOCK_W=block_w, BLOCK_K=max(min(4096 // block_w, 256), 16),
    )
    block_n = 64
    _expand_kernel[(num_tokens, triton.cdiv(n, block_n))](
        t, b, token_slots, out, n, width, t.stride(0), b.stride(0), b.stride(1), out.stride(0),
        BLOCK_N=block_n, BLOCK_W=triton.next_power_of_2(width),
    )
    return out

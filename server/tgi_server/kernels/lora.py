"""LoRA for a batch mixing adapters: each token through its own adapter's A and B, in two launches.

A linear's adapter stacks (`tgi_server.lora.LoraStacks`) hold, per slot, A [width, in] and B
[out, width] (width = parts x max rank, the scaling folded into B). For every token i of slot s_i:

    shrink:  t[i] = A[s_i] x[i]              (width values, float32)
    expand:  out[i] += B[s_i] t[i]

The shrink splits `in` into SPLIT slices, one program each, and writes each slice's partial sums to
t [SPLIT, tokens, width]; the expand adds the SPLIT partials as it loads t. So even one decode token
spreads its read of A over many SMs, with no atomics and no zero-fill. Two paths, two launches each:

- per token (BGMV: the batched gather matrix-vector products of Punica and S-LoRA), for a few rows:
  a shrink program takes (token, 16 rows of A, a slice of `in`), an expand program (token, a tile of
  the outputs), each gathering its slot's weights by the token's slot index.
- grouped (SGMV), for many rows: a program takes a tile of up to TILE_ROWS rows of one slot and
  (rows of A, a slice of `in`) or (a tile of the outputs) as one `tl.dot`, so A and B are read once
  per tile instead of once per token. Where the host knows the runs of rows (`segments`) and one is
  long (a prompt), the tiles cut each run (a small table, copied to the device once per step);
  otherwise (many decode rows, in a CUDA graph) there is a tile for every pair of TILE_ROWS-row
  block and slot, taking the block's rows of that slot (none: the program loads no weight).

Either way the slot index is read on the device (nothing is read back to the host, so the launches
can sit in a CUDA graph), and a row of slot 0 (the base model) loads no weight and is left alone.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Programs that keep an H100's 132 SMs busy (four each); few tokens split `in` to reach this many.
MIN_PROGRAMS = 4 * 132
# Per token, each expand program sums SPLIT x width partials: past 32 they outweigh its tile of B.
MAX_SPLIT = 32
# Grouped, a partial is TILE_ROWS x width, so fewer splits (8 measured best at 64 decode rows).
MAX_GROUPED_SPLIT = 8
# Rows per grouped tile: the least `tl.dot` takes, so a short run wastes little of its tile
# (32 and 64 measured within 3% on an H100, better for long prompts only).
TILE_ROWS = 16
# From this many rows of unknown runs, tiles per (block, slot) beat per-token reads (an H100: 16
# rows of 8 adapters were faster per token, 64 grouped).
MIN_DEVICE_TILED_ROWS = 32


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, slots_ptr, t_ptr,
    K, W, k_per_split, stride_x, stride_a_slot, stride_a_row, stride_t_split, stride_t,
    BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    k_start = tl.program_id(2) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    cols = tl.arange(0, BLOCK_K)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    active = slot != 0
    mask_w = (rows < W) & active
    a_ptrs = a_ptr + slot * stride_a_slot + rows[:, None].to(tl.int64) * stride_a_row + cols[None, :]
    x_ptrs = x_ptr + token.to(tl.int64) * stride_x + cols
    acc = tl.zeros((BLOCK_W, BLOCK_K), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        mask_k = (k + cols) < k_end
        a = tl.load(a_ptrs + k, mask=mask_w[:, None] & mask_k[None, :], other=0.0)
        x = tl.load(x_ptrs + k, mask=mask_k & active, other=0.0)
        acc += a.to(tl.float32) * x.to(tl.float32)[None, :]
    t_ptrs = t_ptr + tl.program_id(2) * stride_t_split + token.to(tl.int64) * stride_t + rows
    tl.store(t_ptrs, tl.sum(acc, axis=1), mask=rows < W)


@triton.jit
def _expand_kernel(
    t_ptr, b_ptr, slots_ptr, out_ptr,
    N, W, num_splits, stride_t_split, stride_t, stride_b_slot, stride_b_row, stride_out,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
):
    token = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_W)
    splits = tl.arange(0, BLOCK_SPLIT)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    active = slot != 0
    mask_n = (rows < N) & active
    mask_w = cols < W
    b = tl.load(b_ptr + slot * stride_b_slot + rows[:, None].to(tl.int64) * stride_b_row + cols[None, :],
                mask=mask_n[:, None] & mask_w[None, :], other=0.0)
    partials = tl.load(t_ptr + splits[:, None] * stride_t_split + token.to(tl.int64) * stride_t + cols[None, :],
                       mask=(splits[:, None] < num_splits) & mask_w[None, :] & active, other=0.0)
    t = tl.sum(partials, axis=0)  # [BLOCK_W]: all the splits' partials loaded at once
    delta = tl.sum(b.to(tl.float32) * t[None, :], axis=1)
    out_ptrs = out_ptr + token.to(tl.int64) * stride_out + rows
    out = tl.load(out_ptrs, mask=mask_n, other=0.0)
    tl.store(out_ptrs, (out.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _tile_rows(tiles_ptr, slots_ptr, num_tokens, num_adapters, BLOCK_T: tl.constexpr, HOST_TILES: tl.constexpr):
    """(slot, rows, which rows are the tile's) of tile program_id(0): a row of the host's table
    (slot, first row, end row), or else block tile // num_adapters's rows of slot tile % num_adapters + 1."""
    tile = tl.program_id(0)
    if HOST_TILES:
        slot = tl.load(tiles_ptr + 3 * tile)
        tokens = tl.load(tiles_ptr + 3 * tile + 1) + tl.arange(0, BLOCK_T)
        mask_t = tokens < tl.load(tiles_ptr + 3 * tile + 2)
    else:
        slot = tile % num_adapters + 1
        tokens = (tile // num_adapters) * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = tl.load(slots_ptr + tokens, mask=tokens < num_tokens, other=0) == slot
    return slot.to(tl.int64), tokens, mask_t


@triton.jit
def _grouped_shrink_kernel(
    x_ptr, a_ptr, tiles_ptr, slots_ptr, t_ptr,
    num_tokens, num_adapters, K, W, k_per_split, stride_x, stride_a_slot, stride_a_row, stride_t_split, stride_t,
    BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr, HOST_TILES: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    slot, tokens, mask_t = _tile_rows(tiles_ptr, slots_ptr, num_tokens, num_adapters, BLOCK_T, HOST_TILES)
    rows = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    k_start = tl.program_id(2) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    k_end = tl.where(tl.max(mask_t.to(tl.int32)) > 0, k_end, k_start)  # a tile with no rows reads nothing
    cols = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None].to(tl.int64) * stride_x + cols[None, :]
    a_ptrs = a_ptr + slot * stride_a_slot + rows[None, :].to(tl.int64) * stride_a_row + cols[:, None]
    acc = tl.zeros((BLOCK_T, BLOCK_W), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        mask_k = (k + cols) < k_end
        x = tl.load(x_ptrs + k, mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(a_ptrs + k, mask=mask_k[:, None] & (rows < W)[None, :], other=0.0)  # [BLOCK_K, BLOCK_W]
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), a.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, a)
    t_ptrs = t_ptr + tl.program_id(2) * stride_t_split + tokens[:, None].to(tl.int64) * stride_t + rows[None, :]
    tl.store(t_ptrs, acc, mask=mask_t[:, None] & (rows < W)[None, :])


@triton.jit
def _grouped_expand_kernel(
    t_ptr, b_ptr, tiles_ptr, slots_ptr, out_ptr,
    num_tokens, num_adapters, N, W, num_splits, stride_t_split, stride_t, stride_b_slot, stride_b_row, stride_out,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, HOST_TILES: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    slot, tokens, mask_t = _tile_rows(tiles_ptr, slots_ptr, num_tokens, num_adapters, BLOCK_T, HOST_TILES)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_W)
    mask_n = (rows < N) & (tl.max(mask_t.to(tl.int32)) > 0)
    mask_w = cols < W
    t_ptrs = t_ptr + tokens[:, None].to(tl.int64) * stride_t + cols[None, :]
    t = tl.zeros((BLOCK_T, BLOCK_W), dtype=tl.float32)
    for split in range(num_splits):
        t += tl.load(t_ptrs + split * stride_t_split, mask=mask_t[:, None] & mask_w[None, :], other=0.0)
    b = tl.load(b_ptr + slot * stride_b_slot + rows[None, :].to(tl.int64) * stride_b_row + cols[:, None],
                mask=mask_w[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_W, BLOCK_N]
    t = t.to(b.dtype)  # t rounds to the weights' type, as the reference's x @ A.T does
    if DOT_F32:
        delta = tl.dot(t.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        delta = tl.dot(t, b)
    out_ptrs = out_ptr + tokens[:, None].to(tl.int64) * stride_out + rows[None, :]
    mask = mask_t[:, None] & mask_n[None, :]
    out = tl.load(out_ptrs, mask=mask, other=0.0)
    tl.store(out_ptrs, (out.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), mask=mask)


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor, out: torch.Tensor,
               segments: tuple[tuple[int, int, int], ...] | None = None) -> torch.Tensor:
    """`out` [T, N] plus B[s] A[s] x for each row of x [T, K] with slot s = token_slots[row] (int32,
    0: nothing added); a [slots, W, K], b [slots, N, W] (K and W contiguous). Adds in place.
    `segments`: (slot, first row, end row) of each adapted run where the host knows them (rows in
    none have slot 0); None: the slots are known on the device only (a CUDA graph)."""
    num_tokens, k = x.shape
    width = a.shape[1]
    assert a.shape[2] == k and b.shape[2] == width and token_slots.shape[0] == num_tokens
    assert x.stride(1) == 1 and a.stride(2) == 1 and b.stride(2) == 1 and out.stride(1) == 1
    if segments is not None and any(stop - start >= TILE_ROWS for slot, start, stop in segments if slot):
        return _grouped_delta(x, a, b, token_slots, out, _tile_table(segments, x.device))
    if num_tokens >= MIN_DEVICE_TILED_ROWS:
        return _grouped_delta(x, a, b, token_slots, out, None)
    return _per_token_delta(x, a, b, token_slots, out)


@functools.lru_cache(maxsize=4)
def _tile_table(segments: tuple[tuple[int, int, int], ...], device: torch.device) -> torch.Tensor:
    """[num_tiles, 3] int32 (slot, first row, end row): each adapted run cut into TILE_ROWS-row tiles.
    Cached, so a step's linears share one table and one copy (from pageable memory it waits for the
    stream)."""
    tiles = [(slot, row, min(row + TILE_ROWS, stop)) for slot, start, stop in segments if slot
             for row in range(start, stop, TILE_ROWS)]
    return torch.tensor(tiles, dtype=torch.int32).to(device, non_blocking=True)


def _split(num_programs: int, k: int, block_k: int, max_split: int) -> tuple[int, int]:
    """(columns of `in` per split, number of splits) for a shrink of `num_programs` programs."""
    num_k_tiles = triton.cdiv(k, block_k)
    wanted = max(min(triton.cdiv(MIN_PROGRAMS, num_programs), num_k_tiles, max_split), 1)
    tiles_per_split = triton.cdiv(num_k_tiles, wanted)
    return tiles_per_split * block_k, triton.cdiv(num_k_tiles, tiles_per_split)


def _per_token_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor,
                     out: torch.Tensor) -> torch.Tensor:
    num_tokens, k = x.shape
    width, n = a.shape[1], b.shape[1]
    block_w, block_k = 16, 128  # 16 rows of A a program: three programs share a fused q/k/v's width
    num_w_tiles = triton.cdiv(width, block_w)
    k_per_split, num_splits = _split(num_tokens * num_w_tiles, k, block_k, MAX_SPLIT)
    t = torch.empty((num_splits, num_tokens, width), dtype=torch.float32, device=x.device)  # partial sums
    _shrink_kernel[(num_tokens, num_w_tiles, num_splits)](
        x, a, token_slots, t, k, width, k_per_split, x.stride(0), a.stride(0), a.stride(1), t.stride(0), t.stride(1),
        BLOCK_W=block_w, BLOCK_K=block_k,
    )
    block_w = triton.next_power_of_2(width)
    # 128 outputs a program while that still gives MIN_PROGRAMS, else 32 (more programs read B);
    # at most 8192 weights a tile, so wide adapters stay in registers
    block_n = 128 if num_tokens * triton.cdiv(n, 128) >= MIN_PROGRAMS else 32
    block_n = max(min(block_n, 8192 // block_w), 1)
    _expand_kernel[(num_tokens, triton.cdiv(n, block_n))](
        t, b, token_slots, out, n, width, num_splits, t.stride(0), t.stride(1), b.stride(0), b.stride(1),
        out.stride(0), BLOCK_N=block_n, BLOCK_W=block_w, BLOCK_SPLIT=triton.next_power_of_2(num_splits),
    )
    return out


def _grouped_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor, out: torch.Tensor,
                   tiles: torch.Tensor | None) -> torch.Tensor:
    """The grouped kernels over the host's `tiles`, or (None) over every pair of block and slot."""
    num_tokens, k = x.shape
    width, n = a.shape[1], b.shape[1]
    num_adapters = a.shape[0] - 1
    num_tiles = tiles.shape[0] if tiles is not None else triton.cdiv(num_tokens, TILE_ROWS) * num_adapters
    block_w, block_k = max(min(triton.next_power_of_2(width), 64), 16), 64  # tl.dot takes no side under 16
    num_w_tiles = triton.cdiv(width, block_w)
    k_per_split, num_splits = _split(num_tokens * num_w_tiles, k, block_k, MAX_GROUPED_SPLIT)
    t = torch.empty((num_splits, num_tokens, width), dtype=torch.float32, device=x.device)  # partial sums
    tiles_arg = tiles if tiles is not None else token_slots  # unread without HOST_TILES
    # float32 products in float32, and under the interpreter, which multiplies bfloat16 operands as raw bits
    dot_f32 = x.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    _grouped_shrink_kernel[(num_tiles, num_w_tiles, num_splits)](
        x, a, tiles_arg, token_slots, t, num_tokens, num_adapters, k, width, k_per_split,
        x.stride(0), a.stride(0), a.stride(1), t.stride(0), t.stride(1),
        BLOCK_T=TILE_ROWS, BLOCK_W=block_w, BLOCK_K=block_k, HOST_TILES=tiles is not None, DOT_F32=dot_f32,
    )
    block_n = 128
    _grouped_expand_kernel[(num_tiles, triton.cdiv(n, block_n))](
        t, b, tiles_arg, token_slots, out, num_tokens, num_adapters, n, width, num_splits,
        t.stride(0), t.stride(1), b.stride(0), b.stride(1), out.stride(0),
        BLOCK_T=TILE_ROWS, BLOCK_N=block_n, BLOCK_W=max(triton.next_power_of_2(width), 16),
        HOST_TILES=tiles is not None, DOT_F32=dot_f32,
    )
    return out

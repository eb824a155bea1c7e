"""Paged attention for a flat batch that mixes prefill chunks and decode tokens, in Triton kernels.

Decode tokens (sequences with one new token) go to `_decode_kernel`: one program per sequence and
KV head computes all query heads that share the KV head (grouped-query attention reads each K/V tile
once for the whole group), walking the sequence's block table BLOCK_N keys at a time with an online
softmax. A decode batch too small to fill the GPU (sequences x KV heads below ~2 programs per SM)
splits each sequence's keys over several programs instead and merges their partial softmaxes in a
second kernel (flash-decoding), so one long context does not run on a handful of SMs.

Prompt chunks go to `_paged_attention_kernel`: one program computes BLOCK_Q query tokens of one
sequence for one KV group; the programs with the most keys to walk start first, so the short ones
fill the tail. In a step with both, each kernel skips the other's sequences.

Same inputs and result as `tgi_server.layers.attention.PagedAttention`'s portable path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tgi_server.attention_metadata import AttentionMetadata
from tgi_server.kernels import pdl
from tgi_server.kernels.pdl import wait_for_previous

# Keys per inner-loop iteration; each key's page is looked up in the block table on its own.
BLOCK_N = 64
# Rows of the prompt kernel's score tile (query tokens x heads of a group); tl.dot needs at least 16.
PREFILL_ROWS = 64
# Launch settings of the prompt kernel: measured best of 64/128 rows, 4/8 warps, 2/3 stages on the
# 8B's heads (bench/attention_prefill.py).
PREFILL_WARPS = 4
PREFILL_STAGES = 3
# Launch settings of the decode kernel (bench/attention_decode.py).
DECODE_BLOCK_N = 64
DECODE_WARPS = 4
DECODE_STAGES = 3
# Split decode keys until sequences x KV heads x splits reaches this many programs.
TARGET_PROGRAMS = 256
MAX_SPLITS = 16


@triton.jit
def _attend_key_tile(
    q, m_i, l_i, acc, start, key_stop, q_pos, sliding_window, qk_scale, softcap,
    k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, kv_head, dims, dim_valid,
    stride_k_block, stride_k_slot, stride_k_head, stride_v_block, stride_v_slot, stride_v_head, stride_table,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, IEEE: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
):
    """One online-softmax step: the query rows `q` over keys start .. start + BLOCK_N - 1 (those below
    key_stop) of sequence `seq`, each key's page looked up in its block table. Returns the updated
    (running max, running sum, unnormalised output); softmax in base 2 (`qk_scale` and `softcap`
    include log2 e). With USE_SOFTCAP, scores become softcap * tanh(scores / softcap) (Gemma 2)."""
    keys = start + tl.arange(0, BLOCK_N)
    key_valid = keys < key_stop
    page = tl.load(block_tables_ptr + seq * stride_table + keys // PAGE, mask=key_valid, other=0).to(tl.int64)
    slot = keys % PAGE
    kv_mask = key_valid[:, None] & dim_valid[None, :]
    k = tl.load(
        k_cache_ptr + page[:, None] * stride_k_block + slot[:, None] * stride_k_slot + kv_head * stride_k_head + dims[None, :],
        mask=kv_mask, other=0.0,
    ).to(q.dtype)  # an fp8 cache widens to the queries' type (DOT_FP16: float16)
    if IEEE:
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        scores = tl.dot(q, tl.trans(k))
    allowed = key_valid[None, :]
    if CAUSAL:
        allowed = allowed & (keys[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            allowed = allowed & (keys[None, :] > q_pos[:, None] - sliding_window)
    scores = scores * qk_scale
    if USE_SOFTCAP:  # tanh(y) = 1 - 2 / (exp(2y) + 1)
        scores = softcap - 2.0 * softcap / (tl.exp(tl.minimum(2.0 * scores / softcap, 80.0)) + 1.0)
    scores = tl.where(allowed, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see no key yet
    p = tl.exp2(scores - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    v = tl.load(
        v_cache_ptr + page[:, None] * stride_v_block + slot[:, None] * stride_v_slot + kv_head * stride_v_head + dims[None, :],
        mask=kv_mask, other=0.0,
    ).to(q.dtype)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr, q_block_starts_ptr, num_seqs,
    scale, sliding_window, softcap,
    stride_q_token, stride_q_head, stride_o_token, stride_o_head,
    stride_k_block, stride_k_slot, stride_k_head, stride_v_block, stride_v_slot, stride_v_head,
    stride_table,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, USE_WINDOW: tl.constexpr,
    IEEE: tl.constexpr, DOT_FP16: tl.constexpr, USE_SOFTCAP: tl.constexpr, PDL: tl.constexpr,
):
    # Program (kv_head, i): query block n - 1 - i of the whole batch (n blocks in all: a sequence's
    # last blocks, which see the most keys, start first); sequence s owns blocks
    # q_block_starts[s] .. q_block_starts[s + 1] - 1. Extra programs (a padded grid) return at once.
    wait_for_previous(PDL)
    kv_head = tl.program_id(0)
    block = tl.num_programs(1) - 1 - tl.program_id(1)
    if block >= tl.load(q_block_starts_ptr + num_seqs):
        return
    low = block * 0  # tensors, not constants: Triton specialises an int argument equal to 1
    high = low + num_seqs - 1
    while low < high:  # the last sequence whose first block is <= this one (skips empty sequences)
        middle = (low + high + 1) // 2
        if tl.load(q_block_starts_ptr + middle) <= block:
            low = middle
        else:
            high = middle - 1
    seq = low
    q_block = block - tl.load(q_block_starts_ptr + seq)
    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    if q_len == 1:
        return  # a decode token: the decode kernel's
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len  # position of the sequence's first new token

    # Row r of the tile is query token r // GROUP_P of this block, head r % GROUP_P of the group.
    rows = tl.arange(0, BLOCK_Q * GROUP_P)
    q_index = q_block * BLOCK_Q + rows // GROUP_P
    group_index = rows % GROUP_P
    row_valid = (q_index < q_len) & (group_index < GROUP)
    q_pos = first_pos + q_index
    head = kv_head * GROUP + group_index
    dims = tl.arange(0, HEAD_DIM_P)
    dim_valid = dims < HEAD_DIM
    q_token = (q_begin + q_index).to(tl.int64)
    q = tl.load(
        q_ptr + q_token[:, None] * stride_q_token + head[:, None] * stride_q_head + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :], other=0.0,
    )
    if DOT_FP16:
        q = q.to(tl.float16)

    # Keys up to the block's last query position; with a window, from the first query's window on.
    key_stop = first_pos + tl.minimum(q_len, (q_block + 1) * BLOCK_Q)
    key_start = 0
    if USE_WINDOW:
        key_start = tl.maximum(first_pos + q_block * BLOCK_Q - sliding_window + 1, 0)
        key_start = (key_start // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_Q * GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_P], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_P, HEAD_DIM_P], tl.float32)
    qk_scale = scale * 1.4426950408889634  # softmax in base 2
    for start in range(key_start, key_stop, BLOCK_N):
        m_i, l_i, acc = _attend_key_tile(
            q, m_i, l_i, acc, start, key_stop, q_pos, sliding_window, qk_scale, softcap * 1.4426950408889634,
            k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, kv_head, dims, dim_valid,
            stride_k_block, stride_k_slot, stride_k_head, stride_v_block, stride_v_slot, stride_v_head, stride_table,
            BLOCK_N=BLOCK_N, PAGE=PAGE, CAUSAL=True, USE_WINDOW=USE_WINDOW, IEEE=IEEE,
            USE_SOFTCAP=USE_SOFTCAP,
        )

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        out_ptr + q_token[:, None] * stride_o_token + head[:, None] * stride_o_head + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & dim_valid[None, :],
    )


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, partial_ptr, lse_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    scale, sliding_window, softcap,
    stride_q_token, stride_q_head, stride_o_token, stride_o_head,
    stride_k_block, stride_k_slot, stride_k_head, stride_v_block, stride_v_slot, stride_v_head,
    stride_table,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SPLITS: tl.constexpr,
    USE_WINDOW: tl.constexpr, IEEE: tl.constexpr, DOT_FP16: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    PDL: tl.constexpr,
):
    """One decode token's heads of one KV group over its keys, or with SPLITS > 1 over one slice of
    them: writes out[token, head], or the slice's normalised output to partial[token, head, split]
    and its log2-sum-exp to lse[token, head, split]. Sequences with more or fewer than one new token
    (prompt chunks, padding) are left alone."""
    wait_for_previous(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    token = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    if tl.load(query_start_loc_ptr + seq + 1) - token != 1:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    q_pos = seq_len - 1
    rows = tl.arange(0, ROWS)  # the group's heads, padded to the 16 rows tl.dot needs
    row_valid = rows < GROUP
    head = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM_P)
    dim_valid = dims < HEAD_DIM
    q = tl.load(
        q_ptr + token * stride_q_token + head[:, None] * stride_q_head + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :], other=0.0,
    )
    if DOT_FP16:
        q = q.to(tl.float16)
    first_key = 0
    if USE_WINDOW:
        first_key = tl.maximum(q_pos - sliding_window + 1, 0)
    span = tl.cdiv(tl.cdiv(seq_len - first_key, SPLITS), BLOCK_N) * BLOCK_N
    key_start = first_key + split * span
    key_stop = tl.minimum(key_start + span, seq_len)

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM_P], tl.float32)
    qk_scale = scale * 1.4426950408889634
    for start in range(key_start, key_stop, BLOCK_N):  # the window is in the key range already
        m_i, l_i, acc = _attend_key_tile(
            q, m_i, l_i, acc, start, key_stop, q_pos, sliding_window, qk_scale, softcap * 1.4426950408889634,
            k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, kv_head, dims, dim_valid,
            stride_k_block, stride_k_slot, stride_k_head, stride_v_block, stride_v_slot, stride_v_head, stride_table,
            BLOCK_N=BLOCK_N, PAGE=PAGE, CAUSAL=False, USE_WINDOW=False, IEEE=IEEE,
            USE_SOFTCAP=USE_SOFTCAP,
        )

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if SPLITS == 1:
        tl.store(
            out_ptr + token * stride_o_token + head[:, None] * stride_o_head + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & dim_valid[None, :],
        )
    else:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        row_offset = (token * (tl.num_programs(1) * GROUP) + head) * SPLITS + split  # [token, head, split]
        tl.store(partial_ptr + row_offset[:, None] * HEAD_DIM_P + dims[None, :], out, mask=row_valid[:, None])
        tl.store(lse_ptr + row_offset, lse, mask=row_valid)


@triton.jit
def _merge_splits_kernel(
    partial_ptr, lse_ptr, out_ptr, query_start_loc_ptr, stride_o_token, stride_o_head, num_heads,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr,
):
    """out[token, head] = the partial outputs weighted by each slice's share of the softmax mass."""
    wait_for_previous(PDL)
    token = tl.load(query_start_loc_ptr + tl.program_id(0)).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS)
    dims = tl.arange(0, HEAD_DIM_P)
    row = (token * num_heads + head) * SPLITS
    lse = tl.load(lse_ptr + row + splits)  # [SPLITS]
    weight = tl.exp2(lse - tl.max(lse, 0))  # empty slices weigh 0
    partial = tl.load(partial_ptr + (row + splits)[:, None] * HEAD_DIM_P + dims[None, :])
    out = tl.sum(partial * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out_ptr + token * stride_o_token + head * stride_o_head + dims, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q [num_tokens, num_heads, head_dim] over kv_cache [2, num_blocks, block_size, num_kv_heads,
    head_dim] (this step's K/V already written), laid out by `attn`; scores scaled by `scale`, then
    soft-capped to (-softcap, softcap) when given.
    Returns [num_tokens, num_heads, head_dim]."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, page = kv_cache.shape[3], kv_cache.shape[2]
    num_seqs = attn.seq_lens.shape[0]
    max_query_len = attn.max_query_len
    group = num_heads // num_kv_heads
    group_p = triton.next_power_of_2(group)
    head_dim_p = max(triton.next_power_of_2(head_dim), 16)  # tl.dot: K >= 16
    out = torch.empty_like(q)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    window = sliding_window or 0
    strides = (
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        attn.block_tables.stride(0),
    )
    shape = dict(GROUP=group, GROUP_P=group_p, HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p, PAGE=page,
                 USE_WINDOW=sliding_window is not None, USE_SOFTCAP=softcap is not None, IEEE=q.dtype == torch.float32,
                 # bfloat16 queries over an fp8 cache: products in float16, which fp8 widens to in
                 # one instruction (to bfloat16 in several)
                 DOT_FP16=q.dtype == torch.bfloat16 and kv_cache.dtype.itemsize == 1, **pdl.options(q))
    # Split keys only in decode-only steps: a step with prompt chunks has programs enough.
    splits = 1
    if max_query_len == 1:
        splits = min(MAX_SPLITS, triton.next_power_of_2(triton.cdiv(TARGET_PROGRAMS, num_seqs * num_kv_heads)))
    partial = lse = out  # unused unless splits > 1
    if splits > 1:
        partial = torch.empty(q.shape[0], num_heads, splits, head_dim_p, dtype=torch.float32, device=q.device)
        lse = torch.empty(q.shape[0], num_heads, splits, dtype=torch.float32, device=q.device)
    if max_query_len == 1 or _has_decodes(attn):
        _decode_kernel[(num_seqs, num_kv_heads, splits)](
            q, k_cache, v_cache, out, partial, lse, attn.query_start_loc, attn.seq_lens, attn.block_tables,
            scale, window, softcap or 1.0, q.stride(0), q.stride(1), out.stride(0), out.stride(1), *strides,
            ROWS=max(group_p, 16), BLOCK_N=DECODE_BLOCK_N, SPLITS=splits, **shape,
            num_warps=DECODE_WARPS, num_stages=DECODE_STAGES,
        )
    if splits > 1:
        _merge_splits_kernel[(num_seqs, num_heads)](
            partial, lse, out, attn.query_start_loc, out.stride(0), out.stride(1), num_heads,
            HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p, SPLITS=splits, **pdl.options(q),
        )
    if max_query_len > 1:
        block_q = max(PREFILL_ROWS // group_p, 1)
        q_block_starts, num_q_blocks = _q_blocks(attn, block_q, q.shape[0])
        _paged_attention_kernel[(num_kv_heads, num_q_blocks)](
            q, k_cache, v_cache, out,
            attn.query_start_loc, attn.seq_lens, attn.block_tables, q_block_starts, num_seqs,
            scale, window, softcap or 1.0, q.stride(0), q.stride(1), out.stride(0), out.stride(1), *strides,
            BLOCK_Q=block_q, BLOCK_N=BLOCK_N, **shape, num_warps=PREFILL_WARPS, num_stages=PREFILL_STAGES,
        )
    return out


def _has_decodes(attn: AttentionMetadata) -> bool:
    """Whether some sequence has exactly one new token; always assumed inside a CUDA graph (no host
    copy of the layout)."""
    if "has_decodes" not in attn.derived:
        starts = attn.query_start_loc_cpu
        attn.derived["has_decodes"] = not starts or any(b - a == 1 for a, b in zip(starts, starts[1:]))
    return attn.derived["has_decodes"]


def _q_blocks(attn: AttentionMetadata, block_q: int, num_tokens: int) -> tuple[torch.Tensor, int]:
    """(q_block_starts [B + 1] int32 on the device, programs to launch), computed once per step.

    From the host copy of query_start_loc when there is one (exact grid); inside a CUDA graph from
    the device tensor, with a grid big enough for any split of the batch's tokens.
    """
    key = ("q_block_starts", block_q)
    if key not in attn.derived:
        if attn.query_start_loc_cpu:
            starts, total = [0], 0
            for begin, end in zip(attn.query_start_loc_cpu, attn.query_start_loc_cpu[1:]):
                total += -(-(end - begin) // block_q)
                starts.append(total)
            attn.derived[key] = (torch.tensor(starts, dtype=torch.int32, device=attn.seq_lens.device), total)
        else:
            counts = (attn.query_start_loc.diff() + block_q - 1) // block_q  # [B]
            starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
            attn.derived[key] = (starts, triton.cdiv(num_tokens, block_q) + attn.seq_lens.shape[0])
    return attn.derived[key]

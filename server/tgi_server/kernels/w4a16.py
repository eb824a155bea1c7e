"""W4A16 linear: y = x @ W.T (+ bias) for a 4-bit weight W, dequantized in registers, never in memory.

x [M, K] is in the model dtype (float16, bfloat16 or float32); W [N, K] arrives packed as the loaders
leave it (the layout is documented in `tgi_server.quantization`, whose `dequantize_int4` is the
reference): qweight [N, K // 8] int32, eight nibbles per word with the lowest nibble the lowest k, and
per-group scales and zeros [N, K // group_size], so that W[n, k] = (nibble - zero) * scale of the group
k // group_size. The point is the decode step (M = 1..16), which is bound by reading the weight: 4 bits
per weight instead of 16.

One launch over (M tiles, N tiles), no workspace (CUDA-graph safe), no host sync. Each program walks K
in BLOCK_K steps: it loads the packed tile [BLOCK_N, BLOCK_K // 8] (BLOCK_K / 2 contiguous bytes per
weight row), splits every word into its 8 nibbles with shifts and lays them out as [BLOCK_N, BLOCK_K],
applies the scales and zeros in float32, rounds the weight tile to x's dtype (as the reference
`F.linear(x, dequantize_int4(...).to(x.dtype))` rounds) and feeds it to `tl.dot` with the x tile,
accumulating in float32; the bias is added in float32 and the output rounds to x's dtype once.

Scales and zeros are loaded once per group, not per weight, when the groups tile K evenly: when BLOCK_K
divides group_size, one [BLOCK_N] column per tile; when group_size divides BLOCK_K, the tile's
[BLOCK_N, BLOCK_K // group_size] groups, broadcast over the group. Any other group size (per-channel
quantization of a K that is no multiple of BLOCK_K, say) gathers them per element.

The kernels read W in their own layout (`interleave`, applied by the Triton backend when the weights
are loaded, `ops.triton_backend.prepare_int4`): wherever K is a multiple of 128, each row's K splits
into chunks of 128 weights, 16 words each, and nibble j of word w of a chunk holds the chunk's weight
j * 16 + w, where the loaders' order holds weight 8 * w + j. The tensor-core kernel undoes that in
registers (a permute of the unpacked tile); the GEMV kernel is why it exists: it takes nibble j of every
word at once, against x's 16 consecutive elements j * 16 .. j * 16 + 15 of each chunk, so x arrives in
vector loads and no tile changes layout inside the K loop. A K that is no multiple of 128 keeps the
loaders' order and only the tensor-core kernel runs it.

A few rows (decode at small batch, up to GEMV_MAX_ROWS, group sizes that are multiples of 128) take
`_int4_gemv_kernel` instead, shaped like the skinny bf16 kernel (`kernels.skinny`): no tensor cores, a
program per row of x and BLOCK_N weight rows, walking K a few chunks at a time (several rows of x read
the same weights from L2 at about the same time). There the cost is the instructions per weight, not
the bytes: a nibble becomes a float by OR-ing it into the mantissa of 2^23 (0x4B000000; an int-to-float
conversion runs at a fraction of the FP32 rate), the zero point (plus 2^23) is subtracted exactly, the
result multiplies x into a per-chunk partial sum, and the chunk's scale multiplies that partial sum
once per word instead of once per weight: 7.5 instructions per weight in the K loop's sm_90 SASS,
against the earlier kernel's 23.75. The weight is never rounded to the model dtype on this path (the float32
reference, where the tensor-core kernel rounds it as `F.linear` over the dequantized weight would).

`_config`'s tiles are untuned; `GEMV_CONFIG` says where its tile comes from.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tgi_server.kernels import pdl
from tgi_server.kernels.pdl import wait_for_previous
from tgi_server.quantization import INT4_PER_INT32, pack_int4, unpack_int4


@triton.jit
def _int4_linear_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, y_ptr,
    M, N, K, group_size,
    stride_x, stride_q, stride_s, stride_z, stride_y,
    HAS_BIAS: tl.constexpr, GROUPS_PER_TILE: tl.constexpr, DOT_F32: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[m, n] for the BLOCK_M rows of tile program_id(0) and the BLOCK_N columns of program_id(1).

    GROUPS_PER_TILE: the scale groups of one K tile (1 when BLOCK_K divides group_size), or 0 when
    groups straddle tiles and scales are gathered per element. DOT_F32: the dot in float32 (IEEE),
    for float32 x and under Triton's interpreter, which multiplies bfloat16 dot operands as raw bits.
    INTERLEAVED: qweight in the kernels' layout (`interleave`; BLOCK_K a multiple of 128).
    """
    rows_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rows_m < M
    mask_n = rows_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_word = tl.arange(0, BLOCK_K // 8)
    shifts = tl.arange(0, 8) * 4  # bit offset of nibble k % 8
    n64 = rows_n.to(tl.int64)
    x_ptrs = x_ptr + rows_m[:, None].to(tl.int64) * stride_x + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    q_ptrs = qweight_ptr + n64[:, None] * stride_q + offs_word[None, :]  # [BLOCK_N, BLOCK_K // 8]
    s_ptrs = scales_ptr + n64[:, None] * stride_s  # [BLOCK_N, 1]
    z_ptrs = zeros_ptr + n64[:, None] * stride_z
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        x = tl.load(x_ptrs + k0, mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        word_mask = mask_n[:, None] & ((k0 // 8 + offs_word) < K // 8)[None, :]
        packed = tl.load(q_ptrs + k0 // 8, mask=word_mask, other=0)  # [BLOCK_N, BLOCK_K // 8] int32
        nibbles = (packed[:, :, None] >> shifts[None, None, :]) & 0xF  # [BLOCK_N, BLOCK_K // 8, 8]
        if INTERLEAVED:  # [chunk, word, nibble] -> [chunk, nibble, word]: the loaders' order of k
            nibbles = tl.permute(tl.reshape(nibbles, (BLOCK_N, BLOCK_K // 128, 16, 8)), (0, 1, 3, 2))
        nibbles = tl.reshape(nibbles, (BLOCK_N, BLOCK_K))
        if GROUPS_PER_TILE == 0:  # groups straddle tiles: a scale and zero per weight
            nibbles = nibbles.to(tl.float32)
            groups = (k0 + offs_k) // group_size  # [BLOCK_K]
            tile_mask = mask_n[:, None] & mask_k[None, :]
            scale = tl.load(s_ptrs + groups[None, :], mask=tile_mask, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_K]
            zero = tl.load(z_ptrs + groups[None, :], mask=tile_mask, other=0.0).to(tl.float32)
            w = (nibbles - zero) * scale  # [BLOCK_N, BLOCK_K]
        else:  # the tile holds whole groups (or lies inside one): a scale and zero per group
            nibbles = tl.reshape(nibbles, (BLOCK_N, GROUPS_PER_TILE, BLOCK_K // GROUPS_PER_TILE)).to(tl.float32)
            groups = k0 // group_size + tl.arange(0, GROUPS_PER_TILE)  # [GROUPS_PER_TILE]
            group_mask = mask_n[:, None] & (groups < K // group_size)[None, :]
            # [BLOCK_N, GROUPS_PER_TILE]
            scale = tl.load(s_ptrs + groups[None, :], mask=group_mask, other=0.0).to(tl.float32)
            zero = tl.load(z_ptrs + groups[None, :], mask=group_mask, other=0.0).to(tl.float32)
            w = (nibbles - zero[:, :, None]) * scale[:, :, None]  # [BLOCK_N, GROUPS_PER_TILE, group_size or BLOCK_K]
            w = tl.reshape(w, (BLOCK_N, BLOCK_K))
        w = w.to(x_ptr.dtype.element_ty)  # rounded to the model dtype, as the reference's weight
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))  # [BLOCK_M, BLOCK_N]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows_m[:, None].to(tl.int64) * stride_y + rows_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _int4_gemv_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, y_ptr,
    N, K, group_size,
    stride_x, stride_q, stride_s, stride_z, stride_y,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr, TILES: tl.constexpr, PDL: tl.constexpr,
):
    """y[m, n] for row m = program_id(0) of x and the TILES * BLOCK_N columns of program_id(1), from
    qweight in the kernels' layout; K a multiple of CHUNKS * 128, group_size a multiple of 128.

    TILES = 2 walks two [BLOCK_N, CHUNKS, 16] tiles of words side by side, so that each thread holds
    words of two weight rows at the same place of K and converts each element of x once for both."""
    wait_for_previous(PDL)
    row = tl.program_id(0)
    rows_a = tl.program_id(1) * (TILES * BLOCK_N) + tl.arange(0, BLOCK_N)
    rows_b = rows_a + BLOCK_N  # the second tile's (TILES = 2)
    offs_c = tl.arange(0, CHUNKS)
    # x [1, CHUNKS, 16] at nibble 0 (nibble j: + j * 16)
    x_ptrs = x_ptr + row * stride_x + offs_c[None, :, None] * 128 + tl.arange(0, 16)[None, None, :]
    q_a, s_a, z_a = _gemv_tile_pointers(rows_a, N, qweight_ptr, scales_ptr, zeros_ptr, stride_q, stride_s, stride_z, CHUNKS)
    q_b, s_b, z_b = _gemv_tile_pointers(rows_b, N, qweight_ptr, scales_ptr, zeros_ptr, stride_q, stride_s, stride_z, CHUNKS)
    acc_a = tl.zeros((BLOCK_N, CHUNKS, 16), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N, CHUNKS, 16), dtype=tl.float32)
    for k0 in range(0, K, CHUNKS * 128):
        groups = (k0 + offs_c * 128) // group_size  # [CHUNKS]: a chunk lies in one group
        packed_a, scale_a, zero_a = _gemv_tile_words(q_a, s_a, z_a, k0, groups)
        part_a = tl.zeros((BLOCK_N, CHUNKS, 16), dtype=tl.float32)
        if TILES == 2:
            packed_b, scale_b, zero_b = _gemv_tile_words(q_b, s_b, z_b, k0, groups)
            part_b = tl.zeros((BLOCK_N, CHUNKS, 16), dtype=tl.float32)
        for j in tl.static_range(8):
            x = tl.load(x_ptrs + k0 + j * 16).to(tl.float32)
            part_a += x * _nibble_minus_zero(packed_a, zero_a, j)
            if TILES == 2:
                part_b += x * _nibble_minus_zero(packed_b, zero_b, j)
        acc_a += part_a * scale_a[:, :, None]
        if TILES == 2:
            acc_b += part_b * scale_b[:, :, None]
    _gemv_tile_store(acc_a, rows_a, N, row, bias_ptr, y_ptr, stride_y, HAS_BIAS)
    if TILES == 2:
        _gemv_tile_store(acc_b, rows_b, N, row, bias_ptr, y_ptr, stride_y, HAS_BIAS)


@triton.jit
def _gemv_tile_pointers(rows, N, qweight_ptr, scales_ptr, zeros_ptr, stride_q, stride_s, stride_z, CHUNKS: tl.constexpr):
    """Pointers to the words [BLOCK_N, CHUNKS, 16] of the first CHUNKS chunks of `rows`, and to their scales
    and zeros [BLOCK_N, 1]. Rows past N repeat row N - 1: no masks in the loop."""
    n64 = tl.minimum(rows, N - 1).to(tl.int64)
    words = tl.arange(0, CHUNKS)[None, :, None] * 16 + tl.arange(0, 16)[None, None, :]
    return (qweight_ptr + n64[:, None, None] * stride_q + words, scales_ptr + n64[:, None] * stride_s,
            zeros_ptr + n64[:, None] * stride_z)


@triton.jit
def _gemv_tile_words(q_ptrs, s_ptrs, z_ptrs, k0, groups):
    """A tile's words at K offset k0 (as uint32), and its chunks' scales and 2^23 + zeros [BLOCK_N, CHUNKS]
    in float32."""
    packed = tl.load(q_ptrs + k0 // 8).to(tl.uint32, bitcast=True)
    scale = tl.load(s_ptrs + groups[None, :]).to(tl.float32)
    zero = tl.load(z_ptrs + groups[None, :]).to(tl.float32) + 8388608.0  # 2^23 + zero
    return packed, scale, zero


@triton.jit
def _nibble_minus_zero(packed, zero, j: tl.constexpr):
    """Nibble j of every word minus its chunk's zero, in float32: 2^23 + nibble, exactly (the nibble ORed
    into the mantissa of 2^23), minus 2^23 + zero, exactly."""
    return (((packed >> (4 * j)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - zero[:, :, None]


@triton.jit
def _gemv_tile_store(acc, rows, N, row, bias_ptr, y_ptr, stride_y, HAS_BIAS: tl.constexpr):
    y = tl.sum(tl.sum(acc, axis=2), axis=1)  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(bias_ptr + tl.minimum(rows, N - 1)).to(tl.float32)
    tl.store(y_ptr + row * stride_y + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)


# Rows of x up to which `int4_linear` takes the GEMV kernel, and its (BLOCK_N, CHUNKS, num_warps, TILES):
# four words (16 bytes) a thread per step, one row tile, picked from the SASS alone (7.5 instructions
# a weight in the K loop; two tiles of 16 rows, 6.3); bench/quantized_linear.py --sweep has not yet run
# on a GPU to replace it.
GEMV_MAX_ROWS = 4
GEMV_CONFIG = (8, 4, 4, 1)
# Weights per chunk of the kernels' layout (16 words).
CHUNK = 128


def interleave(qweight: torch.Tensor) -> torch.Tensor:
    """qweight [N, K // 8] int32 in the loaders' order -> the kernels' layout (the module docstring) where
    K is a multiple of CHUNK, else unchanged. `int4_linear` tells the two apart by K alone."""
    n, words = qweight.shape
    if (words * INT4_PER_INT32) % CHUNK:
        return qweight
    out = torch.empty_like(qweight)
    for start in range(0, n, 4096):  # in row blocks: packing goes through int64
        rows = qweight[start:start + 4096]
        nibbles = unpack_int4(rows).view(len(rows), words // 16, 8, 16)  # [rows, chunk, j, w]: k = chunk * 128 + j * 16 + w
        out[start:start + 4096] = pack_int4(nibbles.transpose(2, 3).reshape(len(rows), -1))  # word w: k = j * 16 + w at nibble j
    return out


def _gemv_config(m: int, n: int, k: int, group_size: int) -> tuple[int, int, int, int] | None:
    """(BLOCK_N, CHUNKS, num_warps, TILES) for the GEMV kernel, CHUNKS cut to divide K's chunks; None
    where the GEMV cannot run (K no multiple of 128: the loaders' order; groups smaller than a chunk)."""
    if k % CHUNK or group_size % CHUNK:
        return None
    block_n, chunks, num_warps, tiles = GEMV_CONFIG
    while (k // CHUNK) % chunks:
        chunks //= 2
    return block_n, chunks, num_warps, tiles


def _config(m: int, n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for an [m, k] x [n, k]^T product. Untuned (see the module
    docstring). Decode (m <= 16): one 16-row tile, 32-wide N tiles up to n = 8192 (>= 128 programs for
    the common 4096-wide projections), 64 beyond, and long 128-deep K steps (64-byte packed row
    segments). Prefill: larger M and N tiles, as a plain fp16 GEMM would take. K steps of a chunk (128)
    where the weight is in the kernels' layout (K a multiple of 128), whose tiles hold whole chunks."""
    if m <= 16:
        block_m, block_n, block_k, num_warps = 16, 32 if n <= 8192 else 64, 128, 4
    elif m <= 64:
        block_m, block_n, block_k, num_warps = 32, 64, 64, 4
    elif m <= 256:
        block_m, block_n, block_k, num_warps = 64, 128, 64, 4
    else:
        block_m, block_n, block_k, num_warps = 128, 128, 64, 8
    # tl.dot takes K >= 16
    block_k = CHUNK if k % CHUNK == 0 else min(block_k, max(triton.next_power_of_2(k), 16))
    return block_m, block_n, block_k, num_warps


def _groups_per_tile(group_size: int, block_k: int) -> int:
    """The kernel's GROUPS_PER_TILE: 1 when a K tile lies inside one group, block_k // group_size when
    it holds whole groups, 0 (gather per element) otherwise."""
    if group_size % block_k == 0:
        return 1
    if block_k % group_size == 0:
        return block_k // group_size
    return 0


def int4_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
    bias: torch.Tensor | None = None, config: tuple[int, int, int, int] | None = None,
    gemv_config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """x [M, K] (K contiguous) @ W.T (+ bias [N]) -> [M, N] in x's dtype, for the 4-bit weight W [N, K]
    given as qweight [N, K // 8] int32 (in the kernels' layout where K is a multiple of 128:
    `interleave`), scales and zeros [N, K // group_size] (`tgi_server.quantization`).

    config: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the tensor-core kernel instead of `_config`'s
    (powers of two, each >= 16; BLOCK_K a multiple of 128 for the kernels' layout); gemv_config:
    (BLOCK_N, CHUNKS, num_warps, TILES) of the GEMV kernel, at any number of rows. Without either: the GEMV
    kernel up to GEMV_MAX_ROWS rows where `_gemv_config` allows, the tensor-core kernel otherwise.
    """
    m, k = x.shape
    n = qweight.shape[0]
    assert qweight.dtype == torch.int32 and qweight.shape == (n, k // INT4_PER_INT32), (qweight.shape, x.shape)
    assert k % INT4_PER_INT32 == 0 and group_size % INT4_PER_INT32 == 0 and k % group_size == 0, (k, group_size)
    assert scales.shape == zeros.shape == (n, k // group_size), (scales.shape, zeros.shape)
    assert x.stride(1) == 1 and qweight.stride(1) == 1 and scales.stride(1) == 1 and zeros.stride(1) == 1
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    interleaved = k % CHUNK == 0
    gemv = gemv_config or (_gemv_config(m, n, k, group_size) if m <= GEMV_MAX_ROWS and config is None else None)
    if gemv is not None:
        block_n, chunks, num_warps, tiles = gemv
        assert interleaved and group_size % CHUNK == 0 and k % (chunks * CHUNK) == 0, (k, group_size, chunks)
        _int4_gemv_kernel[(m, triton.cdiv(n, tiles * block_n))](
            x, qweight, scales, zeros, bias if bias is not None else scales, y,
            n, k, group_size,
            x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, BLOCK_N=block_n, CHUNKS=chunks, TILES=tiles, num_warps=num_warps,
            **pdl.options(x),
        )
        return y
    block_m, block_n, block_k, num_warps = config or _config(m, n, k)
    assert not interleaved or block_k % CHUNK == 0, (k, block_k)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_linear_kernel[grid](
        x, qweight, scales, zeros, bias if bias is not None else scales, y,
        m, n, k, group_size,
        x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, GROUPS_PER_TILE=_groups_per_tile(group_size, block_k),
        DOT_F32=x.dtype == torch.float32 or interpreted, INTERLEAVED=interleaved,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )
    return y

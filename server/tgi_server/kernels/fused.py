"""Fused elementwise kernels of a decoder layer: one launch where PyTorch needs several.

Each rounds where the portable layer rounds (to the model dtype between ops that PyTorch runs in
that dtype), so the two paths agree to the last bit on most inputs and within one rounding step
otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tgi_server.kernels import pdl
from tgi_server.kernels.pdl import wait_for_previous
from tgi_server.quantization import FP8_DTYPE, FP8_MAX


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    stride_x, stride_residual, stride_out, stride_residual_out,
    hidden_size, eps, weight_offset,
    HAS_RESIDUAL: tl.constexpr, OFFSET_WEIGHT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + row * stride_residual_out + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    mean_square = tl.sum(x32 * x32, 0) / hidden_size
    normed = x32 * tl.math.rsqrt(mean_square + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if OFFSET_WEIGHT:  # Gemma: scaled by (offset + w) in float32, rounded once
        out = normed * (weight + weight_offset)
    else:  # Llama: normalised values round to the model dtype before the scale
        out = normed.to(x.dtype).to(tl.float32) * weight
    tl.store(out_ptr + row * stride_out + cols, out.to(x.dtype), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, weight_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm of x (or of x + residual): x [num_tokens, hidden_size], scaled by weight_offset + weight.

    Returns (normed, x + residual) with a residual, (normed, None) without one.
    """
    num_tokens, hidden_size = x.shape
    out = torch.empty_like(x)
    residual_out = torch.empty_like(x) if residual is not None else None
    _rms_norm_kernel[(num_tokens,)](
        x, residual if residual is not None else x, weight, out, residual_out if residual is not None else out,
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        residual_out.stride(0) if residual_out is not None else 0,
        hidden_size, eps, weight_offset,
        HAS_RESIDUAL=residual is not None, OFFSET_WEIGHT=weight_offset != 0.0, BLOCK=triton.next_power_of_2(hidden_size),
        **pdl.options(x),
    )
    return out, residual_out


@triton.jit
def _rotary_cache_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, inv_freq_ptr, slot_mapping_ptr, k_cache_ptr, v_cache_ptr,
    q_norm_ptr, k_norm_ptr,
    stride_q_token, stride_q_head, stride_k_token, stride_k_head, stride_v_token, stride_v_head,
    stride_cache_slot, stride_cache_head,
    num_heads, num_kv_heads, num_q_programs, attention_scaling, norm_eps, norm_offset,
    HALF: tl.constexpr, HALF_P: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
    HEAD_BLOCK: tl.constexpr, QK_NORM: tl.constexpr, OFFSET_WEIGHT: tl.constexpr, PDL: tl.constexpr,
):
    """Program (token, j): query heads j * HEAD_BLOCK ... of the token for j < num_q_programs, else KV
    heads (j - num_q_programs) * HEAD_BLOCK ...; the angles are computed once per program. The first
    2 * HALF dims of a head rotate; the rest (partial rotary) pass through. With QK_NORM each q and
    k head is RMS-normed over its dims before it rotates (full rotary only)."""
    wait_for_previous(PDL)
    token = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    half = tl.arange(0, HALF_P)
    mask = half < HALF
    angles = tl.load(positions_ptr + token).to(tl.float32) * tl.load(inv_freq_ptr + half, mask=mask, other=0.0)
    cos = (tl.cos(angles) * attention_scaling)[None, :]
    sin = (tl.sin(angles) * attention_scaling)[None, :]
    if block < num_q_programs:  # q: rotated in place
        first = block * HEAD_BLOCK
        x_ptr = q_ptr + token * stride_q_token + first * stride_q_head
        _rotate_heads(x_ptr, stride_q_head, num_heads - first, x_ptr, stride_q_head, cos, sin, half, mask,
                      q_norm_ptr, norm_eps, norm_offset, HALF, HEAD_BLOCK, QK_NORM, OFFSET_WEIGHT)
    else:  # k: rotated into the cache; v: copied into the cache
        first = (block - num_q_programs) * HEAD_BLOCK
        heads = tl.arange(0, HEAD_BLOCK)
        tile_mask = (heads < num_kv_heads - first)[:, None] & mask[None, :]
        cache_ptr = tl.load(slot_mapping_ptr + token) * stride_cache_slot + first * stride_cache_head
        _rotate_heads(k_ptr + token * stride_k_token + first * stride_k_head, stride_k_head, num_kv_heads - first,
                      k_cache_ptr + cache_ptr, stride_cache_head, cos, sin, half, mask,
                      k_norm_ptr, norm_eps, norm_offset, HALF, HEAD_BLOCK, QK_NORM, OFFSET_WEIGHT)
        cache_dtype = v_cache_ptr.dtype.element_ty
        if 2 * HALF == HEAD_DIM:
            cache_offset = cache_ptr + heads[:, None] * stride_cache_head + half[None, :]
            v_offset = token * stride_v_token + (first + heads[:, None]) * stride_v_head + half[None, :]
            v1 = tl.load(v_ptr + v_offset, mask=tile_mask, other=0.0)
            v2 = tl.load(v_ptr + v_offset + HALF, mask=tile_mask, other=0.0)
            tl.store(v_cache_ptr + cache_offset, v1.to(cache_dtype), mask=tile_mask)
            tl.store(v_cache_ptr + cache_offset + HALF, v2.to(cache_dtype), mask=tile_mask)
        else:  # partial rotary: all of v, and k's unrotated tail
            dims = tl.arange(0, HEAD_DIM_P)
            head_valid = (heads < num_kv_heads - first)[:, None]
            cache_offset = cache_ptr + heads[:, None] * stride_cache_head + dims[None, :]
            v_mask = head_valid & (dims < HEAD_DIM)[None, :]
            v = tl.load(v_ptr + token * stride_v_token + (first + heads[:, None]) * stride_v_head + dims[None, :],
                        mask=v_mask, other=0.0)
            tl.store(v_cache_ptr + cache_offset, v.to(cache_dtype), mask=v_mask)
            tail_mask = v_mask & (dims >= 2 * HALF)[None, :]
            k_tail = tl.load(k_ptr + token * stride_k_token + (first + heads[:, None]) * stride_k_head + dims[None, :],
                             mask=tail_mask, other=0.0)
            tl.store(k_cache_ptr + cache_offset, k_tail.to(cache_dtype), mask=tail_mask)


@triton.jit
def _rotate_heads(src_ptr, stride_src_head, num_heads, dst_ptr, stride_dst_head, cos, sin, half, mask,
                  norm_ptr, norm_eps, norm_offset,
                  HALF: tl.constexpr, HEAD_BLOCK: tl.constexpr, NORM: tl.constexpr, OFFSET_WEIGHT: tl.constexpr):
    """Rotates the first min(num_heads, HEAD_BLOCK) heads at src (one token) into dst (may be src),
    rounding to dst's dtype; with NORM each head is first RMS-normed over its 2 * HALF dims and
    scaled by the norm's weight, rounding where `ops.portable.rms_norm` rounds."""
    heads = tl.arange(0, HEAD_BLOCK)
    tile_mask = (heads < num_heads)[:, None] & mask[None, :]
    src = src_ptr + heads[:, None] * stride_src_head + half[None, :]
    dst = dst_ptr + heads[:, None] * stride_dst_head + half[None, :]
    x1 = tl.load(src, mask=tile_mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=tile_mask, other=0.0).to(tl.float32)
    if NORM:
        src_dtype = src_ptr.dtype.element_ty
        mean_square = (tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF)
        inv_rms = tl.math.rsqrt(mean_square + norm_eps)[:, None]
        w1 = tl.load(norm_ptr + half, mask=mask, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(norm_ptr + HALF + half, mask=mask, other=0.0).to(tl.float32)[None, :]
        if OFFSET_WEIGHT:  # Gemma: scaled by (offset + w) in float32, rounded once
            x1 = (x1 * inv_rms * (w1 + norm_offset)).to(src_dtype).to(tl.float32)
            x2 = (x2 * inv_rms * (w2 + norm_offset)).to(src_dtype).to(tl.float32)
        else:  # the normalised values round before the scale
            x1 = ((x1 * inv_rms).to(src_dtype).to(tl.float32) * w1).to(src_dtype).to(tl.float32)
            x2 = ((x2 * inv_rms).to(src_dtype).to(tl.float32) * w2).to(src_dtype).to(tl.float32)
    dtype = dst_ptr.dtype.element_ty
    tl.store(dst, (x1 * cos - x2 * sin).to(dtype), mask=tile_mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(dtype), mask=tile_mask)


def rotary_and_write_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    qk_norm=None,
) -> None:
    """Rotates q in place and writes rotated k and v into kv_cache at slot_mapping; with `qk_norm`
    (the q and k RMSNorm layers) each q and k head is normed first.

    q [num_tokens, num_heads, head_dim], k and v [num_tokens, num_kv_heads, head_dim] (views into
    the fused QKV output are fine), positions and slot_mapping [num_tokens] int64,
    kv_cache [2, num_blocks, block_size, num_kv_heads, head_dim].
    A few tokens (decode) spread their heads over several programs each, for latency; many tokens
    take all heads of a kind in one program, for throughput (measured on an H100: 2.6 us per decode
    layer, and a 1024-token prompt in 12 us per layer instead of 27 us with a program per head).
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    slots = kv_cache.view(2, -1, num_kv_heads, head_dim)  # [2, num_slots, num_kv_heads, head_dim]
    half = inv_freq.shape[0]  # rotary_dim // 2: head_dim // 2 unless the rotary is partial
    head_block = 4 if num_tokens < 64 else triton.next_power_of_2(max(num_heads, num_kv_heads))
    num_q_programs = triton.cdiv(num_heads, head_block)
    if qk_norm is not None:
        assert 2 * half == head_dim, "QK-norm is fused with full rotary only"
        q_norm, k_norm = qk_norm
        assert (q_norm.eps, q_norm.weight_offset) == (k_norm.eps, k_norm.weight_offset)
    _rotary_cache_kernel[(num_tokens, num_q_programs + triton.cdiv(num_kv_heads, head_block))](
        q, k, v, positions, inv_freq, slot_mapping, slots[0], slots[1],
        q_norm.weight if qk_norm else q, k_norm.weight if qk_norm else k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        slots.stride(1), slots.stride(2),
        num_heads, num_kv_heads, num_q_programs, attention_scaling,
        q_norm.eps if qk_norm else 0.0, q_norm.weight_offset if qk_norm else 0.0,
        HALF=half, HALF_P=triton.next_power_of_2(half), HEAD_DIM=head_dim, HEAD_DIM_P=triton.next_power_of_2(head_dim),
        HEAD_BLOCK=head_block, QK_NORM=qk_norm is not None, OFFSET_WEIGHT=bool(qk_norm and q_norm.weight_offset),
        **pdl.options(q),
    )


ACTIVATIONS = ("silu", "gelu_tanh")


@triton.jit
def _gated_activation_kernel(x_ptr, out_ptr, stride_x, stride_out, width,
                             GELU_TANH: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + width + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_out + cols, gate_times_up(gate, up, GELU_TANH), mask=mask)


@triton.jit
def gate_times_up(gate, up, GELU_TANH: tl.constexpr):
    """act(gate) * up for gate and up in the model dtype: the activation rounds to that dtype before
    the product, as PyTorch's two ops do. act is tanh-approximated GELU or SiLU."""
    g = gate.to(tl.float32)
    if GELU_TANH:  # 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))), tanh(y) = 1 - 2 / (exp(2y) + 1)
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        activated = 0.5 * g * (2.0 - 2.0 / (tl.exp(tl.minimum(2.0 * inner, 80.0)) + 1.0))
    else:
        activated = g / (1.0 + tl.exp(-g))
    activated = activated.to(gate.dtype)
    return (activated.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)


def gated_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    """x [num_tokens, 2 * width] = [gate | up] -> act(gate) * up, [num_tokens, width]; act is "silu"
    (SwiGLU) or "gelu_tanh" (GeGLU)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    num_tokens, width = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_tokens, width, dtype=x.dtype, device=x.device)
    block = 1024
    _gated_activation_kernel[(num_tokens, triton.cdiv(width, block))](
        x, out, x.stride(0), out.stride(0), width, GELU_TANH=activation == "gelu_tanh", BLOCK=block, **pdl.options(x),
    )
    return out


@triton.jit
def _quantize_fp8_rows_kernel(x_ptr, out_ptr, scale_ptr, stride_x, stride_out, cols, fp8_max,
                              BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Row program_id(0) of x: its absolute maximum over `cols` (first pass), then every value divided by
    amax / fp8_max, clamped and rounded to e4m3 (second pass, the row back from L1/L2)."""
    wait_for_previous(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    scale = fp8_row_scale(x_ptr + row * stride_x, cols, fp8_max, BLOCK)
    tl.store(scale_ptr + row, scale)
    for start in range(0, cols, BLOCK):
        mask = start + offs < cols
        x = tl.load(x_ptr + row * stride_x + start + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + start + offs, to_e4m3(x, scale, fp8_max), mask=mask)


@triton.jit
def fp8_row_scale(row_ptr, cols, fp8_max, BLOCK: tl.constexpr):
    """The e4m3 scale of the `cols` values at row_ptr: their absolute maximum / fp8_max (at least
    1e-12 / fp8_max), as `quantization.quantize_fp8_rows`; BLOCK values a step."""
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, cols, BLOCK):
        amax = tl.maximum(amax, tl.abs(tl.load(row_ptr + start + offs, mask=start + offs < cols, other=0.0).to(tl.float32)))
    return tl.math.div_rn(tl.maximum(tl.max(amax, 0), 1e-12), fp8_max)


@triton.jit
def to_e4m3(x, scale, fp8_max):
    """x (float32) / scale, clamped to +-fp8_max and rounded to e4m3 as PyTorch's conversion rounds
    (`quantization.quantize_fp8_rows`)."""
    q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -fp8_max), fp8_max)
    # rounded to e4m3's grid (3 mantissa bits; subnormal steps of 2^-9) to nearest even here, so that the
    # conversion is exact: Triton's interpreter rounds some values wrongly (125.4 to 64 instead of 128)
    exponent = (q.to(tl.uint32, bitcast=True) >> 23) & 0xFF  # biased float32 exponent of q
    step = (tl.maximum(exponent, 127 - 6) - 3).to(tl.uint32) << 23  # 2^(e - 3) as float32 bits
    step = step.to(tl.float32, bitcast=True)
    q = ((q / step + 12582912.0) - 12582912.0) * step  # 1.5 * 2^23: round half to even
    return q.to(tl.float8e4nv)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`tgi_server.quantization.quantize_fp8_rows` in one launch: x [rows, cols] -> (e4m3 [rows, cols],
    float32 scales [rows, 1]), each row scaled so that its largest magnitude becomes e4m3's largest."""
    rows, cols = x.shape
    assert x.stride(1) == 1
    out = torch.empty((rows, cols), dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block = min(triton.next_power_of_2(cols), 2048)
        _quantize_fp8_rows_kernel[(rows,)](x, out, scales, x.stride(0), out.stride(0), cols, FP8_MAX,
                                           BLOCK=block, num_warps=4, **pdl.options(x))
    return out, scales

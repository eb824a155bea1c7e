"""The portable backend: PyTorch on any device, no device syncs. It is the reference the Triton
backend (`ops.triton_backend`) is tested against, and what CPU shards and `--disable-custom-kernels`
run."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tgi_server.attention_metadata import AttentionMetadata, KVCacheSpec
from tgi_server.forward_context import LoraRows
from tgi_server.quantization import dequantize_int4, quantize_fp8_rows

ACTIVATIONS = ("silu", "gelu_tanh")
# A CUDA graph may not replay these ops: the attention loops over the batch's sequences from the
# metadata's host lists, which a graph freezes at capture (its graphs carry empty ones).
CAPTURE_SAFE = False


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """x [num_tokens, in] @ weight.T (+ bias). With `weight_scale` ([out] float32), `weight` is fp8: x
    is quantized to fp8 per token as the fp8 matmul does, and the product of the dequantized values is
    taken in float32 (the reference of the tensor-core matmul)."""
    if weight_scale is None:
        return F.linear(x, weight, bias)
    x_fp8, x_scales = quantize_fp8_rows(x)
    out = (x_fp8.float() * x_scales) @ (weight.float() * weight_scale[:, None]).t()  # [num_tokens, out]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def prepare_int4(qweight: torch.Tensor) -> torch.Tensor:
    """A 4-bit weight as loaded -> as `int4_linear` reads it: here, the loaders' layout itself."""
    return qweight


def int4_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [num_tokens, in] @ W.T (+ bias) for a 4-bit W (`tgi_server.quantization`'s layout: qweight
    [out, in / 8], scales and zeros [out, in / group_size]), dequantized in float32 and rounded to x's
    dtype, as a W4A16 kernel does in registers."""
    return F.linear(x, dequantize_int4(qweight, scales, zeros, group_size).to(x.dtype), bias)


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lora: LoraRows, out: torch.Tensor) -> torch.Tensor:
    """`out` plus each adapted run of rows' B A x, a [slots, width, in], b [slots, out, width]: a
    product pair per run (the reference for the kernels' per-token gather). Rows known on the device
    only (a CUDA graph): every slot's product over every row, kept where the row's slot is that one."""
    if lora.segments is None:
        for slot in range(1, a.shape[0]):
            rows = (lora.token_slots == slot)[:, None]
            out += torch.where(rows, (x @ a[slot].T) @ b[slot].T, 0).to(out.dtype)
        return out
    for slot, start, stop in lora.segments:
        out[start:stop] += (x[start:stop] @ a[slot].T) @ b[slot].T
    return out


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, weight_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm over the last dim of x [num_tokens, width] (or of x + residual), in float32.

    Returns (normed, x + residual) with a residual, (normed, None) without one. With weight_offset 0
    the normalised values round to x's dtype before the scale multiplies (Llama); otherwise they are
    scaled by (weight_offset + weight) in float32 and rounded once (Gemma's 1 + w).
    """
    total = x + residual if residual is not None else None
    source = x if total is None else total
    x32 = source.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight_offset:
        return (normed * (weight.float() + weight_offset)).to(source.dtype), total
    return weight * normed.to(source.dtype), total


def gated_activation(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up of [num_tokens, 2 * width] (gate first) -> [num_tokens, width]; act is SiLU
    (SwiGLU) or tanh-approximated GELU (GeGLU)."""
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")


def route_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [num_tokens, num_experts] -> (weights [num_tokens, top_k] float32, expert ids
    [num_tokens, top_k]): the top_k experts of a softmax over all of them, in descending order, their
    weights rescaled to sum to 1 when `renormalize`."""
    probs = router_logits.float().softmax(dim=-1)  # [num_tokens, num_experts]
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden[t]): hidden [num_tokens, hidden_size],
    w13 [num_experts, 2 * width, hidden_size] ([gate | up] rows), w2 [num_experts, hidden_size, width],
    topk_weights float32 and topk_ids [num_tokens, top_k] -> [num_tokens, hidden_size].

    A loop over the experts that were picked (each runs on its tokens only), as transformers does.
    """
    out = torch.zeros_like(hidden)
    for expert in topk_ids.unique().tolist():
        tokens, slots = torch.where(topk_ids == expert)
        expert_out = linear(gated_activation(linear(hidden[tokens], w13[expert]), activation), w2[expert])
        weighted = expert_out * topk_weights[tokens, slots, None]
        out.index_add_(0, tokens, weighted.to(out.dtype))
    return out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    rotary,
    kv_cache: torch.Tensor,
    attn: AttentionMetadata,
    spec: KVCacheSpec,
    qk_norm=None,
) -> torch.Tensor:
    """RMS-norm each q and k head with `qk_norm` (the q and k RMSNorm layers; None: no QK-norm),
    rotate q and k, write k and v into the cache at `attn.slot_mapping`, then attend each sequence's
    new queries over its cached context (a loop over sequences, host lists only)."""
    if qk_norm is not None:
        q, k = (
            rms_norm(x.reshape(-1, x.shape[-1]), norm.weight, norm.eps, None, norm.weight_offset)[0].view(x.shape)
            for x, norm in zip((q, k), qk_norm)
        )
    q, k = rotary(positions, q, k)
    write_kv_cache(kv_cache, k, v, attn.slot_mapping)
    out = torch.empty_like(q)  # [num_tokens, num_heads, head_dim]
    starts = attn.query_start_loc_cpu
    for i, seq_len in enumerate(attn.seq_lens_cpu):
        context = gather_context(kv_cache, attn.block_tables[i], seq_len).to(q.dtype)
        out[starts[i] : starts[i + 1]] = attend(q[starts[i] : starts[i + 1]], context, spec)
    return out


def attend(q: torch.Tensor, context: torch.Tensor, spec: KVCacheSpec) -> torch.Tensor:
    """q [num_new, num_heads, head_dim] over context [2, seq_len, num_kv_heads, head_dim], the new
    tokens being the last of the sequence -> [num_new, num_heads, head_dim]."""
    mask = causal_mask(q.shape[0], context.shape[1], spec.sliding_window, q.device)  # [num_new, seq_len]
    if spec.logit_softcap is None:
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), context[0].transpose(0, 1), context[1].transpose(0, 1),
            attn_mask=mask, scale=spec.scale, enable_gqa=True,
        )  # [num_heads, num_new, head_dim]
        return out.transpose(0, 1)
    group = q.shape[1] // context.shape[2]
    keys, values = (context[i].repeat_interleave(group, dim=1) for i in range(2))  # [seq_len, num_heads, head_dim]
    scores = torch.einsum("qhd,khd->hqk", q.float(), keys.float()) * spec.scale  # [num_heads, num_new, seq_len]
    scores = spec.logit_softcap * torch.tanh(scores / spec.logit_softcap)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(q.dtype)
    return torch.einsum("hqk,khd->qhd", probs, values)


def write_kv_cache(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store each new token's k and v at its flat slot (block_id * block_size + offset), in the
    cache's dtype."""
    # [2, num_blocks * block_size, num_kv_heads, head_dim], a view: writes land in the cache
    slots = kv_cache.view(2, -1, *kv_cache.shape[3:])
    slots[0][slot_mapping] = k.to(kv_cache.dtype)  # (index_copy_ has no fp8 kernel on CPU)
    slots[1][slot_mapping] = v.to(kv_cache.dtype)


def gather_context(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first `seq_len` cached K/V of one sequence, in order: [2, seq_len, num_kv_heads, head_dim]."""
    num_blocks = -(-seq_len // kv_cache.shape[2])
    blocks = kv_cache[:, block_table[:num_blocks]]  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    return blocks.flatten(1, 2)[:, :seq_len]


def causal_mask(num_new: int, seq_len: int, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    """[num_new, seq_len] bool: True where query row r (at position seq_len - num_new + r) may attend the key.

    A query at position p sees keys 0..p; with a sliding window only keys above p - window.
    """
    query_pos = torch.arange(seq_len - num_new, seq_len, device=device).unsqueeze(1)  # [num_new, 1]
    key_pos = torch.arange(seq_len, device=device).unsqueeze(0)  # [1, seq_len]
    mask = key_pos <= query_pos
    if sliding_window is not None:
        mask &= key_pos > query_pos - sliding_window
    return mask

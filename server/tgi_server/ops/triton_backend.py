"""The Triton backend: the kernels of `tgi_server.kernels` for CUDA tensors (and, in tests, CPU
tensors under TRITON_INTERPRET=1). Same functions and results as `ops.portable`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tgi_server.attention_metadata import AttentionMetadata, KVCacheSpec
from tgi_server.forward_context import LoraRows
from tgi_server.kernels import fused, skinny, w4a16
from tgi_server.kernels import lora as lora_kernels
from tgi_server.kernels.attention import paged_attention
from tgi_server.kernels.moe import fused_moe, route_experts  # noqa: F401  (this backend's)

# Every op reads the batch layout from device tensors, so CUDA graphs replay them (`tgi_server.cuda_graphs`).
CAPTURE_SAFE = True


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """F.linear, except that a few rows go through the skinny kernel, which reads the weight faster
    than cuBLAS does at that size. An fp8 weight (with its `weight_scale`): a few rows through the
    skinny kernel, x in its own dtype (weight-only fp8); more rows quantized to fp8 per token on the
    fp8 tensor cores (`torch._scaled_mm`, row-wise scales; the activations quantized in one kernel), as the
    portable reference computes them."""
    if weight_scale is not None:
        if x.shape[0] <= skinny.FP8_DOT_MAX_ROWS and x.stride(-1) == 1:
            return skinny.fp8_gemv(x, weight, weight_scale, bias)
        if x.shape[0] <= skinny.MAX_ROWS and x.stride(-1) == 1:
            return skinny.skinny_linear(x, weight, bias, weight_scale=weight_scale)
        x_fp8, x_scales = fused.quantize_fp8_rows(x)
        out = torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scales, scale_b=weight_scale[None, :], out_dtype=x.dtype)
        return out if bias is None else out + bias
    if x.dim() == 2 and x.stride(-1) == 1 and x.shape[0] <= skinny.MAX_ROWS:
        return skinny.skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def prepare_int4(qweight: torch.Tensor) -> torch.Tensor:
    """A 4-bit weight as loaded -> as `int4_linear` reads it: the W4A16 kernels' layout (`w4a16.interleave`)."""
    return w4a16.interleave(qweight)


def int4_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The W4A16 kernel: the 4-bit weight (from `prepare_int4`) dequantized in registers, at any number of rows."""
    return w4a16.int4_linear(x, qweight, scales, zeros, group_size, bias)


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lora: LoraRows, out: torch.Tensor) -> torch.Tensor:
    """Every row through its own slot's adapter in two launches (`kernels.lora`): per token for a few
    rows, else in tiles of one adapter's rows (cut from the host's runs where one is long)."""
    return lora_kernels.lora_delta(x, a, b, lora.token_slots, out, lora.segments)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, weight_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return fused.rms_norm(x, weight, eps, residual, weight_offset)


def gated_activation(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    return fused.gated_activation(gate_up, activation)


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
    """One kernel norms q and k heads (with `qk_norm`), rotates q in place and writes rotated k and v
    into the cache; the paged attention kernels attend."""
    fused.rotary_and_write_cache(
        q, k, v, positions, rotary.inv_freq, rotary.attention_scaling, kv_cache, attn.slot_mapping, qk_norm
    )
    return paged_attention(q, kv_cache, attn, spec.scale, spec.sliding_window, spec.logit_softcap)

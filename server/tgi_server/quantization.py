"""fp8 (e4m3) quantization shared by the layers and both compute backends (`--quantize fp8`).

Weights are quantized once after loading, one scale per output row; activations are quantized on the
fly, one scale per token (row), so an outlier in one token or one output channel costs only its own row
precision. A value is stored as round(v / scale) in e4m3, whose largest finite value (448) is what
each row's absolute maximum maps to.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
# Where fp8 matmuls run on a GPU: compute capability 8.9 (Ada) and later.
MIN_FP8_CAPABILITY = (8, 9)


def quantize_fp8_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, cols] -> (e4m3 values [rows, cols], float32 scales [rows, 1]): values ~ e4m3 * scale."""
    scales = values.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX  # [rows, 1]
    return (values.float() / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scales


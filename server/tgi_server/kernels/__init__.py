"""Triton kernels for the GPU path: paged attention, fused RMSNorm, rotary + KV-cache write, SwiGLU.

The portable PyTorch code in `tgi_server.layers` is the reference; each kernel computes the same
function (tests compare them, on CPU through Triton's interpreter). Layers call `use_kernels(x)`
to pick the kernel for CUDA tensors unless custom kernels are disabled (`--disable-custom-kernels`)
or Triton is not installed. Tests run the kernels on CPU tensors with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import importlib.util

import torch

_disabled = False
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def disable_kernels(disabled: bool = True) -> None:
    """Use the portable PyTorch path everywhere (the server's `--disable-custom-kernels`)."""
    global _disabled
    _disabled = disabled


def use_kernels(x: torch.Tensor) -> bool:
    """Whether the Triton kernels should process `x`."""
    return x.is_cuda and TRITON_AVAILABLE and not _disabled

"""Programmatic dependent launch (PDL; Hopper and later) for the chain of short kernels a decode step is.

A kernel launched with PDL may start while the kernel before it in the stream still runs. Its programs
open with `wait_for_previous`: they let the next kernel launch in turn (`gdc_launch_dependents`), then
wait until the previous kernel has finished and its writes are visible (`gdc_wait`), before they read or
write anything. What overlaps is the launching: the gap between one kernel's last programs and the next
one's first. A kernel that opens with `wait_for_previous` is correct with or without PDL; one launched
with PDL must open with it.

Off unless TGI_PDL=1 while it is measured (bench/pdl.py, bench/shard_step.py); never under Triton's
interpreter, which has no griddepcontrol.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

ENABLED = os.environ.get("TGI_PDL") == "1" and os.environ.get("TRITON_INTERPRET") != "1"


def enabled(tensor: torch.Tensor) -> bool:
    """Whether kernels on `tensor`'s device launch with PDL: on, and a CUDA device of compute capability 9+."""
    return ENABLED and tensor.is_cuda and _supports_pdl(tensor.device)


@functools.cache
def _supports_pdl(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()

"""Programmatic dependent launch (PDL; Hopper and later) for the chain of short kernels a decode step is.

A kernel launched with PDL may start while the kernel before it in the stream still runs. Its programs
open with `wait_for_previous`: they let the next kernel launch in turn (`launch_next`), then wait until
the previous kernel has finished and its writes are visible (`wait_previous`), before they read or write
anything that a kernel writes. What overlaps is the launching (the gap between one kernel's last programs
and the next one's first) and whatever a program reads before it waits: a linear's first weight tile
(`kernels.skinny`). A kernel that waits so is correct with or without PDL; one launched with PDL must.

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


def options(tensor: torch.Tensor) -> dict[str, bool]:
    """A kernel's `PDL` constexpr and Triton's `launch_pdl` option, always equal: on for kernels on
    `tensor`'s device when PDL is on and the device is CUDA of compute capability 9+."""
    on = ENABLED and tensor.is_cuda and _supports_pdl(tensor.device)
    return {"PDL": on, "launch_pdl": on}


@functools.cache
def _supports_pdl(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    launch_next(PDL)
    wait_previous(PDL)


@triton.jit
def launch_next(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait_previous(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()

"""The compute backend of a model's layers, chosen once when the model is built.

Two sibling modules offer the same functions (`linear`, `rms_norm`, `gated_activation`,
`route_experts`, `fused_moe`, `attention`, `lora_delta`): `ops.portable` (PyTorch, any device; the reference) and
`ops.triton_backend` (the Triton kernels of `tgi_server.kernels`, for CUDA). A layer calls `select_ops(device)` in its
constructor and keeps the module it gets, so no forward pass branches on the backend.
`building_with(name)` forces one backend for the models built inside it (`--disable-custom-kernels`
builds with "portable"; tests build with "triton" on CPU under Triton's interpreter).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Iterator
from types import ModuleType

import torch

_MODULES = {"portable": "tgi_server.ops.portable", "triton": "tgi_server.ops.triton_backend"}
BACKENDS = tuple(_MODULES)
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
_forced: str | None = None


def default_backend(device: torch.device) -> str:
    """"triton" for CUDA devices when Triton is installed, else "portable"."""
    return "triton" if device.type == "cuda" and TRITON_AVAILABLE else "portable"


def select_ops(device: torch.device) -> ModuleType:
    """The backend module for a layer built on `device` (the forced one inside `building_with`)."""
    return importlib.import_module(_MODULES[_forced or default_backend(device)])


@contextlib.contextmanager
def building_with(backend: str | None) -> Iterator[None]:
    """Layers constructed inside the block use `backend` (None: the device's default)."""
    global _forced
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    previous, _forced = _forced, backend
    try:
        yield
    finally:
        _forced = previous

"""`--env`: the runtime environment as text, for bug reports (TGI's `text-generation-launcher --env`).

Versions come from package metadata, so nothing heavy (torch) is imported; the GPUs from `nvidia-smi`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import shutil
import subprocess

from tgi_launcher.config import LauncherConfig
from tgi_proto.settings import masked

PACKAGES = ("tgi-py", "torch", "transformers", "huggingface-hub", "safetensors", "tokenizers", "triton")
NVIDIA_SMI_TIMEOUT_SECONDS = 30


def environment_report(config: LauncherConfig) -> str:
    """Platform, package versions, visible GPUs and the resolved configuration (the API key and the
    shard secret hidden)."""
    lines = [
        "Runtime environment:",
        f"Target: {platform.machine()}-{platform.system().lower()}",
        f"Python: {platform.python_version()} ({platform.python_implementation()})",
    ]
    lines += [f"{package}: {_version(package)}" for package in PACKAGES]
    lines.append(f"CUDA_VISIBLE_DEVICES: {os.environ.get('CUDA_VISIBLE_DEVICES', 'N/A')}")
    lines.append(f"nvidia-smi:\n{_nvidia_smi()}")
    config = dataclasses.replace(config, router=masked(config.router), shard=masked(config.shard))
    lines.append(f"Configuration: {config}")
    return "\n".join(lines)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _nvidia_smi() -> str:
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return "N/A"
    try:
        result = subprocess.run([executable], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"N/A ({error})"
    return result.stdout.rstrip() if result.returncode == 0 else f"N/A (exit code {result.returncode})"

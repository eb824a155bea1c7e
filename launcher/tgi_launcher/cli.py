"""`text-generation-launcher`: resolve the model, start one shard per GPU and the router, supervise.

Every option can also be set through the environment variable TGI uses for it (MODEL_ID, NUM_SHARD,
MAX_INPUT_LENGTH, ...). Any child dying takes everything down with a non-zero exit; SIGTERM or SIGINT
stops the router, then the shards, and exits 0.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Optional

import typer

from tgi_launcher import shards
from tgi_launcher.config import (
    LauncherConfig,
    default_model_id,
    free_port,
    num_visible_gpus,
    prepare_argv,
    router_argv,
    shard_argv,
    shard_env,
)

log = logging.getLogger("tgi_launcher")
app = typer.Typer(add_completion=False, help=__doc__)

DEFAULT_UDS_PATH = "/tmp/text-generation-server"


@app.command()
def launch(
    model_id: Optional[str] = typer.Option(None, envvar="MODEL_ID", help="Hub id, local directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)."),
    revision: Optional[str] = typer.Option(None, envvar="REVISION", help="Hub revision: branch, tag or commit."),
    num_shard: Optional[int] = typer.Option(None, envvar="NUM_SHARD", help="Shards (one per GPU); default: visible GPUs, or 1."),
    dtype: Optional[str] = typer.Option(None, envvar="DTYPE", help="float16, bfloat16 or float32 (default: bfloat16 on GPU, float32 on CPU)."),
    max_concurrent_requests: int = typer.Option(128, envvar="MAX_CONCURRENT_REQUESTS", help="In-flight requests before 429."),
    max_best_of: int = typer.Option(2, envvar="MAX_BEST_OF", help="Largest `best_of`."),
    max_stop_sequences: int = typer.Option(4, envvar="MAX_STOP_SEQUENCES", help="Most `stop` sequences per request."),
    max_top_n_tokens: int = typer.Option(5, envvar="MAX_TOP_N_TOKENS", help="Largest `top_n_tokens`."),
    max_input_tokens: Optional[int] = typer.Option(None, "--max-input-tokens", "--max-input-length", envvar=["MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH"], help="Longest prompt in tokens (default: max_total_tokens - 1)."),
    max_total_tokens: Optional[int] = typer.Option(None, envvar="MAX_TOTAL_TOKENS", help="Longest prompt + generation (default: from the model and the KV cache)."),
    max_batch_prefill_tokens: Optional[int] = typer.Option(None, envvar="MAX_BATCH_PREFILL_TOKENS", help="Tokens computed in one step (default 4096)."),
    max_batch_total_tokens: Optional[int] = typer.Option(None, envvar="MAX_BATCH_TOTAL_TOKENS", help="KV cache size in tokens (default: what fits after warmup)."),
    max_batch_size: Optional[int] = typer.Option(None, envvar="MAX_BATCH_SIZE", help="Requests per step (default: max_concurrent_requests)."),
    hostname: str = typer.Option("0.0.0.0", envvar="HOSTNAME", help="Address the HTTP server binds."),
    port: int = typer.Option(3000, "--port", "-p", envvar="PORT", help="HTTP port."),
    shard_uds_path: Optional[str] = typer.Option(None, envvar="SHARD_UDS_PATH", help=f"Shard socket prefix; shards bind {{path}}-{{rank}} (default: {DEFAULT_UDS_PATH}-<pid>)."),
    master_addr: str = typer.Option("localhost", envvar="MASTER_ADDR", help="torch.distributed rendezvous address."),
    master_port: Optional[int] = typer.Option(None, envvar="MASTER_PORT", help="torch.distributed rendezvous port (default: 29500, or a free port with several shards)."),
    shard_ready_timeout: float = typer.Option(600, envvar="SHARD_READY_TIMEOUT", help="Seconds each shard may take to load."),
):
    """Serve a model: weights, shards, router."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s launcher %(levelname)s %(message)s")
    try:
        config = LauncherConfig(
            model_id=model_id or default_model_id(),
            revision=revision,
            num_shard=num_shard if num_shard is not None else max(num_visible_gpus(), 1),
            dtype=dtype,
            max_concurrent_requests=max_concurrent_requests,
            max_best_of=max_best_of,
            max_stop_sequences=max_stop_sequences,
            max_top_n_tokens=max_top_n_tokens,
            max_input_tokens=max_input_tokens,
            max_total_tokens=max_total_tokens,
            max_batch_prefill_tokens=max_batch_prefill_tokens,
            max_batch_total_tokens=max_batch_total_tokens,
            max_batch_size=max_batch_size,
            hostname=hostname,
            port=port,
            # Unique defaults, so two launchers on one host do not collide.
            shard_uds_path=shard_uds_path or f"{DEFAULT_UDS_PATH}-{os.getpid()}",
            master_addr=master_addr,
            master_port=master_port or (free_port() if (num_shard or 1) > 1 else 29500),
            shard_ready_timeout=shard_ready_timeout,
        )
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2)
    raise typer.Exit(run(config))


def run(config: LauncherConfig) -> int:
    """Starts everything and supervises it; returns the process exit code."""
    stop_requested = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop_requested.set())
    prepared = _prepare(config)
    if prepared is None:
        return 1
    model_path, tokenizer_path = prepared
    children = [
        shards.Child.start(f"shard {rank}", shard_argv(config, model_path, rank), shard_env(config, rank))
        for rank in range(config.num_shard)
    ]
    try:
        shards.wait_for_sockets(children, config.socket_paths, config.shard_ready_timeout, stop_requested)
        if stop_requested.is_set():
            return 0
        log.info("all %d shard(s) ready; starting the router on %s:%d", config.num_shard, config.hostname, config.port)
        children.insert(0, shards.Child.start("router", router_argv(config, tokenizer_path)))
        dead = shards.wait_for_exit(children, stop_requested)
    except RuntimeError as error:
        log.error("%s", error)
        return 1
    finally:
        shards.stop_all(children)  # the router is first, so it stops before the shards
        shards.remove_files(config.socket_paths)
    if dead is None:
        log.info("stopped")
        return 0
    log.error("%s terminated with exit code %s; shutting down", dead.name.capitalize(), dead.exit_code)
    return 1


def _prepare(config: LauncherConfig) -> tuple[str, str] | None:
    """Runs `text-generation-server prepare`; returns (model_path, tokenizer_path)."""
    log.info("preparing %s", config.model_id)
    result = subprocess.run(prepare_argv(config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        log.error("could not prepare model %s (exit code %d)", config.model_id, result.returncode)
        return None
    prepared = json.loads(result.stdout.strip().splitlines()[-1])
    return prepared["model_path"], prepared["tokenizer_path"]


def main() -> None:
    app()

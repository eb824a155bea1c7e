"""`text-generation-launcher recommend`: a configuration for a model on given GPUs, computed offline.

TGI answers this with a cloud API; here it is arithmetic on the model's config.json:
- weights: the parameter count (from the architecture's shapes) times the dtype size, split over shards;
  the attention and dense MLP projections of a quantized checkpoint (`quantization_config`) at their
  stored size: 1 byte per weight for fp8, half a byte plus the group's scale and zero for 4-bit;
- KV cache: 2 (K and V) x layers x kv heads x head dim x dtype size per token;
- headroom: CUDA context and the activations of one `max_batch_prefill_tokens` prefill.
The answer has the shape of TGI's recommender: model_id, instance and configuration.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GIB = 1 << 30
DTYPE_BYTES = 2  # bfloat16 / float16 serving
USABLE_FRACTION = 0.9  # of each GPU's memory (the rest: CUDA context, allocator slack)
MAX_PREFILL_TOKENS = 4096


# model types whose transformers config ties the LM head to the embedding when config.json is silent
TIED_BY_DEFAULT = ("gemma", "gemma2", "gemma3_text")


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    # mixture of experts: experts per layer (0: a dense MLP) and each expert's intermediate size
    num_experts: int = 0
    expert_intermediate_size: int = 0

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        heads = config["num_attention_heads"]
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            tie_word_embeddings=config.get("tie_word_embeddings", config.get("model_type") in TIED_BY_DEFAULT),
            num_experts=config.get("num_local_experts") or config.get("num_experts") or 0,
            expert_intermediate_size=config.get("moe_intermediate_size") or config["intermediate_size"],
        )

    @property
    def num_parameters(self) -> int:
        """Embedding, LM head (unless tied), attention and gated-MLP weights (every expert's and the
        router's in a mixture of experts), norms."""
        hidden, attention_width = self.hidden_size, self.num_heads * self.head_dim
        kv_width = self.num_kv_heads * self.head_dim
        attention = hidden * attention_width * 2 + hidden * kv_width * 2
        mlp = 3 * hidden * self.intermediate_size
        if self.num_experts:
            mlp = self.num_experts * (3 * hidden * self.expert_intermediate_size + hidden)
        embeddings = self.vocab_size * hidden * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_layers * (attention + mlp + 2 * hidden) + hidden

    @property
    def num_projection_parameters(self) -> int:
        """The attention and dense MLP projections: what a quantized checkpoint stores quantized."""
        hidden, kv_width = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = hidden * self.num_heads * self.head_dim * 2 + hidden * kv_width * 2
        mlp = 0 if self.num_experts else 3 * hidden * self.intermediate_size
        return self.num_layers * (attention + mlp)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES

    def activation_bytes(self, num_tokens: int) -> int:
        """Peak activations of a prefill of `num_tokens` (the MLP's gate/up output dominates, plus
        the float32 logits of one row per request)."""
        return num_tokens * (4 * self.hidden_size + 2 * self.intermediate_size) * DTYPE_BYTES


def projection_bytes_per_weight(quantization_config: dict | None) -> tuple[float, str | None]:
    """(bytes per stored projection weight, the quantization's name) of a checkpoint's
    `quantization_config`: fp8 1 byte; 4-bit half a byte and a 16-bit scale and zero per group."""
    if not quantization_config:
        return DTYPE_BYTES, None
    method = quantization_config.get("quant_method")
    bits, group_size = quantization_config.get("bits"), quantization_config.get("group_size")
    if method == "compressed-tensors":
        groups = list((quantization_config.get("config_groups") or {}).values())
        weights = (groups[0].get("weights") or {}) if groups else {}
        bits, group_size = weights.get("num_bits"), weights.get("group_size")
    elif method in ("fp8", "fbgemm_fp8"):
        bits = 8
    if bits == 8:
        return 1, method
    if bits == 4:
        return 0.5 + (2 * DTYPE_BYTES / group_size if group_size and group_size > 0 else 0), method
    return DTYPE_BYTES, method


def weight_bytes(config: dict) -> tuple[int, str | None]:
    """(bytes of all the model's weights as served, the checkpoint's quantization or None)."""
    shape = ModelShape.from_config(config)
    per_projection_weight, quantization = projection_bytes_per_weight(config.get("quantization_config"))
    projections = shape.num_projection_parameters
    return int((shape.num_parameters - projections) * DTYPE_BYTES + projections * per_projection_weight), quantization


def recommend(model_id: str, config: dict, gpu_memory_gib: float, num_gpus: int, num_nodes: int = 1) -> dict:
    """The smallest tensor-parallel degree (that attention splits over) that holds the model with
    room for a full context: within one node if it can be, the node's other GPUs then running
    data-parallel replicas; else over the fewest whole nodes, a pipeline stage on each (tensor parallel
    stays inside a node). Several nodes each run such a deployment unless one spans them. ValueError
    when even all the GPUs cannot hold it."""
    shape = ModelShape.from_config(config)
    total_weight_bytes, quantization = weight_bytes(config)
    prefill_tokens = min(MAX_PREFILL_TOKENS, shape.max_position_embeddings)
    layouts = [(num_shard, 1) for num_shard in _shard_counts(num_gpus)]
    layouts += [(nnodes * num_gpus, nnodes) for nnodes in range(2, num_nodes + 1)]
    for num_shard, nnodes in layouts:
        tensor_parallel = num_shard // nnodes  # across nodes: a pipeline stage per node, tensor parallel inside
        if tensor_parallel > shape.num_kv_heads and (tensor_parallel % shape.num_kv_heads or shape.num_heads % tensor_parallel):
            continue  # attention cannot split (see `TPGroup.head_partition`)
        usable = num_shard * gpu_memory_gib * GIB * USABLE_FRACTION
        free = usable - total_weight_bytes - num_shard * shape.activation_bytes(prefill_tokens)
        kv_tokens = int(free // shape.kv_bytes_per_token) if free > 0 else 0
        if kv_tokens < min(shape.max_position_embeddings, prefill_tokens + 1):
            continue
        max_total = min(shape.max_position_embeddings, kv_tokens)
        estimate = total_weight_bytes + num_shard * shape.activation_bytes(prefill_tokens) + max_total * shape.kv_bytes_per_token
        replicas = num_gpus // num_shard if nnodes == 1 else 1
        deployments = num_nodes // nnodes
        return {
            "model_id": model_id,
            "instance": _instance(num_shard, nnodes, replicas, deployments, num_gpus, gpu_memory_gib),
            "configuration": {
                "max_batch_prefill_tokens": min(prefill_tokens, max_total - 1),
                "max_input_length": max_total - 1,
                "max_total_tokens": max_total,
                "num_shard": num_shard,
                "pipeline_parallel_size": nnodes,
                "data_parallel_size": replicas,
                "nnodes": nnodes,
                "deployments": deployments,
                "quantize": quantization,
                "estimated_memory_in_gigabytes": round(estimate / GIB, 2),
            },
        }
    needed = (total_weight_bytes + shape.activation_bytes(MAX_PREFILL_TOKENS)) / GIB / USABLE_FRACTION
    raise ValueError(
        f"{model_id} needs about {needed:.0f} GiB of GPU memory{'' if quantization else ' in bf16'}; "
        f"{num_nodes} node(s) of {num_gpus} GPU(s) of {gpu_memory_gib:g} GiB are not enough"
    )


def _instance(num_shard: int, nnodes: int, replicas: int, deployments: int, num_gpus: int, gpu_memory_gib: float) -> str:
    """What runs where, in words: "2x GPU with 80 GiB", "2 replicas of 4x GPU ...", "2 nodes of 8x GPU ..."."""
    gpus = f"{num_shard}x GPU with {gpu_memory_gib:g} GiB"
    if nnodes > 1:
        text = (f"{nnodes} nodes of {num_gpus}x GPU with {gpu_memory_gib:g} GiB, one deployment of {num_shard} shards: "
                f"{nnodes} pipeline stages of {num_gpus}")
    elif replicas > 1:
        text = f"{replicas} replicas of {gpus} on each node"
    else:
        text = gpus
    return text + (f"; {deployments} such deployments" if deployments > 1 else "")


def _gguf_config(path: Path) -> dict:
    """The config.json fields `ModelShape` reads, from a GGUF file's metadata (llama.cpp's names)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = reader.fields
    arch = fields["general.architecture"].contents()

    def value(name: str, default=None):
        field = fields.get(f"{arch}.{name}")
        return field.contents() if field is not None else default

    heads = value("attention.head_count")
    return {
        "vocab_size": len(fields["tokenizer.ggml.tokens"].data),
        "hidden_size": value("embedding_length"),
        "intermediate_size": value("feed_forward_length"),
        "num_hidden_layers": value("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": value("attention.head_count_kv", heads),
        "max_position_embeddings": value("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in {tensor.name for tensor in reader.tensors},
    }


def _shard_counts(num_gpus: int) -> list[int]:
    """1, 2, 4, ... up to num_gpus, then num_gpus itself: the tensor-parallel degrees worth trying."""
    counts = [1]
    while counts[-1] * 2 <= num_gpus:
        counts.append(counts[-1] * 2)
    return counts if counts[-1] == num_gpus else [*counts, num_gpus]


def load_config(model_id: str, revision: str | None = None) -> dict:
    """config.json of a local directory, the metadata of a `.gguf` file, or config.json of a hub
    model (fetched with huggingface_hub). A local path that does not exist is an OSError naming it."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        return json.loads((path / "config.json").read_text())
    if path.suffix == ".gguf" or model_id.startswith(("/", "./", "../", "~")):
        if path.suffix != ".gguf" or not path.is_file():
            raise FileNotFoundError(f"no such file or directory: {path} (a directory with config.json or a .gguf file)")
        return _gguf_config(path)
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(model_id, "config.json", revision=revision)).read_text())

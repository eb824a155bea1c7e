"""Architecture name -> model class, and building a loaded model from a checkpoint path."""

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from tgi_proto.settings import LOAD_FORMATS
from tgi_server.distributed import TPGroup
from tgi_server.layers.linear import quantize_linears
from tgi_server.layers.norm import RMSNorm
from tgi_server.models.gemma import Gemma3TextOnlyForCausalLM, GemmaForCausalLM
from tgi_server.models.architectures import IN_PROJECT_ARCHITECTURES
from tgi_server.models.llama import LlamaForCausalLM
from tgi_server.models.mixtral import MixtralForCausalLM
from tgi_server.ops import building_with, select_ops
from tgi_server.quantization import FP8_DTYPE, FP8_MAX, MIN_FP8_CAPABILITY, WeightFormat, building_with_weights, weight_format
from tgi_server.weights import LoadProgress, UnsetWeights, load_config, open_weights

ARCHITECTURES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Phi3ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen3MoeForCausalLM": MixtralForCausalLM,
    "GemmaForCausalLM": GemmaForCausalLM,
    "Gemma2ForCausalLM": GemmaForCausalLM,
    "Gemma3ForCausalLM": GemmaForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3TextOnlyForCausalLM,  # text only
}


if set(ARCHITECTURES) != IN_PROJECT_ARCHITECTURES:  # prepare's torch-free copy of the names
    raise ImportError(f"architectures.py and ARCHITECTURES differ: {sorted(set(ARCHITECTURES) ^ IN_PROJECT_ARCHITECTURES)}")


def model_architecture(config: PretrainedConfig) -> str:
    """`architectures[0]`; GGUF configs carry none, so fall back to the causal-LM class of model_type."""
    if config.architectures:
        return config.architectures[0]
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, config.model_type)


class UnsupportedModelError(ValueError):
    """A model this server has no code for, or an unknown load format."""


def model_class(architecture: str, num_shard: int = 1) -> type:
    """The in-project class for `architecture`, else transformers' own through the fallback (several
    shards where transformers has a tensor-parallel plan for it); UnsupportedModelError naming what
    is supported otherwise."""
    if architecture in ARCHITECTURES:
        return ARCHITECTURES[architecture]
    # Imported only for the fallback: its transformers modules add most of a second to every shard's start.
    from tgi_server.models.transformers_fallback import TransformersCausalLM, fallback_class, has_tensor_parallel_plan

    if fallback_class(architecture) is None:
        raise UnsupportedModelError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(sorted(ARCHITECTURES))}, "
            "and transformers causal LMs that accept a registered attention function"
        )
    if num_shard > 1 and not has_tensor_parallel_plan(architecture):
        raise UnsupportedModelError(
            f"{architecture} runs on the transformers fallback and transformers has no tensor-parallel plan "
            "for it; use --num-shard 1"
        )
    return TransformersCausalLM


def implementation(architecture: str) -> str:
    """"in-project" or "transformers": which code runs the model (shown in /info and the log)."""
    return "in-project" if architecture in ARCHITECTURES else "transformers"


def check_architecture(architecture: str, num_shard: int = 1) -> None:
    model_class(architecture, num_shard)


def load_model(
    model_path: str,
    tp: TPGroup,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str = "auto",
    backend: str | None = None,
    quantize: str | None = None,
) -> tuple[nn.Module, PretrainedConfig]:
    """Build this rank's shard of the model at `model_path` and load its weights.

    `model_path` is a local directory with config.json and *.safetensors, or a `.gguf` file. With
    `load_format="dummy"` only the config is read and the weights are random (for sizing and
    benchmarking models whose weights are not at hand). `backend` forces the layers' compute backend
    ("portable" or "triton", see `tgi_server.ops`); None picks the device's default.
    A checkpoint stored quantized (config.json's `quantization_config`: fp8, AWQ, GPTQ,
    compressed-tensors) loads into quantized linears as it is stored; `quantize="fp8"` turns a plain
    checkpoint's linears to fp8 after loading (`quantize_linears`), and the other `quantize` values
    only name the checkpoint's own format. Quantizations this server lacks raise
    QuantizationConfigError, and the transformers fallback, quantized MoE experts and GPUs without
    fp8 matmuls UnsupportedModelError, all before any weight is read.
    An architecture not in `ARCHITECTURES` runs on transformers' own class (`transformers_fallback`).
    Raises UnsupportedModelError for an architecture neither supports, WeightShapeError for a
    tensor whose shape disagrees with the config, KeyError for a missing one.
    """
    config = load_config(model_path)
    architecture = model_architecture(config)
    model_cls = model_class(architecture, tp.world_size)
    is_fallback = architecture not in ARCHITECTURES
    if is_fallback and tp.stage is not None:
        raise UnsupportedModelError(f"{architecture} runs on the transformers fallback, which has no pipeline "
                                    "stages: pipeline parallel needs an in-project model")
    if load_format not in LOAD_FORMATS:  # ShardSettings checks this already; other callers may not
        raise UnsupportedModelError(f"unknown load format {load_format!r}; choose one of {', '.join(LOAD_FORMATS)}")
    is_dummy = load_format == "dummy"
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None and not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    found = weight_format(quantization, quantize, tp.world_size)
    if found is not None:
        _check_quantized_model(found, model_cls, is_fallback, device)
    with building_with(backend), building_with_weights(found):
        if is_fallback:  # transformers reads its own checkpoints
            model = model_cls(config, tp, dtype, device, None if is_dummy else model_path)
        else:
            model = model_cls(config, tp, dtype, device)
        if not select_ops(device).CAPTURE_SAFE:  # --disable-custom-kernels on a GPU
            model.supports_cuda_graphs = False
    if is_dummy:
        if not is_fallback and found is None:  # quantized layouts check their stored values: filled only
            model.load_weights(UnsetWeights(dtype, device))
        fill_random_weights(model, seed=tp.rank)
    elif not is_fallback:
        source = open_weights(model_path, config, dtype)
        progress = LoadProgress(source, f"rank {tp.rank}: loading weights" if tp.world_size > 1 else "loading weights")
        model.load_weights(progress)
        progress.done()
    if found is not None and not found.checkpoint:
        quantize_linears(model)
    return model.eval(), model.config  # a multimodal checkpoint's text config where only its text model runs


def _check_quantized_model(found: WeightFormat, model_cls: type, is_fallback: bool, device: torch.device) -> None:
    """Refuses, before any weight is read, quantized weights that this model or device cannot run."""
    how = "--quantize fp8" if not found.checkpoint else f"a {found.name}-quantized checkpoint"
    if is_fallback:
        raise UnsupportedModelError(f"{how} needs an in-project model; this architecture runs on the transformers fallback")
    if found.checkpoint and model_cls is MixtralForCausalLM:
        raise UnsupportedModelError(f"{how} of a mixture-of-experts model is not supported yet: its experts are quantized")
    if not found.is_int4 and device.type == "cuda" and torch.cuda.get_device_capability(device) < MIN_FP8_CAPABILITY:
        capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise UnsupportedModelError(f"{how} needs a GPU of compute capability 8.9 or later (Ada, Hopper) for fp8 "
                                    f"matmuls; {torch.cuda.get_device_name(device)} is {capability}")


@torch.no_grad()
def fill_random_weights(model: nn.Module, seed: int) -> None:
    """Norm scales 1 (a stored 0 where the norm scales by 1 + w), every other weight uniform in
    [-1e-3, 1e-3] (small, so activations stay finite through any depth), drawn on the parameter's
    device; quantized weights get random codes whose scales make them as small."""
    generator = None
    norm_weights = {id(m.weight): 1.0 - m.weight_offset for m in model.modules() if isinstance(m, RMSNorm)}
    for parameter in model.parameters():
        if generator is None:
            generator = torch.Generator(device=parameter.device).manual_seed(seed)
        if id(parameter) in norm_weights:
            parameter.fill_(norm_weights[id(parameter)])
        elif parameter.dtype == torch.int32:  # 4-bit codes, eight to an int32
            parameter.random_(generator=generator)
        elif parameter.dtype == FP8_DTYPE:
            parameter.copy_(torch.empty(parameter.shape, device=parameter.device).uniform_(-FP8_MAX, FP8_MAX, generator=generator))
        else:
            parameter.uniform_(-1e-3, 1e-3, generator=generator)
    for layer in model.modules():  # the scales that bring those codes to about 1e-3
        if getattr(layer, "weight_scale", None) is not None:
            layer.weight_scale.fill_(1e-3 / FP8_MAX)
        if getattr(layer, "qweight", None) is not None:
            layer.scales.fill_(1e-3 / 8)
            layer.zeros.fill_(8)

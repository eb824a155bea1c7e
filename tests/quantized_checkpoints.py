"""Tiny quantized checkpoints in the formats people publish, each beside the float32 model it stands for.

`save_quantized(config, tokenizer_dir, out, fmt)` writes a random model of `config` quantized as `fmt`
(config.json's `quantization_config` and the format's tensors) and returns the reference: transformers'
model whose weights are the checkpoint's, dequantized. Nothing here uses the server's code:
* compressed-tensors checkpoints are made, and dequantized, by the `compressed-tensors` library itself;
* AWQ, GPTQ, FBGEMM fp8 and AutoFP8 tensors are packed here from the formats' documented layouts
  (AutoAWQ's `WQLinear_GEMM`, AutoGPTQ's `QuantLinear`, and the fp8 `weight`/`weight_scale` pairs).
For fp8 weights the reference also rounds each projection's input to fp8 per token, as the served
model does (dynamic activation scales), so greedy outputs agree token for token.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# AutoAWQ packs outputs 0 2 4 6 1 3 5 7 of each eight into one int32, lowest nibble first.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)

FORMATS = (
    "awq", "gptq", "gptq-act-order", "gptq-per-channel", "ct-w4a16", "ct-w4a16-sym",
    "ct-fp8-channel", "ct-fp8-tensor", "fbgemm-fp8", "fp8-per-tensor",
)


def save_quantized(config, tokenizer_dir: Path, out: Path, fmt: str, group_size: int = 32, weight_std: float | None = None):
    """Writes the checkpoint and returns the reference transformers model (float32, eval). With
    `weight_std`, weights are drawn with that spread (norm scales near 1) instead of transformers'
    initialisation, for logits far enough apart to survive bfloat16."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if weight_std is not None:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(1.0 + 0.1 * torch.randn_like(parameter) if "norm" in name else torch.randn_like(parameter) * weight_std)
    out.mkdir(parents=True, exist_ok=True)
    if fmt.startswith("ct-"):
        model = _save_compressed_tensors(model, out, fmt, group_size)
    else:
        tensors, quantization_config, input_orders = {}, None, {}
        for name, tensor in model.state_dict().items():
            module, _, leaf = name.rpartition(".")
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # the embeddings, as transformers saves a tied head
            if leaf != "weight" or module.rpartition(".")[2] not in PROJECTIONS:
                tensors[name] = tensor.clone().contiguous()
                continue
            # Projections of one input share act-order's input order (it follows that input's statistics).
            shared_input = module.rpartition(".")[0] + {"k_proj": ".q_proj", "v_proj": ".q_proj", "up_proj": ".gate_proj"}.get(
                module.rpartition(".")[2], "." + module.rpartition(".")[2])
            order = input_orders.setdefault(shared_input, torch.randperm(tensor.shape[1]))
            stored, dequantized, quantization_config = _quantize(tensor, fmt, group_size, order)
            tensors.update({f"{module}.{key}": value.contiguous() for key, value in stored.items()})
            tensor.copy_(dequantized)  # the reference holds what the checkpoint means
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        config.quantization_config = quantization_config
        config.save_pretrained(out)
        del config.quantization_config
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    if "fp8" in fmt:
        _round_projection_inputs_to_fp8(model)
    return model


def _quantize(weight: torch.Tensor, fmt: str, group_size: int, order: torch.Tensor):
    """(tensors to store under the projection's prefix, the dequantized weight, quantization_config);
    `order`: act-order's permutation of the inputs."""
    out_features, in_features = weight.shape
    if fmt in ("fbgemm-fp8", "fp8-per-tensor"):
        per_row = fmt == "fbgemm-fp8"
        scale = (weight.abs().amax(dim=1, keepdim=True) if per_row else weight.abs().amax()) / FP8_MAX
        values = (weight / scale).to(FP8)
        if per_row:
            stored = {"weight": values, "weight_scale": scale.float()}  # [out, 1]
            config = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]}
        else:
            stored = {"weight": values, "weight_scale": scale.reshape(()), "input_scale": torch.tensor(0.05)}
            config = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}
        return stored, values.float() * scale, config
    per_channel = fmt == "gptq-per-channel"
    group = in_features if per_channel else group_size
    num_groups = in_features // group
    if fmt == "gptq-act-order":  # groups of inputs chosen by a permutation, as act-order GPTQ leaves them
        group_index = torch.empty(in_features, dtype=torch.int64)
        group_index[order] = torch.arange(in_features) // group
    else:
        group_index = torch.arange(in_features) // group
    symmetric = fmt.startswith("gptq")
    q, scales, zeros = _quantize_int4(weight, group_index, num_groups, symmetric)
    if fmt == "awq":
        stored = {"qweight": _pack_along_columns(q.t(), AWQ_ORDER), "qzeros": _pack_along_columns(zeros.t(), AWQ_ORDER),
                  "scales": scales.t().half()}
        config = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    else:
        stored = {"qweight": _pack_along_columns(q, range(8)).t(),  # [in / 8, out]: eight inputs per int32
                  "qzeros": _pack_along_columns(zeros.t() - 1, range(8)),  # stored one below, as GPTQ does
                  "scales": scales.t().half(), "g_idx": group_index.int()}
        config = {"quant_method": "gptq", "bits": 4, "group_size": -1 if per_channel else group,
                  "desc_act": fmt == "gptq-act-order", "sym": True, "checkpoint_format": "gptq"}
    scale = scales.half().float()[:, group_index]  # the reference uses the stored (float16) scales
    return stored, (q - zeros[:, group_index]) * scale, config


def _quantize_int4(weight, group_index, num_groups, symmetric):
    """q [out, in] in 0..15, scales and zeros [out, groups]: w ~ (q - zero) * scale per group of inputs."""
    scales = torch.empty(weight.shape[0], num_groups)
    zeros = torch.empty(weight.shape[0], num_groups)
    for group in range(num_groups):
        members = weight[:, group_index == group]
        if symmetric:
            scales[:, group] = members.abs().amax(dim=1) / 7
            zeros[:, group] = 8
        else:
            low, high = members.amin(dim=1).clamp(max=0), members.amax(dim=1).clamp(min=0)
            scales[:, group] = (high - low) / 15
            zeros[:, group] = (-low / scales[:, group]).round().clamp(1, 15)
    scales = scales.half().float()
    q = (weight / scales[:, group_index]).round() + zeros[:, group_index]
    return q.clamp(0, 15), scales, zeros


def _pack_along_columns(values: torch.Tensor, order) -> torch.Tensor:
    """[rows, cols] of 0..15 -> [rows, cols / 8] int32: nibble i (bits 4i) of word j holds column 8j + order[i]."""
    values = values.to(torch.int64)
    words = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for nibble, column in enumerate(order):
        words |= values[:, column::8] << (4 * nibble)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _save_compressed_tensors(model, out: Path, fmt: str, group_size: int):
    """Quantizes `model` with compressed-tensors, saves the compressed checkpoint, and returns a plain
    model of the weights the library decompresses it back to."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs, QuantizationConfig, QuantizationScheme, apply_quantization_config,
    )
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    reference = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    if fmt.startswith("ct-w4a16"):
        weights = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=group_size,
                                   symmetric=fmt.endswith("-sym"))
        scheme, layout = QuantizationScheme(targets=["Linear"], weights=weights), "pack-quantized"
    else:
        weights = QuantizationArgs(num_bits=8, type="float", strategy=fmt.removeprefix("ct-fp8-"), symmetric=True)
        activations = QuantizationArgs(num_bits=8, type="float", strategy="token", dynamic=True, symmetric=True)
        scheme, layout = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=activations), "float-quantized"
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"], format=layout))
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        weight = module.weight.data
        if weights.strategy == "group":
            low, high = weight.reshape(weight.shape[0], -1, group_size).amin(-1), weight.reshape(weight.shape[0], -1, group_size).amax(-1)
        elif weights.strategy == "channel":
            low, high = weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
        else:
            low, high = weight.amin().reshape(1), weight.amax().reshape(1)
        scale, zero_point = calculate_qparams(low, high, weights)
        module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = zero_point.to(module.weight_zero_point.dtype).reshape(module.weight_zero_point.shape)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=layout)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    compressor.decompress_model(model)
    decompressed = model.state_dict()
    for name in reference:
        if name.endswith(".weight"):
            reference[name] = decompressed[name].float()
    plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32).eval()
    plain.load_state_dict(reference)
    return plain


def _round_projection_inputs_to_fp8(model) -> None:
    """Each projection's input rounded to e4m3 with one scale per token (its absolute maximum at 448)."""
    def round_input(module, args):
        (x,) = args
        scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        return ((x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale,)

    for name, module in model.named_modules():
        if name.rpartition(".")[2] in PROJECTIONS:
            module.register_forward_pre_hook(round_input)

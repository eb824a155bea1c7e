"""Quantized linear weights: which format a checkpoint stores (`weight_format`), and the numerics that
the layers and both compute backends share.

Two kinds of weights, whatever the checkpoint's own layout, once loaded:
* fp8 (e4m3) values with one float32 scale per output row. `--quantize fp8` makes them from a
  bf16/fp16/fp32 checkpoint after loading; fp8 checkpoints (compressed-tensors `float-quantized`,
  FBGEMM's `fbgemm_fp8`, the per-tensor `fp8` of AutoFP8) bring them, a per-tensor scale repeated on
  each row. Activations are quantized on the fly, one scale per token (row), so an outlier in one
  token or one output channel costs only its own row precision; a checkpoint's static input scales
  are not used (the per-token scale is at least as precise). A value is stored as round(v / scale) in
  e4m3, whose largest finite value (448) is what each row's absolute maximum maps to.
* 4-bit integers with a scale and a zero per group of inputs (W4A16: activations stay in the model
  dtype): AWQ, GPTQ and compressed-tensors `pack-quantized` checkpoints, each repacked at load into
  the one layout below.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
# Where fp8 matmuls run on a GPU: compute capability 8.9 (Ada) and later.
MIN_FP8_CAPABILITY = (8, 9)


def quantize_fp8_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, cols] -> (e4m3 values [rows, cols], float32 scales [rows, 1]): values ~ e4m3 * scale."""
    scales = values.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX  # [rows, 1]
    return (values.float() / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scales



# 4-bit weights (AWQ, GPTQ, compressed-tensors pack-quantized), as every loader leaves them:
#   qweight [out, in // 8] int32: weight (n, k) is the unsigned nibble at bits 4 * (k % 8) of
#       qweight[n, k // 8] (the lowest nibble is the lowest k);
#   scales [out, in // group_size] and zeros [out, in // group_size], both in the model dtype (a zero is
#       an integer 0..15, exact in any float dtype);
#   weight (n, k) = (nibble - zeros[n, k // group_size]) * scales[n, k // group_size].
INT4_PER_INT32 = 8


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """qweight [rows, cols // 8] int32 -> [rows, cols] uint8 nibbles (0..15), lowest nibble first."""
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)  # [8]
    nibbles = (qweight[:, :, None] >> shifts) & 0xF  # [rows, cols // 8, 8]
    return nibbles.reshape(qweight.shape[0], -1).to(torch.uint8)


def pack_int4(nibbles: torch.Tensor) -> torch.Tensor:
    """[rows, cols] integers 0..15 (cols a multiple of 8) -> [rows, cols // 8] int32; inverse of unpack_int4."""
    rows, cols = nibbles.shape
    grouped = nibbles.to(torch.int64).reshape(rows, cols // INT4_PER_INT32, INT4_PER_INT32)
    shifts = torch.arange(0, 32, 4, device=nibbles.device, dtype=torch.int64)
    packed = (grouped << shifts).sum(-1)  # [rows, cols // 8] in 0 .. 2**32 - 1
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 weight [out, in] of a 4-bit weight in the layout above."""
    nibbles = unpack_int4(qweight).float()  # [out, in]
    scale = scales.float().repeat_interleave(group_size, dim=1)  # [out, in]
    zero = zeros.float().repeat_interleave(group_size, dim=1)
    return (nibbles - zero) * scale


class QuantizationConfigError(ValueError):
    """A checkpoint quantization or `--quantize` value this server cannot run (said before any weight is read)."""


@dataclass(frozen=True)
class WeightFormat:
    """How a model's quantized linears are stored in its checkpoint and held once loaded.

    `name` is what /info reports (`quantize`): fp8, fbgemm_fp8, compressed-tensors, awq or gptq.
    `checkpoint` says how the tensors are read: "" (unquantized, quantized to fp8 after loading),
    "fp8" (`weight` in e4m3 and `weight_scale`, per row or per tensor), "awq", "gptq" or
    "pack-quantized" (4-bit). For 4-bit weights: `group_size` inputs share a scale and zero (0: a whole
    row), `symmetric` fixes every zero at 8, `zero_offset` is what GPTQ's original format subtracted
    from each stored zero (1; 0 for gptq_v2), and `act_order` says GPTQ's groups follow its `g_idx`.
    """

    name: str
    checkpoint: str
    group_size: int = 0
    symmetric: bool = False
    zero_offset: int = 0
    act_order: bool = False

    @property
    def is_int4(self) -> bool:
        return self.checkpoint in ("awq", "gptq", "pack-quantized")


# `--quantize` values that name a checkpoint format rather than a quantization made at load.
CHECKPOINT_QUANTIZE_NAMES = {"awq": ("awq",), "gptq": ("gptq",), "compressed-tensors": ("compressed-tensors",),
                             "fp8": ("fp8", "fbgemm_fp8", "compressed-tensors")}


def weight_format(quantization_config: dict | None, quantize: str | None, num_shard: int = 1) -> WeightFormat | None:
    """The format of a checkpoint whose config.json holds `quantization_config` (None: unquantized),
    served with `--quantize quantize`; None for plain weights. Raises QuantizationConfigError for a
    method, bit width, group size or layout this server lacks, and for a `--quantize` that names
    another quantization than the checkpoint's."""
    if not quantization_config:
        return WeightFormat("fp8", "") if quantize == "fp8" else _no_checkpoint_quantization(quantize)
    method = str(quantization_config.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        found = _compressed_tensors_format(quantization_config)
    elif method == "fbgemm_fp8":
        found = WeightFormat("fbgemm_fp8", "fp8")
    elif method == "fp8":
        if quantization_config.get("weight_block_size"):
            raise QuantizationConfigError(
                f"block-wise fp8 checkpoints (weight_block_size {quantization_config['weight_block_size']}) are not "
                "supported; per-tensor and per-channel fp8 are")
        found = WeightFormat("fp8", "fp8")
    elif method == "awq":
        found = _awq_format(quantization_config)
    elif method == "gptq":
        found = _gptq_format(quantization_config, num_shard)
    else:
        raise QuantizationConfigError(
            f"the checkpoint's quant_method {method!r} is not supported; supported: awq, compressed-tensors, fbgemm_fp8, "
            "fp8, gptq")
    if quantize is not None and found.name not in CHECKPOINT_QUANTIZE_NAMES.get(quantize, ()):
        raise QuantizationConfigError(
            f"--quantize {quantize} was asked for, but the checkpoint is already quantized as {found.name}"
            f"{' (4-bit)' if found.is_int4 else ' (fp8)'}; leave --quantize out to serve it as stored")
    return found


def _no_checkpoint_quantization(quantize: str | None) -> None:
    if quantize is not None:
        raise QuantizationConfigError(
            f"--quantize {quantize} needs a checkpoint quantized that way (config.json's quantization_config); this "
            "one is not quantized. Only fp8 can be made at load")
    return None


def _int4_group_size(group_size, source: str) -> int:
    if group_size in (-1, None):
        return 0
    if not isinstance(group_size, int) or group_size <= 0 or group_size % INT4_PER_INT32:
        raise QuantizationConfigError(f"{source}: group size {group_size!r} is not supported (a multiple of 8, or -1)")
    return group_size


def _check_bits(bits, source: str) -> None:
    if bits != 4:
        raise QuantizationConfigError(f"{source}: {bits}-bit weights are not supported; only 4-bit")


def _awq_format(config: dict) -> WeightFormat:
    _check_bits(config.get("bits", config.get("w_bit")), "AWQ")
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        raise QuantizationConfigError(f"AWQ version {version!r} is not supported; only the GEMM layout")
    if not config.get("zero_point", True):
        raise QuantizationConfigError("AWQ without zero points (zero_point: false) is not supported")
    return WeightFormat("awq", "awq", _int4_group_size(config.get("group_size", config.get("q_group_size")), "AWQ"))


def _gptq_format(config: dict, num_shard: int) -> WeightFormat:
    _check_bits(config.get("bits"), "GPTQ")
    checkpoint_format = str(config.get("checkpoint_format", "gptq")).lower()
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise QuantizationConfigError(f"GPTQ checkpoint_format {checkpoint_format!r} is not supported (gptq, gptq_v2)")
    act_order = bool(config.get("desc_act", False))
    if act_order and num_shard > 1:
        raise QuantizationConfigError(
            "GPTQ checkpoints with act-order (desc_act: true) run on one shard only: their groups span every rank's "
            "inputs; use --num-shard 1")
    return WeightFormat("gptq", "gptq", _int4_group_size(config.get("group_size"), "GPTQ"),
                        symmetric=bool(config.get("sym", True)), zero_offset=1 if checkpoint_format == "gptq" else 0,
                        act_order=act_order)


def _compressed_tensors_format(config: dict) -> WeightFormat:
    groups = config.get("config_groups") or {}
    if len(groups) != 1:
        raise QuantizationConfigError(
            f"compressed-tensors: {len(groups)} config groups; only checkpoints with one quantization scheme are supported")
    (group,) = groups.values()
    weights = group.get("weights") or {}
    layout = group.get("format") or config.get("format")
    kind, bits, strategy = weights.get("type"), weights.get("num_bits"), weights.get("strategy")
    if layout == "float-quantized" and kind == "float" and bits == 8 and strategy in ("channel", "tensor"):
        return WeightFormat("compressed-tensors", "fp8")
    if layout == "pack-quantized" and kind == "int" and bits == 4 and strategy in ("group", "channel"):
        if group.get("input_activations"):
            raise QuantizationConfigError("compressed-tensors: 4-bit weights with quantized activations are not supported")
        group_size = weights.get("group_size") if strategy == "group" else -1
        return WeightFormat("compressed-tensors", "pack-quantized", _int4_group_size(group_size, "compressed-tensors"),
                            symmetric=bool(weights.get("symmetric", True)))
    raise QuantizationConfigError(
        f"compressed-tensors: format {layout!r} with {bits}-bit {kind} weights per {strategy} is not supported; "
        "supported: float-quantized 8-bit float per channel or tensor (fp8), pack-quantized 4-bit int per group or channel")


_building: WeightFormat | None = None


@contextlib.contextmanager
def building_with_weights(weight_format: WeightFormat | None) -> Iterator[None]:
    """Linears constructed inside the block hold their weights in `weight_format` (None: unquantized;
    a format made at load starts unquantized too)."""
    global _building
    previous, _building = _building, weight_format
    try:
        yield
    finally:
        _building = previous


def stored_weight_format() -> WeightFormat | None:
    """The format that a linear built now stores its checkpoint weights in (None: plain weights)."""
    return _building if _building is not None and _building.checkpoint else None

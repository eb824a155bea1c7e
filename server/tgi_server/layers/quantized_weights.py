"""Reading one rank's slice of a quantized linear from its checkpoint, into the layouts of
`tgi_server.quantization`: fp8 values with a float32 scale per output row, or 4-bit weights packed
along the input with a scale and a zero per group.

A slice is `rows` (output features, for a column-parallel part) or `cols` (input features, for a
row-parallel layer) of the whole [out_features, in_features] weight; each checkpoint layout packs and
transposes differently, so each reader knows which of its tensors' dims carry which:

* AWQ (GEMM): `qweight` [in, out / 8] int32, 8 outputs per int32 in the order 0 2 4 6 1 3 5 7;
  `qzeros` [groups, out / 8] likewise; `scales` [groups, out].
* GPTQ: `qweight` [in / 8, out] int32, 8 inputs per int32 in order; `qzeros` [groups, out / 8], in
  order, each stored one below the zero in the original format; `scales` [groups, out]; `g_idx` [in],
  each input's group (act-order checkpoints permute inputs across groups).
* compressed-tensors pack-quantized: `weight_packed` [out, in / 8] (this server's layout: nibble =
  signed value + 8); `weight_scale` [out, groups]; `weight_zero_point` [out / 8, groups] packed along
  the outputs (asymmetric only; its nibbles, signed zero + 8, are this server's zeros).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tgi_server.quantization import FP8_DTYPE, INT4_PER_INT32, WeightFormat, pack_int4, unpack_int4
from tgi_server.weights import WeightShapeError, WeightSource

Range = tuple[int, int]
# AWQ's int32 holds outputs 0 2 4 6 1 3 5 7 from its lowest nibble up; output j is nibble _AWQ_NIBBLE[j].
_AWQ_NIBBLE = [0, 4, 1, 5, 2, 6, 3, 7]


@dataclass
class Int4Slice:
    """4-bit weights of a slice: qweight [rows, cols / 8] int32, scales and zeros [rows, groups] in the
    model dtype, `group_size` inputs per group, and `input_perm` ([cols], or None): the input order that
    makes act-order groups contiguous (the layer multiplies x[:, input_perm])."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    input_perm: torch.Tensor | None


def read_fp8(weights: WeightSource, prefix: str, rows: Range, cols: Range, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(`{prefix}.weight`'s slice in e4m3 [rows, cols], its float32 scale per row [rows]); a per-tensor
    `weight_scale` is repeated on every row."""
    name = f"{prefix}.weight"
    values = _read_block(weights, name, shape, rows, cols)
    if values.dtype != FP8_DTYPE:
        raise WeightShapeError(f"{name} is {values.dtype}, but the checkpoint's quantization stores fp8 (float8_e4m3fn) weights")
    scale_name = f"{prefix}.weight_scale"
    scale_shape = weights.shape(scale_name)
    if scale_shape is None:
        raise KeyError(f"tensor {scale_name!r} is not in the checkpoint (its fp8 weights need it)")
    scale = weights.get(scale_name, scale_shape, keep_dtype=True).float()
    if scale.numel() == 1:
        return values, scale.reshape(1).expand(rows[1] - rows[0]).contiguous()
    if scale.numel() != shape[0]:
        raise WeightShapeError(f"{scale_name} has shape {list(scale_shape)}: neither one scale per tensor nor one per row of {shape[0]}")
    return values, scale.reshape(-1)[rows[0]:rows[1]].contiguous()


def read_int4(
    weights: WeightSource, weight_format: WeightFormat, prefix: str, rows: Range, cols: Range,
    shape: tuple[int, int], dtype: torch.dtype,
) -> Int4Slice:
    """The 4-bit weights of `prefix` for output rows `rows` and input columns `cols` of the whole
    weight of `shape` ([out, in]); one of the two is the whole extent."""
    out_features, in_features = shape
    group_size = weight_format.group_size or in_features
    _check_alignment(prefix, rows, cols, weight_format.group_size, shape)
    groups = (cols[0] // group_size, max(cols[1] // group_size, cols[0] // group_size + 1))
    reader = {"awq": _read_awq, "gptq": _read_gptq, "pack-quantized": _read_pack_quantized}[weight_format.checkpoint]
    nibbles, scales, zeros, group_index = reader(weights, weight_format, prefix, rows, cols, groups, shape)
    local_group_size = group_size if weight_format.group_size else cols[1] - cols[0]
    input_perm = None
    if group_index is not None:  # act-order: inputs reordered so that each group's are contiguous
        order = torch.argsort(group_index - groups[0], stable=True)
        expected = torch.arange(cols[1] - cols[0]) // local_group_size
        if not torch.equal((group_index - groups[0])[order], expected):
            raise WeightShapeError(f"{prefix}.g_idx does not give every group {local_group_size} inputs")
        if not torch.equal(order, torch.arange(len(order))):
            nibbles, input_perm = nibbles[:, order], order
    return Int4Slice(pack_int4(nibbles), scales.to(dtype).contiguous(), zeros.to(dtype).contiguous(),
                     local_group_size, input_perm)


def _read_block(weights: WeightSource, name: str, shape: tuple[int, int], dim0: Range, dim1: Range) -> torch.Tensor:
    """Elements [dim0) x [dim1) of the stored 2-d tensor `name` of `shape`, reading along the split dim."""
    if dim1 == (0, shape[1]):
        return weights.get_range(name, 0, *dim0, shape, keep_dtype=True)
    return weights.get_range(name, 1, *dim1, shape, keep_dtype=True)[dim0[0]:dim0[1]]


def _check_alignment(prefix: str, rows: Range, cols: Range, group_size: int, shape: tuple[int, int]) -> None:
    if rows[0] % INT4_PER_INT32 or (rows[1] % INT4_PER_INT32 and rows[1] != shape[0]):
        raise WeightShapeError(f"{prefix}: this rank's output rows {list(rows)} do not start on a multiple of 8, where "
                         "4-bit checkpoints pack their zeros; use fewer shards")
    if group_size and cols != (0, shape[1]) and (cols[0] % group_size or cols[1] % group_size):
        raise WeightShapeError(f"{prefix}: this rank's input columns {list(cols)} split a quantization group of "
                         f"{group_size}; use fewer shards")


def _awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """[r, c / 8] int32 in AWQ's output order -> [r, c] nibbles in column order."""
    nibbles = unpack_int4(packed).reshape(packed.shape[0], -1, INT4_PER_INT32)
    return nibbles[:, :, _AWQ_NIBBLE].reshape(packed.shape[0], -1)


def _read_awq(weights, weight_format, prefix, rows, cols, groups, shape):
    out_features, in_features = shape
    num_groups, packed_out = in_features // (weight_format.group_size or in_features), out_features // INT4_PER_INT32
    packed_rows = (rows[0] // INT4_PER_INT32, rows[1] // INT4_PER_INT32)
    qweight = _read_block(weights, f"{prefix}.qweight", (in_features, packed_out), cols, packed_rows)
    qzeros = _read_block(weights, f"{prefix}.qzeros", (num_groups, packed_out), groups, packed_rows)
    scales = _read_block(weights, f"{prefix}.scales", (num_groups, out_features), groups, rows)
    return _awq_unpack(qweight).t(), scales.t(), _awq_unpack(qzeros).t().float(), None


def _read_gptq(weights, weight_format, prefix, rows, cols, groups, shape):
    out_features, in_features = shape
    num_groups, packed_out = in_features // (weight_format.group_size or in_features), out_features // INT4_PER_INT32
    packed_cols = (cols[0] // INT4_PER_INT32, cols[1] // INT4_PER_INT32)
    qweight = _read_block(weights, f"{prefix}.qweight", (in_features // INT4_PER_INT32, out_features), packed_cols, rows)
    qzeros = _read_block(weights, f"{prefix}.qzeros", (num_groups, packed_out), groups,
                         (rows[0] // INT4_PER_INT32, rows[1] // INT4_PER_INT32))
    scales = _read_block(weights, f"{prefix}.scales", (num_groups, out_features), groups, rows)
    nibbles = unpack_int4(qweight.t().contiguous())  # [rows, cols]
    zeros = unpack_int4(qzeros).t().float() + weight_format.zero_offset  # [rows, groups]
    group_index = None
    if weight_format.act_order:
        group_index = weights.get_range(f"{prefix}.g_idx", 0, *cols, (in_features,), keep_dtype=True).long()
    return nibbles, scales.t(), zeros, group_index


def _read_pack_quantized(weights, weight_format, prefix, rows, cols, groups, shape):
    out_features, in_features = shape
    num_groups = in_features // (weight_format.group_size or in_features)
    packed_cols = (cols[0] // INT4_PER_INT32, cols[1] // INT4_PER_INT32)
    packed = _read_block(weights, f"{prefix}.weight_packed", (out_features, in_features // INT4_PER_INT32), rows, packed_cols)
    nibbles = unpack_int4(packed.contiguous())  # [rows, cols]
    scales = _read_block(weights, f"{prefix}.weight_scale", (out_features, num_groups), rows, groups)
    if weight_format.symmetric:
        return nibbles, scales, torch.full_like(scales, 8, dtype=torch.float32), None
    zero_rows = (rows[0] // INT4_PER_INT32, -(-rows[1] // INT4_PER_INT32))
    packed_zeros = _read_block(weights, f"{prefix}.weight_zero_point", (-(-out_features // INT4_PER_INT32), num_groups),
                               zero_rows, groups)
    zeros = unpack_int4(packed_zeros.t().contiguous()).t()  # [rows rounded up to 8, groups]
    return nibbles, scales, zeros[:rows[1] - rows[0]].float(), None

"""Tensor-parallel linear layers: the column/row split that keeps one all-reduce per block.

A column-parallel layer keeps a slice of the output features, so its output is already the
rank's slice of heads or of the MLP's intermediate; the row-parallel layer after it consumes
exactly that slice and all-reduces the partial sums.

Quantized weights (see `tgi_server.quantization`): a linear built inside `building_with_weights`
holds what its checkpoint stores, fp8 values with a float32 scale per output row, or 4-bit weights
with a scale and a zero per group (of this rank's slice: a row-parallel rank scales its own partial
sums); `--quantize fp8` turns plain weights to fp8 after loading (`quantize_linears`). Which matmul a
linear runs is fixed when it is built.
"""

import torch
from torch import nn

from tgi_server.distributed import TPGroup
from tgi_server.layers.quantized_weights import read_fp8, read_int4
from tgi_server.ops import select_ops
from tgi_server.lora import LoraStacks
from tgi_server.quantization import FP8_DTYPE, INT4_PER_INT32, quantize_fp8_rows, stored_weight_format
from tgi_server.weights import WeightSource


def _parameter(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class _QuantizableLinear(nn.Module):
    """What the tensor-parallel linears share: their weight [num_out, num_in] of this rank, stored as
    the checkpoint's format says.

    Plain or fp8: `weight` (in the model dtype, or e4m3 with `weight_scale` [num_out] float32).
    4-bit: `qweight` [num_out, num_in / 8] int32 (as the backend's `prepare_int4` lays it out), `scales`
    and `zeros` [num_out, groups] in the model dtype, `group_size`, and `input_perm` (act-order: the
    input order whose groups are contiguous).
    """

    # This rank's [start, stop) of the input features (a row-parallel linear's); None: all of them.
    input_range: tuple[int, int] | None = None

    def __init__(self, num_out: int, num_in: int, group_size_in: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.ops = select_ops(device)
        self.num_out, self.dtype, self.device = num_out, dtype, device
        # LoRA: the checkpoint modules this linear holds, with this rank's rows of each (set when loaded),
        # and their adapter weights once allocated (`tgi_server.lora`).
        self.lora_targets: list[tuple[str, list[tuple[int, int]] | None]] = []
        self.lora: LoraStacks | None = None
        self.weight_format = stored_weight_format()
        self.register_parameter("weight_scale", None)
        self.register_buffer("input_perm", None)
        if self.weight_format is not None and self.weight_format.is_int4:
            self.group_size = self.weight_format.group_size or group_size_in
            num_groups = num_in // self.group_size
            self.qweight = _parameter(torch.empty(num_out, num_in // INT4_PER_INT32, dtype=torch.int32, device=device))
            self.scales = _parameter(torch.empty(num_out, num_groups, dtype=dtype, device=device))
            self.zeros = _parameter(torch.empty(num_out, num_groups, dtype=dtype, device=device))
            if self.weight_format.act_order:
                self.input_perm = torch.arange(num_in, device=device)
            self.matmul = self._int4_matmul
            return
        stores_fp8 = self.weight_format is not None
        self.weight = _parameter(torch.empty(num_out, num_in, dtype=FP8_DTYPE if stores_fp8 else dtype, device=device))
        if stores_fp8:
            self.weight_scale = _parameter(torch.empty(num_out, dtype=torch.float32, device=device))
        self.matmul = self._dense_matmul

    def allocate_lora(self, num_slots: int, max_rank: int) -> None:
        self.lora = LoraStacks(self.lora_targets, self.num_out, self.in_features, self.input_range, num_slots, max_rank,
                               self.dtype, self.device, self.ops)

    def _matmul_with_adapters(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = self.matmul(x, bias)
        return self.lora.add_delta(x, out) if self.lora is not None else out

    def _dense_matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.ops.linear(x, self.weight, bias, self.weight_scale)

    def _int4_matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)
        return self.ops.int4_linear(x, self.qweight, self.scales, self.zeros, self.group_size, bias)

    @torch.no_grad()
    def _load_quantized(self, weights: WeightSource, parts: list[tuple[str, tuple[int, int], tuple[int, int], tuple[int, int]]]) -> None:
        """Reads each (prefix, rows, cols, whole shape) part in the checkpoint's format and stacks them by row."""
        if not self.weight_format.is_int4:
            read = [read_fp8(weights, prefix, rows, cols, shape) for prefix, rows, cols, shape in parts]
            self.weight.copy_(torch.cat([values for values, _ in read]))
            self.weight_scale.copy_(torch.cat([scales for _, scales in read]))
            return
        read = [read_int4(weights, self.weight_format, prefix, rows, cols, shape, self.scales.dtype)
                for prefix, rows, cols, shape in parts]
        perms = {None if piece.input_perm is None else tuple(piece.input_perm.tolist()) for piece in read}
        if len(perms) > 1:
            raise ValueError(f"{parts[0][0]}: fused projections whose act-order input permutations differ")
        self.qweight.copy_(self.ops.prepare_int4(torch.cat([piece.qweight for piece in read])))
        self.scales.copy_(torch.cat([piece.scales for piece in read]))
        self.zeros.copy_(torch.cat([piece.zeros for piece in read]))
        if read[0].input_perm is not None:
            self.input_perm.copy_(read[0].input_perm)

    @torch.no_grad()
    def quantize_fp8(self) -> None:
        values, scales = quantize_fp8_rows(self.weight)
        self.weight = _parameter(values)  # [out, in] float8_e4m3fn
        self.weight_scale = _parameter(scales.squeeze(1))  # [out] float32


def quantize_linears(model: nn.Module) -> None:
    """`--quantize fp8`: every column- and row-parallel linear of `model` (attention and dense MLP
    projections; not embeddings, the LM head, MoE experts or routers) to fp8."""
    for layer in [module for module in model.modules() if isinstance(module, _QuantizableLinear)]:
        layer.quantize_fp8()


def weight_quantization(model: nn.Module) -> str:
    """What /info reports as `quantize`: the checkpoint's quantization (awq, gptq, compressed-tensors,
    fbgemm_fp8, fp8), "fp8" for weights quantized at load, "" for plain weights."""
    for layer in model.modules():
        if isinstance(layer, _QuantizableLinear):
            if layer.weight_format is not None:
                return layer.weight_format.name
            if layer.weight_scale is not None:
                return "fp8"
    return ""


class ColumnParallelLinear(_QuantizableLinear):
    """One or more linears sharing an input, fused along the output dim and split across ranks.

    `output_sizes` lists the fused parts (e.g. [intermediate, intermediate] for gate/up); each
    part is split across ranks on its own (balanced, see `TPGroup.partition`, unless `part_ranges`
    gives this rank's [start, stop) rows of each part), so rank r holds [part0_r, part1_r, ...] and
    its output splits back into matching per-rank pieces.
    """

    def __init__(
        self,
        in_features: int,
        output_sizes: list[int],
        bias: bool,
        tp: TPGroup,
        dtype: torch.dtype,
        device: torch.device,
        part_ranges: list[tuple[int, int]] | None = None,
    ):
        self.part_ranges = part_ranges or [tp.partition(size) for size in output_sizes]
        self.output_sizes_per_rank = [stop - start for start, stop in self.part_ranges]
        num_out = sum(self.output_sizes_per_rank)
        super().__init__(num_out, in_features, in_features, dtype, device)  # weight [num_out_per_rank, in_features]
        self.tp = tp
        self.in_features = in_features
        self.output_sizes = output_sizes
        # [num_out_per_rank]
        self.bias = _parameter(torch.empty(num_out, dtype=dtype, device=device)) if bias else None

    @torch.no_grad()
    def load(self, weights: WeightSource, prefixes: list[str]) -> None:
        """Read this rank's rows of each part `{prefix}.weight` (and `.bias`), in part order."""
        if self.weight_format is not None:
            self._load_quantized(weights, [(prefix, rows, (0, self.in_features), (size, self.in_features))
                                           for prefix, rows, size in zip(prefixes, self.part_ranges, self.output_sizes)])
        else:
            self.weight.copy_(self._read_parts(weights, [f"{p}.weight" for p in prefixes], (self.in_features,)))
        if self.bias is not None:
            self.bias.copy_(self._read_parts(weights, [f"{p}.bias" for p in prefixes], ()))
        self.lora_targets = [(prefix, [rows]) for prefix, rows in zip(prefixes, self.part_ranges)]

    def _read_parts(self, weights: WeightSource, names: list[str], trailing: tuple[int, ...]) -> torch.Tensor:
        shards = [
            weights.get_range(name, 0, start, stop, (size, *trailing))
            for name, (start, stop), size in zip(names, self.part_ranges, self.output_sizes)
        ]
        return torch.cat(shards)

    @torch.no_grad()
    def load_fused(self, weights: WeightSource, prefix: str) -> None:
        """Read this rank's rows of each part from one checkpoint tensor `{prefix}.weight` that holds
        the parts stacked in order (Phi-3's qkv_proj and gate_up_proj)."""
        if self.weight_format is not None:
            raise ValueError(f"{prefix}: quantized checkpoints that fuse projections into one tensor are not supported")
        name, total = f"{prefix}.weight", sum(self.output_sizes)
        offsets = [sum(self.output_sizes[:i]) for i in range(len(self.output_sizes))]
        shards = [
            weights.get_range(name, 0, offset + start, offset + stop, (total, self.in_features))
            for offset, (start, stop) in zip(offsets, self.part_ranges)
        ]
        self.weight.copy_(torch.cat(shards))
        if self.bias is not None:
            raise ValueError(f"{prefix}: fused checkpoint projections with a bias are not supported")
        self.lora_targets = [(prefix, [(offset + start, offset + stop) for offset, (start, stop) in zip(offsets, self.part_ranges)])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[num_tokens, in_features] -> [num_tokens, sum(output_sizes_per_rank)]."""
        return self._matmul_with_adapters(x, self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused, each rank holding whole kv heads and their groups of query heads (or, with
    more ranks than kv heads, a copy of one kv head and its share of the group: `TPGroup.head_partition`)."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        tp: TPGroup,
        dtype: torch.dtype,
        device: torch.device,
    ):
        (q_start, q_stop), (kv_start, kv_stop) = tp.head_partition(num_heads, num_kv_heads)
        sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        q_rows = (q_start * head_dim, q_stop * head_dim)
        kv_rows = (kv_start * head_dim, kv_stop * head_dim)
        super().__init__(hidden_size, sizes, bias, tp, dtype, device, part_ranges=[q_rows, kv_rows, kv_rows])


class RowParallelLinear(_QuantizableLinear):
    """A linear whose input features are split across ranks; partial outputs are summed by all-reduce.

    The bias is added once, to the reduced sum, so every rank returns the same full output. This
    rank's input features are `input_range` (default: its balanced share, see `TPGroup.partition`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        tp: TPGroup,
        dtype: torch.dtype,
        device: torch.device,
        input_range: tuple[int, int] | None = None,
    ):
        self.input_range = input_range or tp.partition(in_features)
        num_in = self.input_range[1] - self.input_range[0]
        super().__init__(out_features, num_in, num_in, dtype, device)  # weight [out_features, num_in_per_rank]
        self.tp = tp
        self.in_features = in_features
        self.out_features = out_features
        # [out_features]
        self.bias = _parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @torch.no_grad()
    def load(self, weights: WeightSource, prefix: str) -> None:
        """Read this rank's columns of `{prefix}.weight` and the whole `{prefix}.bias`."""
        out_features = self.out_features
        if self.weight_format is not None:
            self._load_quantized(weights, [(prefix, (0, out_features), self.input_range, (out_features, self.in_features))])
        else:
            self.weight.copy_(weights.get_range(f"{prefix}.weight", 1, *self.input_range, (out_features, self.in_features)))
        if self.bias is not None:
            self.bias.copy_(weights.get(f"{prefix}.bias", (out_features,)))
        self.lora_targets = [(prefix, None)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[num_tokens, num_in_per_rank] -> [num_tokens, out_features], the same on all ranks."""
        out = self.tp.all_reduce(self._matmul_with_adapters(x, None))
        if self.bias is not None:
            out = out + self.bias
        return out


class ReplicatedLinear(nn.Module):
    """A small linear held whole on every rank (a mixture-of-experts router), no bias."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.ops = select_ops(device)
        # [out_features, in_features]
        self.weight = _parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))

    @torch.no_grad()
    def load(self, weights: WeightSource, name: str) -> None:
        self.weight.copy_(weights.get(name, tuple(self.weight.shape)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[num_tokens, in_features] -> [num_tokens, out_features]."""
        return self.ops.linear(x, self.weight)

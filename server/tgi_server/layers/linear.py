"""Tensor-parallel linear layers: the column/row split that keeps one all-reduce per block.

A column-parallel layer keeps a slice of the output features, so its output is already the
rank's slice of heads or of the MLP's intermediate; the row-parallel layer after it consumes
exactly that slice and all-reduces the partial sums.

`--quantize fp8` (`quantize_linears`, after loading): both kinds then hold their weight in fp8 with a
scale per output row (of this rank's slice: a row-parallel rank scales its own partial sums), and
multiply activations quantized per token.
"""

import torch
from torch import nn

from tgi_server.distributed import TPGroup
from tgi_server.ops import select_ops
from tgi_server.quantization import quantize_fp8_rows
from tgi_server.weights import WeightSource


def _parameter(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class _QuantizableLinear(nn.Module):
    """What the tensor-parallel linears share: a weight that `quantize_fp8` turns into fp8 values and
    a float32 scale per output row (`weight_scale`, None while unquantized)."""

    def __init__(self):
        super().__init__()
        self.register_parameter("weight_scale", None)

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
        super().__init__()
        self.tp = tp
        self.in_features = in_features
        self.output_sizes = output_sizes
        self.ops = select_ops(device)
        self.part_ranges = part_ranges or [tp.partition(size) for size in output_sizes]
        self.output_sizes_per_rank = [stop - start for start, stop in self.part_ranges]
        num_out = sum(self.output_sizes_per_rank)
        # [num_out_per_rank, in_features]
        self.weight = _parameter(torch.empty(num_out, in_features, dtype=dtype, device=device))
        # [num_out_per_rank]
        self.bias = _parameter(torch.empty(num_out, dtype=dtype, device=device)) if bias else None

    @torch.no_grad()
    def load(self, weights: WeightSource, prefixes: list[str]) -> None:
        """Read this rank's rows of each part `{prefix}.weight` (and `.bias`), in part order."""
        self.weight.copy_(self._read_parts(weights, [f"{p}.weight" for p in prefixes], (self.in_features,)))
        if self.bias is not None:
            self.bias.copy_(self._read_parts(weights, [f"{p}.bias" for p in prefixes], ()))

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
        name, total = f"{prefix}.weight", sum(self.output_sizes)
        offsets = [sum(self.output_sizes[:i]) for i in range(len(self.output_sizes))]
        shards = [
            weights.get_range(name, 0, offset + start, offset + stop, (total, self.in_features))
            for offset, (start, stop) in zip(offsets, self.part_ranges)
        ]
        self.weight.copy_(torch.cat(shards))
        if self.bias is not None:
            raise ValueError(f"{prefix}: fused checkpoint projections with a bias are not supported")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[num_tokens, in_features] -> [num_tokens, sum(output_sizes_per_rank)]."""
        return self.ops.linear(x, self.weight, self.bias, self.weight_scale)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused, each rank holding whole kv heads and their groups of query heads."""

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
        super().__init__()
        self.tp = tp
        self.in_features = in_features
        self.ops = select_ops(device)
        self.input_range = input_range or tp.partition(in_features)
        num_in = self.input_range[1] - self.input_range[0]
        # [out_features, num_in_per_rank]
        self.weight = _parameter(torch.empty(out_features, num_in, dtype=dtype, device=device))
        # [out_features]
        self.bias = _parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @torch.no_grad()
    def load(self, weights: WeightSource, prefix: str) -> None:
        """Read this rank's columns of `{prefix}.weight` and the whole `{prefix}.bias`."""
        out_features = self.weight.shape[0]
        self.weight.copy_(weights.get_range(f"{prefix}.weight", 1, *self.input_range, (out_features, self.in_features)))
        if self.bias is not None:
            self.bias.copy_(weights.get(f"{prefix}.bias", (out_features,)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[num_tokens, num_in_per_rank] -> [num_tokens, out_features], the same on all ranks."""
        out = self.tp.all_reduce(self.ops.linear(x, self.weight, None, self.weight_scale))
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

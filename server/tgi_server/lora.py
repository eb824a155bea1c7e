"""LoRA adapters on a shard: PEFT checkpoints read into numbered slots of every adapted linear's
weight stacks, and applied to the rows of a batch whose sequences name a slot.

A linear adapted by LoRA computes W x + s B A x: A [r, in], B [out, r], s the adapter's scaling
(alpha / r, or alpha / sqrt(r) with rsLoRA). Each adapted linear holds, for every slot, its parts'
A stacked along the rank ([slots, parts * max_rank, in]) and the matching B blocks ([slots, out,
parts * max_rank], the scaling folded in), so fused projections (q/k/v, gate/up) take one shrink and
one expand per slot. Slot 0 is never filled: a sequence without an adapter adds nothing.

Tensor parallel: a column-parallel linear keeps A whole and its own output rows of B; a row-parallel
linear keeps its input columns of A and all of B, and adds its partial delta before the all-reduce,
which sums the ranks' shares like the base product's.

The products run on the layer's backend: a product pair per run of rows of one adapter (portable), or
two launches that gather each row's adapter by its slot (`kernels.lora`).
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from tgi_server.forward_context import current

# The projections an adapter may target (PEFT's module names), and the checkpoint name prefix PEFT adds.
TARGET_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
                            "gate_up_proj"})
_PEFT_PREFIX = "base_model.model."


class LoraAdapterError(ValueError):
    """An adapter this server cannot apply to its model; the message names the file and what is wrong."""


@dataclass(frozen=True)
class LoraAdapter:
    name: str
    rank: int
    scaling: float
    # module name in the base checkpoint (e.g. "model.layers.0.self_attn.q_proj") -> (A [r, in], B [out, r])
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]


def read_adapter(name: str, directory: str | Path) -> LoraAdapter:
    """The PEFT LoRA adapter in `directory` (adapter_config.json and adapter_model.safetensors)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path = directory / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise LoraAdapterError(f"adapter {name}: cannot read {config_path}: {error}") from None
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')}, not LORA")
    for key, allowed in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none"), ("modules_to_save", None),
                         ("layers_to_transform", None)):
        if config.get(key, allowed) not in (allowed, [], {}):
            problems.append(f"{key} = {config[key]!r} is not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            problems.append(f"{key} (per-module ranks or alphas) is not supported")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    if not set(targets) <= TARGET_MODULES:
        problems.append(f"target_modules {sorted(set(targets) - TARGET_MODULES)} are not supported "
                        f"(supported: {', '.join(sorted(TARGET_MODULES))})")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        problems.append(f"r ({rank!r}) and lora_alpha ({alpha!r}) must be a positive integer and a number")
    if problems:
        raise LoraAdapterError(f"adapter {name} ({config_path}): " + "; ".join(problems))
    weights_path = directory / "adapter_model.safetensors"
    if not weights_path.is_file():
        raise LoraAdapterError(f"adapter {name}: {weights_path} does not exist")
    try:
        tensors = load_file(str(weights_path))
    except Exception as error:  # safetensors raises its own error type for a damaged file
        raise LoraAdapterError(f"adapter {name}: cannot read {weights_path}: {error}") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, kind = key.removeprefix(_PEFT_PREFIX).rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise LoraAdapterError(f"adapter {name}: unexpected tensor {key} in {weights_path}")
        pairs.setdefault(module, {})[kind[0]] = tensor
    weights = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"} or pair["A"].shape[0] != rank or pair["B"].shape[1] != rank:
            raise LoraAdapterError(f"adapter {name}: {module} needs lora_A [{rank}, in] and lora_B [out, {rank}]")
        weights[module] = (pair["A"], pair["B"])
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoraAdapter(name, rank, scaling, weights)


class LoraStacks:
    """One linear's adapter weights, by slot (see the module's docstring).

    `targets`: for each checkpoint module the linear holds, in its output order, the [start, stop)
    rows of that module's output this rank holds (None: all of them, a row-parallel linear);
    `input_range`: the input columns this rank holds (None: all).
    """

    def __init__(self, targets: list[tuple[str, list[tuple[int, int]] | None]], num_out: int, in_features: int,
                 input_range: tuple[int, int] | None, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, ops):
        self.targets = targets
        self.ops = ops  # the layer's backend (`tgi_server.ops`): its `lora_delta` adds the adapters' products
        self.input_range = input_range
        self.in_features = in_features
        self.max_rank = max_rank
        num_in = input_range[1] - input_range[0] if input_range else in_features
        width = len(targets) * max_rank
        self.a = torch.zeros(num_slots, width, num_in, dtype=dtype, device=device)
        self.b = torch.zeros(num_slots, num_out, width, dtype=dtype, device=device)

    def fit(self, adapter: LoraAdapter) -> list[tuple[slice, slice, torch.Tensor, torch.Tensor]]:
        """(columns, rows of the output, A, B scaled) in the stacks' dtype for each part of this linear
        that `adapter` targets, cut to this rank's share: what `set` copies into a slot.
        LoraAdapterError where one does not fit."""
        parts, row = [], 0
        for part, (module, rows) in enumerate(self.targets):
            num_rows = sum(stop - start for start, stop in rows) if rows is not None else self.b.shape[1]
            pair = adapter.weights.get(module)
            if pair is not None:
                a, b = pair
                if a.shape[1] != self.in_features or (rows is not None and b.shape[0] < max(stop for _, stop in rows)):
                    raise LoraAdapterError(f"adapter {adapter.name}: {module} has lora_A {list(a.shape)} and lora_B "
                                           f"{list(b.shape)}, which do not fit the model's [{self.in_features} in] projection")
                if adapter.rank > self.max_rank:
                    raise LoraAdapterError(f"adapter {adapter.name}: rank {adapter.rank} is above the server's "
                                           f"maximum {self.max_rank} (--max-lora-rank)")
                if self.input_range is not None:
                    a = a[:, self.input_range[0] : self.input_range[1]]
                if rows is not None:
                    b = torch.cat([b[start:stop] for start, stop in rows])
                columns = slice(part * self.max_rank, part * self.max_rank + adapter.rank)
                parts.append((columns, slice(row, row + num_rows), a.to(self.a.dtype).contiguous(),
                              (b.float() * adapter.scaling).to(self.b.dtype)))
            row += num_rows
        return parts

    def set(self, slot: int, parts: list[tuple[slice, slice, torch.Tensor, torch.Tensor]]) -> None:
        """Fills `slot` with an adapter's `fit` parts for this linear (zeros elsewhere)."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        for columns, rows, a, b in parts:
            self.a[slot, columns] = a
            self.b[slot, rows, columns] = b

    def add_delta(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` [num_tokens, out] plus each adapted row's s B A x, x [num_tokens, in] (this rank's)."""
        lora = current().lora
        return self.ops.lora_delta(x, self.a, self.b, lora, out) if lora is not None else out


class AdapterStore:
    """A shard's LoRA adapters: every adapter read (in CPU memory, by the router's adapter id) and
    which one each GPU slot holds. Reading and checking an adapter (`add`) may run beside a step;
    `place` runs between steps."""

    def __init__(self, model: torch.nn.Module, num_slots: int, max_rank: int):
        self.layers = [layer for layer in model.modules() if getattr(layer, "lora_targets", None)
                       and all(module.rpartition(".")[2] in TARGET_MODULES for module, _ in layer.lora_targets)]
        for layer in self.layers:
            layer.allocate_lora(num_slots + 1, max_rank)  # slot 0: no adapter
        self.known_modules = {module for layer in self.layers for module, _ in layer.lora.targets}
        # Decoder layers another pipeline stage runs: an adapter's weights for them are that stage's.
        self.elsewhere = tuple(f"{name}." for name, layer in model.named_modules()
                               if getattr(layer, "runs_elsewhere", False))
        self.num_slots, self.max_rank = num_slots, max_rank
        # adapter id -> (its name, each adapted linear's `fit` parts, in `layers` order)
        self._adapters: dict[int, tuple[str, list[list]]] = {}
        self._lock = threading.Lock()

    def add(self, adapter_id: int, adapter: LoraAdapter) -> None:
        """Keeps `adapter` under `adapter_id`, cut to every adapted linear's share once (placing it in a
        slot later only copies): a module the model lacks, a shape or a rank that does not fit raise
        LoraAdapterError."""
        unknown = sorted(module for module in set(adapter.weights) - self.known_modules
                         if not module.startswith(self.elsewhere))
        if unknown:
            raise LoraAdapterError(f"adapter {adapter.name}: the model has no projection {unknown[0]}"
                                   + (f" (nor {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
        parts = [layer.lora.fit(adapter) for layer in self.layers]
        with self._lock:
            if adapter_id in self._adapters:
                raise LoraAdapterError(f"adapter id {adapter_id} is taken (by {self._adapters[adapter_id][0]})")
            self._adapters[adapter_id] = (adapter.name, parts)

    def remove(self, adapter_id: int) -> None:
        with self._lock:
            self._adapters.pop(adapter_id, None)

    def place(self, slot: int, adapter_id: int) -> None:
        """Copies adapter `adapter_id` into GPU slot `slot` of every adapted linear."""
        if not 1 <= slot <= self.num_slots:
            raise ValueError(f"adapter slot {slot} is not between 1 and {self.num_slots}")
        with self._lock:
            adapter = self._adapters.get(adapter_id)
        if adapter is None:
            raise ValueError(f"no adapter has id {adapter_id}")
        for layer, parts in zip(self.layers, adapter[1]):
            layer.lora.set(slot, parts)

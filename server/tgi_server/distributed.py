"""Tensor-parallel process group: the only place that talks to torch.distributed.

All-reduces of a decode step are small (one row of hidden states per sequence, a few KB) and there
are two per layer, so their latency, not bandwidth, is what tensor parallelism costs one stream.
NCCL's ring all-reduce takes tens of microseconds for such a message; `SymmetricAllReduce` sums it
in one kernel that reads every peer's copy straight from its GPU's memory over NVLink (PyTorch's
symmetric memory, one-shot: no multicast), a few microseconds, and is captured in CUDA graphs like
any kernel. Larger messages (prompt chunks) go through NCCL, whose bandwidth wins there.
"""

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("tgi_server")

# Messages up to this size take the symmetric-memory path (bench/all_reduce.py measured the crossover).
SYMMETRIC_ALL_REDUCE_MAX_BYTES = 1 << 20


def shard_range(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of `rank` when `size` is cut in pieces of ceil(size / world_size).

    Even splits are the usual case; otherwise the last pieces are shorter (even empty), which is
    what a vocab-parallel embedding wants.
    """
    per_rank = -(-size // world_size)
    start = min(rank * per_rank, size)
    return start, min(start + per_rank, size)


@dataclass(frozen=True)
class PipelineStage:
    """This rank's place in a pipeline of `num_stages` stages, each a tensor-parallel group holding a run
    of the decoder layers (`layer_range`): the first embeds the tokens, each sends its hidden states to
    the same tensor-parallel rank of the next, the last computes the logits and samples. One step runs
    through the stages one after the other (no micro-batches). `world` is the group of every rank, where
    the last stage broadcasts the sampled tokens from `sampling_rank` (a global rank)."""

    index: int
    num_stages: int
    previous_rank: int | None  # the global rank this one receives hidden states from
    next_rank: int | None  # ... and sends them to
    sampling_rank: int
    world: object | None = None

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """[start, stop) of the decoder layers this stage runs: balanced, earlier stages one more."""
        return self.index * num_layers // self.num_stages, (self.index + 1) * num_layers // self.num_stages

    def receive(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(tensor, src=self.previous_rank)
        return tensor

    def send(self, tensor: torch.Tensor) -> None:
        dist.send(tensor.contiguous(), dst=self.next_rank)

    def broadcast_tokens(self, token_ids: list[int] | None, count: int, device: torch.device) -> list[int]:
        """The `count` tokens the last stage sampled (given there as `token_ids`), on every rank."""
        tensor = (torch.tensor(token_ids, dtype=torch.int64) if token_ids is not None
                  else torch.empty(count, dtype=torch.int64)).to(device)
        dist.broadcast(tensor, src=self.sampling_rank, group=self.world)
        return tensor.tolist()


@dataclass(frozen=True)
class TPGroup:
    """Tensor-parallel process group handle: rank, world_size and the torch.distributed group
    (None when world_size == 1).

    Layers take one of these as a constructor argument, so a CPU test can build two ranks and
    check that together they equal one.
    """

    rank: int
    world_size: int
    group: object | None
    # Sums small tensors over peer-to-peer memory; None: every all-reduce goes through `group`.
    fast_all_reduce: "SymmetricAllReduce | None" = None
    # With pipeline parallelism, this group's stage; None: one stage holds every layer.
    stage: PipelineStage | None = None

    def partition(self, size: int) -> tuple[int, int]:
        """[start, stop) of this rank's share of `size` items, balanced: shares differ by at most one,
        so sizes that do not divide by the world size still split (e.g. 9 heads over 2 ranks)."""
        return self.rank * size // self.world_size, (self.rank + 1) * size // self.world_size

    def head_partition(self, num_heads: int, num_kv_heads: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """This rank's ([start, stop) of query heads, [start, stop) of kv heads).

        Heads are split by kv head, each taking its group of query heads along, so grouped-query
        attention stays within a rank. With more ranks than kv heads (a multiple of them), each kv head
        is copied on world_size / num_kv_heads ranks, which split its group of query heads.
        """
        if num_kv_heads < self.world_size:
            if self.world_size % num_kv_heads or num_heads % self.world_size:
                raise ValueError(
                    f"num_key_value_heads ({num_kv_heads}) must be >= the tensor-parallel world size "
                    f"({self.world_size}) or divide it, with num_attention_heads ({num_heads}) a multiple of it"
                )
            per_rank, kv_head = num_heads // self.world_size, self.rank * num_kv_heads // self.world_size
            return (self.rank * per_rank, (self.rank + 1) * per_rank), (kv_head, kv_head + 1)
        kv_start, kv_stop = self.partition(num_kv_heads)
        group = num_heads // num_kv_heads
        return (kv_start * group, kv_stop * group), (kv_start, kv_stop)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks: the sum is returned (`tensor` itself may or may not hold it);
        `tensor` itself on a single rank."""
        if self.world_size == 1:
            return tensor
        if self.fast_all_reduce is not None and self.fast_all_reduce.can_reduce(tensor):
            return self.fast_all_reduce(tensor)
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `tensor` along the last dim, in rank order; identity on a single rank."""
        if self.world_size == 1:
            return tensor
        tensor = tensor.contiguous()
        shards = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(shards, tensor, group=self.group)
        return torch.cat(shards, dim=-1)


SINGLE = TPGroup(rank=0, world_size=1, group=None)


class SymmetricAllReduce:
    """One-shot all-reduce through PyTorch's symmetric memory: each rank copies its tensor into a
    buffer every peer can read over NVLink, then one kernel sums all ranks' copies (one kernel per
    call: the copy in, the barrier with the peers and the sum).

    Built collectively by `init_distributed` (every rank must, in the same order); holds
    `max_bytes` of symmetric memory per rank.
    """

    def __init__(self, group, device: torch.device, dtype: torch.dtype, max_bytes: int):
        from torch.distributed import _symmetric_memory as symm_mem

        self.dtype = dtype
        self.max_numel = max_bytes // dtype.itemsize
        self.buffer = symm_mem.empty(self.max_numel, dtype=dtype, device=device)  # [max_numel]
        symm_mem.rendezvous(self.buffer, group)
        self.group_name = group.group_name

    def can_reduce(self, tensor: torch.Tensor) -> bool:
        return tensor.dtype == self.dtype and tensor.numel() <= self.max_numel and tensor.is_contiguous()

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        """A new tensor holding the sum of every rank's `tensor`."""
        out = torch.empty_like(tensor)
        staging = self.buffer[: tensor.numel()].view(tensor.shape)  # the op wants the input's shape
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(staging, tensor, "sum", self.group_name, out)
        return out


def init_distributed(
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    custom_all_reduce: bool = True,
    num_stages: int = 1,
) -> TPGroup:
    """Join the tensor-parallel group: gloo on CPU, nccl on CUDA (rank r uses GPU r % device_count).
    With `num_stages` pipeline stages, the world splits into that many tensor-parallel groups of
    consecutive ranks, and the returned group carries this rank's `PipelineStage`.

    On CUDA, with `custom_all_reduce` and every GPU able to reach its peers' memory directly,
    small all-reduces of `dtype` tensors take `SymmetricAllReduce`. Everything comes in as
    arguments (no environment reads), and a single rank starts no process group at all.
    """
    if world_size == 1:
        return SINGLE
    is_cuda = torch.device(device).type == "cuda"
    if is_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if is_cuda else "gloo",
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
    )
    if num_stages > 1:
        return _pipeline_group(rank, world_size, num_stages)
    group = dist.group.WORLD
    fast = None
    if is_cuda and custom_all_reduce:
        fast = _symmetric_all_reduce(group, torch.device(device), dtype, world_size)
    return TPGroup(rank=rank, world_size=world_size, group=group, fast_all_reduce=fast)


def _pipeline_group(rank: int, world_size: int, num_stages: int) -> TPGroup:
    """This rank's tensor-parallel group and stage, the stages being runs of world_size / num_stages
    consecutive ranks (every rank creates every group, in the same order, as torch.distributed requires)."""
    per_stage = world_size // num_stages
    groups = [dist.new_group(list(range(stage * per_stage, (stage + 1) * per_stage))) for stage in range(num_stages)]
    index, tp_rank = divmod(rank, per_stage)
    stage = PipelineStage(
        index, num_stages,
        previous_rank=rank - per_stage if index > 0 else None,
        next_rank=rank + per_stage if index < num_stages - 1 else None,
        sampling_rank=(num_stages - 1) * per_stage, world=dist.group.WORLD,
    )
    return TPGroup(rank=tp_rank, world_size=per_stage, group=groups[index] if per_stage > 1 else None, stage=stage)


def _symmetric_all_reduce(group, device: torch.device, dtype: torch.dtype, world_size: int):
    """A `SymmetricAllReduce`, or None (with a log line saying why) where peer access is missing.

    Every rank reaches the same answer: the peer-access check covers all pairs of local GPUs."""
    num_gpus = torch.cuda.device_count()
    gpus = [index % num_gpus for index in range(world_size)]
    missing = [(a, b) for a in gpus for b in gpus if a != b and not torch.cuda.can_device_access_peer(a, b)]
    if missing:
        log.info("custom all-reduce off: GPUs %s cannot access each other's memory; NCCL does every all-reduce", missing[0])
        return None
    return SymmetricAllReduce(group, device, dtype, SYMMETRIC_ALL_REDUCE_MAX_BYTES)


def shutdown_distributed(tp: TPGroup) -> None:
    """Leave the process group `init_distributed` joined, if any."""
    if tp.world_size > 1:
        dist.destroy_process_group()

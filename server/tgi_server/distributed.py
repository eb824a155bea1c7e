"""Tensor-parallel process group: the only place that talks to torch.distributed."""

from dataclasses import dataclass

import torch
import torch.distributed as dist


def shard_range(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of `rank` when `size` is cut in pieces of ceil(size / world_size).

    Even splits are the usual case; otherwise the last pieces are shorter (even empty), which is
    what a vocab-parallel embedding wants.
    """
    per_rank = -(-size // world_size)
    start = min(rank * per_rank, size)
    return start, min(start + per_rank, size)


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

    def partition(self, size: int) -> tuple[int, int]:
        """[start, stop) of this rank's share of `size` items, balanced: shares differ by at most one,
        so sizes that do not divide by the world size still split (e.g. 9 heads over 2 ranks)."""
        return self.rank * size // self.world_size, (self.rank + 1) * size // self.world_size

    def head_partition(self, num_heads: int, num_kv_heads: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """This rank's ([start, stop) of query heads, [start, stop) of kv heads).

        Heads are split by kv head, each taking its group of query heads along, so grouped-query
        attention stays within a rank.
        """
        if num_kv_heads < self.world_size:
            raise ValueError(
                f"num_key_value_heads ({num_kv_heads}) must be >= the tensor-parallel world size ({self.world_size})"
            )
        kv_start, kv_stop = self.partition(num_kv_heads)
        group = num_heads // num_kv_heads
        return (kv_start * group, kv_stop * group), (kv_start, kv_stop)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place; a no-op on a single rank."""
        if self.world_size > 1:
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


def init_distributed(
    rank: int, world_size: int, master_addr: str, master_port: int, device: torch.device
) -> TPGroup:
    """Join the tensor-parallel group: gloo on CPU, nccl on CUDA (rank r uses GPU r % device_count).

    Everything comes in as arguments (no environment reads), and a single rank starts no
    process group at all.
    """
    if world_size == 1:
        return SINGLE
    backend = "gloo"
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        backend = "nccl"
    dist.init_process_group(
        backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
    )
    return TPGroup(rank=rank, world_size=world_size, group=dist.group.WORLD)


def shutdown_distributed(tp: TPGroup) -> None:
    """Leave the process group `init_distributed` joined, if any."""
    if tp.world_size > 1:
        dist.destroy_process_group()

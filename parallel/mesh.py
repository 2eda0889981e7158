"""Process groups and the device mesh: one mesh `(dp_replicate, dp_shard, sp)` for every recipe.

Ranks are laid out row-major, so an SP group is a block of `sp` consecutive ranks (docs/METHOD.md §6) and the data-parallel
rank of a process is `rank // sp`. FSDP shards over `dp_shard × sp` (the SP ranks of a group hold different
parameter shards and average their gradients like any other data-parallel peers; see `parallel/ulysses.py` for why
that average is the right one) and replicates over `dp_replicate` (HSDP when > 1). The 14B recipe on 64 GPUs:
dp_replicate 8, sp 4 → dp_shard 2, FSDP shard group 2·4 = 8 = one node.

NCCL on CUDA, gloo on CPU: the same code runs the CPU tests and the GPU jobs.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def check_parallel_sizes(world_size: int, dp_replicate: int, sp: int, num_heads: int | None = None) -> int:
    """Validate the mesh sizes before anything is built; returns dp_shard = world / (dp_replicate · sp)."""
    for name, value in (("world_size", world_size), ("parallel.dp_replicate", dp_replicate), ("parallel.sp", sp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if world_size % (dp_replicate * sp):
        raise ValueError(
            f"parallel.dp_replicate={dp_replicate} × parallel.sp={sp} = {dp_replicate * sp} does not divide the "
            f"world size {world_size}; choose sizes whose product divides {world_size}"
        )
    if num_heads is not None and num_heads % sp:
        divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(
            f"parallel.sp={sp} does not divide the model's num_heads={num_heads} (Ulysses splits attention heads "
            f"across the SP group); valid sp: {divisors}"
        )
    return world_size // (dp_replicate * sp)


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (or a one-process group); returns (rank, world_size, device)."""
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        if "RANK" not in os.environ:  # plain `python recipe.py`: a group of one on a free local port
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            # gloo next to NCCL for the few CPU collectives (async checkpoint planning, object broadcasts).
            dist.init_process_group("cpu:gloo,cuda:nccl", rank=rank, world_size=world)
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return rank, world, device


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ParallelDims:
    """The mesh and the ranks/groups the recipe and the parallel functions need."""

    world_size: int
    dp_replicate: int
    dp_shard: int
    sp: int
    world_mesh: DeviceMesh  # (dp_replicate, dp_shard, sp)
    fsdp_mesh: DeviceMesh  # (dp_replicate, dp_shard·sp) for HSDP; 1-D (dp_shard·sp,) when dp_replicate == 1

    @property
    def dp_size(self) -> int:
        """Number of distinct samples per step (SP groups)."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_rank(self) -> int:
        return self.world_mesh.get_rank() // self.sp

    @property
    def sp_rank(self) -> int:
        return self.world_mesh.get_rank() % self.sp

    @property
    def sp_group(self) -> dist.ProcessGroup:
        return self.world_mesh.get_group("sp")


def build_mesh(
    world_size: int, dp_replicate: int, sp: int, device_type: str, num_heads: int | None = None
) -> ParallelDims:
    """The `(dp_replicate, dp_shard, sp)` mesh over an initialised process group; errors name the bad size."""
    dp_shard = check_parallel_sizes(world_size, dp_replicate, sp, num_heads)
    if dist.get_world_size() != world_size:
        raise ValueError(f"build_mesh: world_size={world_size} but the process group has {dist.get_world_size()} ranks")
    world_mesh = init_device_mesh(
        device_type, (dp_replicate, dp_shard, sp), mesh_dim_names=("dp_replicate", "dp_shard", "sp")
    )
    # A second mesh over the same row-major rank layout rather than slicing a flattened dim out of the first
    # (PyTorch deprecates that slice); dp_shard_sp index = dp_shard index · sp + sp index.
    fsdp_mesh = init_device_mesh(
        device_type, (dp_replicate, dp_shard * sp), mesh_dim_names=("dp_replicate", "dp_shard_sp")
    )
    if dp_replicate == 1:  # plain FSDP, no all-reduce over a one-rank replicate group
        fsdp_mesh = fsdp_mesh["dp_shard_sp"]
    return ParallelDims(world_size, dp_replicate, dp_shard, sp, world_mesh, fsdp_mesh)
